"""The SiCLIP training objective (WIKD + PM), with SLIP's self-supervised term beside it::

    L = L_clip + λ1·FD + λ2·CRD + λ3·ICL + λ4·PM + λ_ssl·NT-Xent,    λ = (4000, 1, 1, 0.1), λ_ssl = ssl_scale (0: off)

All terms are summed in one run (the reading of ``paper_math.md`` §3.5: "multi-stage" names the three
spaces distilled, not three runs). Each term can be switched off and comes back separately for
logging; the loss modules' own parameters (ICL's κ, FD's maps, PM's hyperplane) are submodules, so
``objective.parameters()`` hands them to the optimiser.

A teacher wider than the student (768 against 512, say) is distilled as CLIP-KD does: FD's learned maps
project the student features to the teacher's width, ``v̂_S = normalize(W_v v_S + b_v)``, and ICL pairs those
projections with the teacher's features; CRD compares each model's own similarity matrix and needs no map.
The maps exist whenever the widths differ and FD or ICL is on.

SLIP (``ssl_scale > 0``): the student's embeddings of two augmented views of each image pass SLIP's projection head
(:mod:`siclip.distill.ssl`) and NT-Xent at ``ssl_temperature`` (:class:`~siclip.losses.NTXentLoss`); the head is a
submodule, trained and checkpointed with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from siclip.losses import ClipLoss, NTXentLoss, PairMatchingLoss

from .ssl import SlipHead
from .terms import ContrastiveRelationDistillation, FeatureDistillation, InteractiveContrastiveLoss


@dataclass(frozen=True)
class ObjectiveConfig:
    clip: float = 1.0  # weight of the CLIP contrastive loss
    feature: float = 4000.0  # λ1: feature distillation (FD), MSE to the teacher's features
    relation: float = 1.0  # λ2: contrastive relation distillation (CRD), KL to the teacher's similarity rows
    interactive: float = 1.0  # λ3: interactive contrastive learning (ICL), student anchors against teacher candidates
    pair_matching: float = 0.1  # λ4: the pair-matching loss (PM)
    pm_form: Literal["hyperplane", "cosine"] = "hyperplane"  # PM's classifier: wᵀ(v ⊙ t) + b, or s·cos(v, t) + b
    pm_mining: Literal["hard", "sampled"] = "hard"  # PM's negatives: the most similar, or drawn ∝ softmax(similarity)
    pm_negatives: int = 1  # PM's negatives per positive and direction
    icl_scale: Literal["raw", "exp"] = "raw"  # ICL's learned scale κ used as is (CLIP-KD's code) or as exp(κ)
    local_loss: bool = False  # several ranks: each rank's contrastive loss over its own rows only (open_clip's local_loss)
    ssl_scale: float = 0.0  # SLIP's self-supervised term (1.0 in SLIP); 0: off, and the loader makes no extra views
    ssl_temperature: float = 0.1  # NT-Xent's τ (SLIP, SimCLR)
    ssl_hidden: int | None = None  # SLIP head's hidden width; None: sized to the tower (siclip.distill.ssl.slip_head_sizes)
    ssl_out: int | None = None  # SLIP head's output width; None: sized to the tower
    # The scaling-down study's remedy for a teacher that hurts (SiCLIPObjective.distill_factor, set by the loop)
    distill_schedule: Literal["constant", "linear"] = "constant"  # λ1, λ2, λ3 through a run: constant, or linear: × (1 − step / steps), 0 at the end

    def __post_init__(self) -> None:
        if self.ssl_scale < 0:
            raise ValueError(f"ssl_scale must not be negative, got {self.ssl_scale}")

    @property
    def needs_teacher(self) -> bool:
        return any(w > 0 for w in (self.feature, self.relation, self.interactive))


class SiCLIPObjective(nn.Module):
    """``objective(student, teacher=None) -> {"clip": …, "feature": …, …, "total": …}``.

    ``student`` and ``teacher`` are ``(image_features, text_features, logit_scale)`` (what the models
    return, unit-norm features, exp'd scale); a term whose weight is 0 is neither computed nor returned.
    ``views`` (with ``ssl_scale > 0``) are the student's image features of two augmented views of the batch's images.
    """

    def __init__(self, student_dim: int, teacher_dim: int | None = None, config: ObjectiveConfig = ObjectiveConfig()) -> None:
        super().__init__()
        self.config = config
        # the distillation weights' factor at this step (1 unless distill_schedule fades them; the loop sets it)
        self.distill_factor = 1.0
        self.clip = ClipLoss(local_loss=config.local_loss)
        wider = teacher_dim is not None and teacher_dim != student_dim
        needs_map = config.feature > 0 or (config.interactive > 0 and wider)
        self.feature = FeatureDistillation(student_dim, teacher_dim or student_dim) if needs_map else None
        self.relation = ContrastiveRelationDistillation() if config.relation > 0 else None
        self.interactive = InteractiveContrastiveLoss(scale=config.icl_scale) if config.interactive > 0 else None
        self.pair_matching = (
            PairMatchingLoss(student_dim, form=config.pm_form, mining=config.pm_mining, negatives=config.pm_negatives)
            if config.pair_matching > 0
            else None
        )
        self.ssl_head = SlipHead(student_dim, config.ssl_hidden, config.ssl_out) if config.ssl_scale > 0 else None
        self.ssl = NTXentLoss(config.ssl_temperature, local_loss=config.local_loss) if config.ssl_scale > 0 else None

    def forward(self, student: tuple[Tensor, Tensor, Tensor], teacher: tuple[Tensor, Tensor, Tensor] | None = None,
                views: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:  # fmt: skip
        cfg = self.config
        image, text, scale = student
        if cfg.needs_teacher and teacher is None:
            raise ValueError("distillation terms are switched on but no teacher features were given")
        if (views is not None) != (self.ssl is not None):
            raise ValueError("SLIP's two views are given exactly when ssl_scale > 0" if self.ssl is None
                             else "ssl_scale > 0 but no augmented views were given")  # fmt: skip
        terms: dict[str, Tensor] = {}
        if cfg.clip > 0:
            terms["clip"] = self.clip(image, text, scale)
        if teacher is not None:
            t_image, t_text, t_scale = (t.detach() if isinstance(t, Tensor) else t for t in teacher)
            # the student features in the teacher's width (themselves when the widths agree)
            p_image, p_text = self.feature.project(image, text) if self.feature is not None else (image, text)
            if cfg.feature > 0:
                terms["feature"] = self.feature.distance(p_image, p_text, t_image, t_text)
            if self.relation is not None:
                terms["relation"] = self.relation(image, text, scale, t_image, t_text, t_scale)
            if self.interactive is not None:
                terms["interactive"] = self.interactive(p_image, p_text, t_image, t_text)
        if self.pair_matching is not None:
            terms["pair_matching"] = self._pair_matching(image, text)
        if views is not None:
            terms["ssl"] = self._self_supervised(*views)
        kd = self.distill_factor
        weights = {"clip": cfg.clip, "feature": kd * cfg.feature, "relation": kd * cfg.relation,
                   "interactive": kd * cfg.interactive, "pair_matching": cfg.pair_matching, "ssl": cfg.ssl_scale}  # fmt: skip
        terms["total"] = sum(weights[name] * value for name, value in terms.items())
        return terms

    def _pair_matching(self, image: Tensor, text: Tensor) -> Tensor:
        """PM on the batch; a batch reduced (by skipped samples) below two pairs has no negative, so its PM term is
        an exact 0 that still reaches PM's parameters (DDP expects a gradient for every parameter on every rank).
        The training loop counts these steps."""
        if image.shape[0] >= self.pair_matching.MIN_PAIRS:
            return self.pair_matching(image, text)
        return sum(p.sum() for p in self.pair_matching.parameters()) * 0.0

    def _self_supervised(self, first: Tensor, second: Tensor) -> Tensor:
        """NT-Xent of the head's projections of the two views. A batch reduced below two images has no negative and a
        head BatchNorm cannot normalise one row: its term is an exact 0 that still reaches the head (as PM's)."""
        if first.shape[0] >= 2:
            return self.ssl(self.ssl_head(first), self.ssl_head(second))
        return sum(p.sum() for p in self.ssl_head.parameters()) * 0.0
