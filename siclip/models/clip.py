"""The CLIP wrapper (Radford et al. 2021): two encoders, unit-norm features, a learnable temperature.

    f_img = MCi(x)/‖MCi(x)‖,  f_txt = MCt(t)/‖MCt(t)‖,  logits = exp(s)·f_img·f_txtᵀ,  s₀ = ln(1/0.07),  0 ≤ s ≤ ln 100

The bound on s is kept on the parameter, clamped in place after each optimiser step (open_clip's way), not
inside forward, where a scale at the bound would get a zero gradient and stay there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from siclip.data.transforms import Preprocess

from .fastvit import ImageConfig
from .stages import freeze_batchnorm_statistics
from .text import MCt, TextConfig
from .towers import TimmTowerConfig, build_image_tower, family_preprocess, image_config_from_dict
from .vit import ViTConfig

MAX_LOGIT_SCALE = math.log(100.0)  # bound of the logit_scale parameter s (exp(s) ≤ 100)


@dataclass(frozen=True)
class SiCLIPConfig:
    """How a MobileCLIP becomes a SiCLIP student (readings of the paper, see siclip.models.siclip).

    ``convert`` names the towers whose attention blocks become SAS-P blocks (``("text",)`` is the
    text-only ablation). ``sharing*`` plan the text blocks, ``image_sharing*`` the image blocks; a scope
    is ``"block"`` (whole blocks) or ``"attention"`` (W_Q, W_K and the shaped gains only).
    """

    convert: tuple[str, ...] = ("text", "image")
    sharing: str = "adjacent"
    sharing_threshold: float | None = None
    sharing_max_groups: int | None = None
    sharing_scope: str = "block"
    image_sharing: str = "adjacent"
    image_sharing_threshold: float | None = None
    image_sharing_max_groups: int | None = None
    image_sharing_scope: str = "attention"
    merge: str = "first"
    beta_ff: float = 0.1
    zero_query: bool = False
    freeze: str = "inherited"

    def tower_sharing(self, tower: str) -> dict:
        """``strategy, threshold, max_groups, scope`` of the named tower (``text`` or ``image``)."""
        prefix = {"text": "", "image": "image_"}[tower]
        return {key: getattr(self, f"{prefix}sharing{suffix}") for key, suffix in
                (("strategy", ""), ("threshold", "_threshold"), ("max_groups", "_max_groups"), ("scope", "_scope"))}  # fmt: skip

    def measured_towers(self) -> list[str]:
        """Converted towers whose sharing plan is chosen from measured divergences (threshold, optimal)."""
        return [t for t in self.convert if self.tower_sharing(t)["strategy"] in ("threshold", "optimal")]


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mobileclip_s0"
    embed_dim: int = 512
    image: ImageConfig | ViTConfig | TimmTowerConfig = field(default_factory=ImageConfig)  # by family (siclip.models.towers)
    text: TextConfig = field(default_factory=TextConfig)
    siclip: SiCLIPConfig | None = None
    # The model's pixels (size-free: the image tower's input size fills it in). Configurations written before
    # models carried it (no "preprocess" key) were all trained and evaluated with CLIP's mean and std.
    preprocess: Preprocess = field(default_factory=Preprocess)

    def to_dict(self) -> dict:
        return {**asdict(self), "preprocess": self.preprocess.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        def tuples(d: dict) -> dict:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

        known = {"name", "embed_dim", "image", "text", "siclip", "preprocess"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; expected {sorted(known)}")
        siclip = data.get("siclip")
        image = image_config_from_dict(data.get("image", {}))
        if "preprocess" in data:
            preprocess = Preprocess.from_dict(data["preprocess"])
        else:  # a tower with pixels of its own (a timm model's), else CLIP's
            preprocess = family_preprocess(image) or Preprocess()
        return cls(
            name=data.get("name", "custom"),
            embed_dim=data.get("embed_dim", 512),
            image=image,
            text=TextConfig(**tuples(data.get("text", {}))),
            siclip=SiCLIPConfig(**tuples(siclip)) if siclip is not None else None,
            preprocess=preprocess,
        )


class CLIPOutput(NamedTuple):
    image_features: Tensor
    text_features: Tensor
    logit_scale: Tensor


class CLIP(nn.Module):
    """MobileCLIP (and SiCLIP, its converted form): ``visual``, ``text`` and ``logit_scale``. The image tower is the
    one ``config.image``'s family builds (:mod:`siclip.models.towers`): MCi, the pure CNN, a ViT or a timm model."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = build_image_tower(config.image, config.embed_dim)
        self.text = MCt(config.text, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def set_grad_checkpointing(self, enable: bool = True, towers: tuple[str, ...] = ("image", "text")) -> None:
        """Activation checkpointing of the trainable blocks of the named towers (``image``, ``text``)."""
        unknown = set(towers) - {"image", "text"}
        if unknown:
            raise ValueError(f"unknown tower(s) {sorted(unknown)}; choose from ('image', 'text')")
        self.visual.set_grad_checkpointing(enable and "image" in towers)
        self.text.set_grad_checkpointing(enable and "text" in towers)

    def train(self, mode: bool = True) -> CLIP:
        """Training mode, except that frozen BatchNorm layers keep their inherited statistics."""
        super().train(mode)
        if mode:
            freeze_batchnorm_statistics(self)
        return self

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        # The encoder's frozen prefix (all of it, under weight inheritance) keeps no autograd graph.
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, ids: Tensor, normalize: bool = True) -> Tensor:
        features = self.text(ids)
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> Tensor:
        """exp(logit_scale); the parameter itself is kept in [0, ln 100] by the training step."""
        return self.logit_scale.exp()

    @property
    def preprocess(self) -> Preprocess:
        """The model's own pixels at its input size (``config.preprocess`` at ``config.image.image_size``)."""
        return self.config.preprocess.at(self.config.image.image_size)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def name(self) -> str:
        return self.config.name

    def forward(self, images: Tensor, ids: Tensor) -> CLIPOutput:
        return CLIPOutput(self.encode_image(images), self.encode_text(ids), self.scale())
