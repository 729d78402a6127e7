"""SiCLIP: MobileCLIP with its attention blocks turned into SAS-P blocks that share weights, in both towers.

Readings (the paper leaves them open; ``paper_math.md`` §6):

- text: the four MCt transformer layers are converted, inheriting W_Q, W_K, the first LayerNorm and the
  MLP; W_V, W_P and the second LayerNorm go. Adjacent pairs share whole blocks (``sharing="adjacent"``).
- image: MCi0's two attention blocks become SAS-P blocks on the 8×8 map (:class:`~siclip.blocks.SASPBlock2d`):
  the block's BatchNorm is the one pre-norm, W_Q, W_K and the ConvFFN are inherited (layer scales folded),
  W_V and W_P go, and the two blocks share W_Q and W_K (``image_sharing_scope="attention"``). This is the
  reading that lands on the paper's 9.78 M image parameters: 11,356,992 fused MCi0 parameters − 2 × 524,800
  (W_V, W_P) − 524,288 (the second block's W_Q, W_K) − 2 × 1,024 (layer scales) + 52 (shaped gains shared,
  branch gains per block) = 9,781,108, 14.2 % fewer than MobileCLIP-S0's 11,406,464.
  ``convert=("text",)`` keeps MCi0 as it is (the text-only ablation).
- weight inheritance copies every other module from the teacher and, with ``freeze="inherited"``,
  trains only the SAS-P blocks (the paper's setting).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from torch import nn

from siclip.blocks import PreLNBlock, SASPBlock, SASPBlock2d, SASPConversion, apply_sharing, convert_to_sasp, count_parameters, plan_sharing

from .clip import CLIP, SiCLIPConfig
from .fastvit import AttentionBlock
from .stages import has_trainable, train_only

FREEZE_POLICIES = ("none", "inherited")


@dataclass
class InheritanceReport:
    """One row per parameter: ``module, parameter, status (inherited/new), trainable, numel``."""

    rows: list[dict] = field(default_factory=list)
    sharing: str = ""

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["module", "parameter", "status", "trainable", "numel"])

    def summary(self):
        """Per module: inherited, new, frozen and trainable parameter counts (a pandas table)."""
        frame = self.to_frame()
        frame["inherited"] = frame.numel.where(frame.status == "inherited", 0)
        frame["new"] = frame.numel.where(frame.status == "new", 0)
        frame["frozen"] = frame.numel.where(~frame.trainable, 0)
        frame["trainable_params"] = frame.numel.where(frame.trainable, 0)
        table = frame.groupby("module", sort=False)[["inherited", "new", "frozen", "trainable_params"]].sum()
        table.loc["total"] = table.sum()
        return table.rename(columns={"trainable_params": "trainable"})

    def count(self, column: str) -> int:
        return int(self.summary().loc["total", column])


def module_group(name: str) -> str:
    """Report granularity: ``visual.network.7``, ``text.transformer.0``, ``text.mixer_in``, ``logit_scale``…"""
    match = re.match(r"^(visual\.network\.\d+|text\.transformer\.\d+|visual\.[a-z_]+|text\.[a-z_]+|[a-z_]+)", name)
    return match.group(1) if match else name


TOWERS = ("text", "image")


def attention_stage(model: CLIP, *, converted: bool = False) -> tuple[str, nn.Sequential]:
    """The qualified name and blocks of the image encoder's attention stage (``visual.network.7`` in MCi0).

    Only MCi attention blocks count, unless ``converted`` admits their SAS-P form too. A ViT tower's stack is its
    transformer blocks (``visual.blocks``: Pre-LN blocks, or SAS-P ones when ``converted``); a pure-CNN or timm tower
    has none to convert.
    """
    if hasattr(model.visual, "attention_blocks"):
        name, blocks = model.visual.attention_blocks()
        kinds = (PreLNBlock, SASPBlock) if converted else (PreLNBlock,)
        if not all(isinstance(b, kinds) for b in blocks):
            raise ValueError(f"the ViT image tower's blocks are {type(blocks[0]).__name__}s, not Pre-LN blocks a SiCLIP student "
                             "converts: build it with block 'pre_ln', or convert only the text tower (siclip convert ['text'])")  # fmt: skip
        return f"visual.{name}", blocks
    if not hasattr(model.visual, "network"):
        raise ValueError(f"the {model.config.image.family} image tower has no attention stage a SiCLIP student converts: "
                         "convert only the text tower (siclip convert ['text'])")  # fmt: skip
    kinds = (AttentionBlock, SASPBlock2d) if converted else (AttentionBlock,)
    found = [
        (i, stage) for i, stage in enumerate(model.visual.network)
        if isinstance(stage, nn.Sequential) and len(stage) and all(isinstance(b, kinds) for b in stage)
    ]  # fmt: skip
    if len(found) != 1:
        raise ValueError(
            f"converting the image encoder needs exactly one stage of MCi attention blocks, found {len(found)} "
            f"(token mixers {model.visual.config.token_mixers}; is it converted already? A pure-CNN tower has none: "
            "convert only the text tower, siclip convert ['text'])"
        )
    index, blocks = found[0]
    return f"visual.network.{index}", blocks


def _divergences_by_tower(divergence) -> dict:
    """``{"text": …, "image": …}`` from a dict, or from one array (the text tower's, as before)."""
    if divergence is None:
        return {}
    if not isinstance(divergence, dict):
        return {"text": divergence}
    unknown = set(divergence) - set(TOWERS)
    if unknown:
        raise ValueError(f"divergences given for unknown tower(s) {sorted(unknown)}; towers are {TOWERS}")
    return divergence


def to_siclip(
    model: CLIP,
    config: SiCLIPConfig,
    *,
    divergence=None,
    freeze: bool = True,
    inherited: bool = True,
) -> InheritanceReport:
    """Turn ``model`` (a MobileCLIP) into a SiCLIP student in place and report what it inherited.

    ``config.convert`` names the towers converted: the text encoder's Pre-LN blocks and the image encoder's
    attention blocks become SAS-P blocks, and each tower's blocks are shared by its own plan.
    ``divergence`` is ``{"text": …, "image": …}`` (adjacent or pairwise divergences between the teacher's
    blocks of that tower; a bare array is the text tower's) and serves the ``threshold`` and ``optimal``
    strategies, with the tower's ``*sharing_threshold`` or ``*sharing_max_groups``.
    ``freeze`` applies ``config.freeze``; ``inherited=False`` marks every weight new (a student
    built from scratch).
    """
    unknown = set(config.convert) - set(TOWERS)
    if unknown or not config.convert:
        raise ValueError(f"convert must name one or both of the towers {TOWERS}, got {config.convert}")
    if config.freeze not in FREEZE_POLICIES:
        raise ValueError(f"unknown freeze policy {config.freeze!r}; choose one of {FREEZE_POLICIES}")
    divergences = _divergences_by_tower(divergence)
    options = SASPConversion(beta_ff=config.beta_ff, zero_query=config.zero_query)
    stacks = {}
    if "text" in config.convert:
        stacks["text"] = ("text.transformer", model.text.transformer)
    if "image" in config.convert:
        stacks["image"] = attention_stage(model)
    new, shared, trained = set(), [], []
    for tower, (prefix, blocks) in stacks.items():
        _, conversion = convert_to_sasp(blocks, options=options)
        new |= {f"{prefix}.{r['module']}.{r['parameter']}" for r in conversion.rows if r["action"] == "new"}
        sharing = config.tower_sharing(tower)
        plan = plan_sharing(
            sharing["strategy"], len(blocks), divergences.get(tower), threshold=sharing["threshold"], max_groups=sharing["max_groups"]
        )
        shared.append(f"{tower}: {apply_sharing(blocks, plan, scope=sharing['scope'], merge=config.merge)}")
        trained.append(prefix + ".")
    if freeze and config.freeze == "inherited":
        train_only(model, tuple(trained))
    report = InheritanceReport(sharing="; ".join(shared))
    for name, p in model.named_parameters():
        status = "new" if (name in new or not inherited) else "inherited"
        report.rows.append(
            {"module": module_group(name), "parameter": name, "status": status, "trainable": p.requires_grad, "numel": p.numel()}
        )
    return report


def build_siclip(teacher: CLIP, config: SiCLIPConfig | None = None, *, divergence=None) -> tuple[CLIP, InheritanceReport]:
    """A SiCLIP student inheriting ``teacher``'s weights (the teacher is left untouched).

    Returns the student and its :class:`InheritanceReport`; the student's config records the
    conversion so that :func:`~siclip.models.factory.load_checkpoint` can rebuild it.
    """
    from dataclasses import replace

    config = config or teacher.config.siclip or SiCLIPConfig()
    student = copy.deepcopy(teacher)
    student.config = replace(teacher.config, name=teacher.config.name.replace("mobileclip", "siclip"), siclip=config)
    report = to_siclip(student, config, divergence=divergence)
    return student, report


def fuse_frozen_towers(model: CLIP) -> list[str]:
    """Reparameterise (in place) every tower of ``model`` that has no trainable parameter; returns their names.

    A frozen tower only runs forward, so its train-time branches can be fused into single convolutions
    (BatchNorm folded, RepMixer collapsed): the same features in fewer, larger kernels. The fused tower
    stays frozen; its state-dict keys take the fused layout, and :func:`~siclip.models.save_checkpoint`
    records which towers are fused so that :func:`~siclip.models.load_checkpoint` rebuilds them so.
    """
    frozen = [name for name in ("visual", "text") if not has_trainable(getattr(model, name))]
    fuse_towers(model, frozen)
    return frozen


def fuse_towers(model: CLIP, names: list[str]) -> None:
    """Reparameterise the named towers (``visual``, ``text``) in place, freeze them and record them in
    ``model.fused_towers``."""
    from .reparam import reparameterize_model

    for name in names:
        tower = getattr(model, name)
        reparameterize_model(tower.eval(), inplace=True)
        tower.requires_grad_(False)
    model.fused_towers = sorted(set(getattr(model, "fused_towers", [])) | set(names))


def frozen_modules(model: nn.Module) -> list[str]:
    """Top-level groups whose parameters are all frozen."""
    groups: dict[str, bool] = {}
    for name, p in model.named_parameters():
        group = module_group(name)
        groups[group] = groups.get(group, False) or p.requires_grad
    return [g for g, trainable in groups.items() if not trainable]


def count_parameters_by_group(model: nn.Module) -> dict[str, int]:
    """Total, image, text and trainable parameter counts (shared parameters once); total and trainable for a model
    without siclip's ``visual`` and ``text`` towers."""
    if not (hasattr(model, "visual") and hasattr(model, "text")):
        return {"total": count_parameters(model), "trainable": count_parameters(model, trainable_only=True)}
    return {
        "total": count_parameters(model),
        "image": count_parameters(model.visual),
        "text": count_parameters(model.text),
        "trainable": count_parameters(model, trainable_only=True),
    }
