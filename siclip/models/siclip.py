"""SiCLIP: MobileCLIP with its Pre-LN text blocks turned into SAS-P blocks that share weights.

Readings (the paper leaves them open; ``paper_math.md`` §6):

- the four MCt transformer layers are converted (``convert=("text",)``), inheriting W_Q, W_K, the first
  LayerNorm and the MLP; W_V, W_P and the second LayerNorm go. The image encoder's two attention
  blocks are BatchNorm/layer-scale MetaFormer blocks whose SAS-P form needs design choices of its own
  and are left as they are.
- adjacent pairs share weights (``sharing="adjacent"``): with the conversion this removes 7.36 M of
  53.8 M parameters, the paper's "about 14 % smaller".
- weight inheritance copies every other module from the teacher and, with ``freeze="inherited"``,
  trains only the SAS-P blocks (the paper's setting).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from torch import nn

from siclip.blocks import SASPConversion, apply_sharing, convert_to_sasp, count_parameters, plan_sharing

from .clip import CLIP, SiCLIPConfig
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


def to_siclip(
    model: CLIP,
    config: SiCLIPConfig,
    *,
    divergence=None,
    freeze: bool = True,
    inherited: bool = True,
) -> InheritanceReport:
    """Turn ``model`` (a MobileCLIP) into a SiCLIP student in place and report what it inherited.

    ``divergence`` (adjacent or pairwise, measured between the teacher's text blocks) serves the
    ``threshold`` and ``optimal`` sharing strategies, with ``config.sharing_threshold`` or
    ``config.sharing_max_groups``.
    ``freeze`` applies ``config.freeze``; ``inherited=False`` marks every weight new (a student
    built from scratch).
    """
    unknown = set(config.convert) - {"text"}
    if unknown:
        raise NotImplementedError(
            f"converting {sorted(unknown)} is not supported: only the text encoder's Pre-LN blocks convert to SAS-P "
            "(the image encoder's attention blocks are BatchNorm/layer-scale MetaFormer blocks)"
        )
    if config.freeze not in FREEZE_POLICIES:
        raise ValueError(f"unknown freeze policy {config.freeze!r}; choose one of {FREEZE_POLICIES}")
    options = SASPConversion(beta_ff=config.beta_ff, zero_query=config.zero_query)
    blocks = model.text.transformer
    _, conversion = convert_to_sasp(blocks, options=options)
    new = {f"text.transformer.{r['module']}.{r['parameter']}" for r in conversion.rows if r["action"] == "new"}
    plan = plan_sharing(
        config.sharing, len(blocks), divergence, threshold=config.sharing_threshold, max_groups=config.sharing_max_groups
    )
    sharing = apply_sharing(blocks, plan, scope=config.sharing_scope, merge=config.merge)
    if freeze and config.freeze == "inherited":
        train_only(model, ("text.transformer.",))
    report = InheritanceReport(sharing=str(sharing))
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
    """Total, image, text and trainable parameter counts (shared parameters once)."""
    return {
        "total": count_parameters(model),
        "image": count_parameters(model.visual),
        "text": count_parameters(model.text),
        "trainable": count_parameters(model, trainable_only=True),
    }
