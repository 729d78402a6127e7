"""Image towers by family: one registry, one builder, every tower's configuration plain data.

| family | configuration | tower |
|---|---|---|
| ``mci`` | :class:`~siclip.models.fastvit.ImageConfig` | MobileCLIP's MCi: RepMixer stages and an attention stage (the hybrid); with every token mixer ``"repmixer"`` the pure-CNN tower (MCi's stem and RepMixer stages, no attention, reparameterisable the same way) |
| ``vit`` | :class:`~siclip.models.vit.ViTConfig` | siclip's ViT (Pre-LN or SAS-P blocks, a ``patch_dropout`` slot for FLIP) |
| ``timm`` | :class:`TimmTowerConfig` | any timm image model with ``num_classes=0`` and a linear projection to the embedding, as open_clip's ``TimmModel`` builds it (registered by :mod:`siclip.interop.timm`, the only module that imports timm) |

A configuration's ``family`` field names its family; a dictionary without one is MCi's, so every configuration and
checkpoint written before families existed loads unchanged. Named tower presets (:data:`TOWER_PRESETS`, and
``timm:NAME`` for any timm model) are what ``siclip train --image-tower`` and a model JSON's ``"image": "vit_tiny"`` name.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from siclip.data.transforms import Preprocess
from siclip.errors import require

from .fastvit import MCi, ImageConfig
from .vit import ViTConfig, VisionTransformer


@dataclass(frozen=True)
class TimmTowerConfig:
    """Any timm image model as the image tower: ``timm.create_model(model_name, pretrained=False, num_classes=0,
    global_pool=pool, **kwargs)`` (nothing downloaded), its pooled features projected to the embedding.

    ``image_size`` is the input the tower is fed; a model whose constructor takes ``img_size`` (ViTs) is built for it,
    a convolutional one takes any size. ``pool`` None keeps the model's own global pooling. The pixels are the
    model's own (its ``pretrained_cfg``'s mean, std and interpolation), filled into the model's preprocess."""

    model_name: str = "resnet18"
    image_size: int = 64
    kwargs: dict = field(default_factory=dict)
    pool: str | None = None
    proj_bias: bool = False  # open_clip's TimmModel default: a linear projection without bias
    family: str = "timm"


@dataclass(frozen=True)
class ImageFamily:
    """A family's configuration class, its builder ``build(config, embed_dim) -> nn.Module`` and its pixels
    ``preprocess(config) -> Preprocess | None`` (None: the model config's own, CLIP's mean and std by default).
    ``library``: the foreign library whose :mod:`siclip.interop` module registers ``build`` the first time it is needed."""

    config: type
    build: Callable | None = None
    preprocess: Callable | None = None
    library: str | None = None


FAMILIES: dict[str, ImageFamily] = {
    "mci": ImageFamily(ImageConfig, MCi),
    "vit": ImageFamily(ViTConfig, VisionTransformer),
    "timm": ImageFamily(TimmTowerConfig, library="timm"),
}

# MobileCLIP-tiny's image tower (mobileclip_tiny.json, tested equal), the same stages as a pure CNN, and two ViTs scaled
# to the embedded world: ViT-Ti's and ViT-S's head counts (3, 6) at a head width of 32 instead of 64 and 6 blocks
# instead of 12, patches of 8 pixels (an 8×8 grid at 64 px). ViT-Ti/16 itself: {"family": "vit", "width": 192,
# "layers": 12, "heads": 3, "patch_size": 16, "image_size": 224}.
_MCI_TINY = {"family": "mci", "layers": [1, 1, 2, 2], "dims": [16, 32, 64, 128], "mlp_ratio": 3.0, "head_dim": 32, "image_size": 64}
TOWER_PRESETS: dict[str, dict] = {
    "mci_tiny": _MCI_TINY,
    "cnn_tiny": {**_MCI_TINY, "token_mixers": ["repmixer"] * 4},
    "vit_tiny": {"family": "vit", "image_size": 64, "patch_size": 8, "width": 96, "layers": 6, "heads": 3},
    "vit_small": {"family": "vit", "image_size": 64, "patch_size": 8, "width": 192, "layers": 6, "heads": 6},
}
TIMM_PREFIX = "timm:"


def register_image_family(name: str, config: type, build: Callable, preprocess: Callable | None = None) -> None:
    """Add (or complete) a family: what :mod:`siclip.interop.timm` calls for ``timm``."""
    FAMILIES[name] = ImageFamily(config, build, preprocess, FAMILIES[name].library if name in FAMILIES else None)


def _family(name: str) -> ImageFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown image tower family {name!r}; families: {sorted(FAMILIES)}")
    family = FAMILIES[name]
    if family.build is None and family.library is not None:  # its interop module registers the builder on import
        require(family.library, family.library, f"the {name!r} image tower")
        importlib.import_module(f"siclip.interop.{family.library}")
        family = FAMILIES[name]
    return family


def tower_preset(name: str) -> dict:
    """The image section a tower preset names: one of :data:`TOWER_PRESETS`, or ``timm:NAME`` (any timm model)."""
    if name.startswith(TIMM_PREFIX) and name[len(TIMM_PREFIX) :]:
        return {"family": "timm", "model_name": name[len(TIMM_PREFIX) :]}
    if name not in TOWER_PRESETS:
        raise ValueError(f"unknown image tower {name!r}; towers: {', '.join(sorted(TOWER_PRESETS))}, or timm:NAME (any timm model)")
    return dict(TOWER_PRESETS[name])


def image_fields(family: str) -> set[str]:
    """The configuration fields of a family (``family`` included)."""
    return {f.name for f in dataclasses.fields(_family_config(family))}


def _family_config(name: str) -> type:
    if name not in FAMILIES:
        raise ValueError(f"unknown image tower family {name!r}; families: {sorted(FAMILIES)}")
    return FAMILIES[name].config


def image_config_from_dict(data: dict | str):
    """A family's configuration from its dictionary (lists become tuples, except inside ``kwargs``), or from a tower
    preset's name; no ``family`` means ``mci``. Unknown fields raise a ``ValueError`` naming them."""
    data = tower_preset(data) if isinstance(data, str) else data
    family = data.get("family", "mci")
    config = _family_config(family)
    known = image_fields(family)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {family} image config field(s) {unknown}; fields: {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) and k != "kwargs" else v for k, v in data.items()}
    return config(**values)


def build_image_tower(config, embed_dim: int) -> nn.Module:
    """The image tower a configuration describes, projecting to ``embed_dim``."""
    return _family(config.family).build(config, embed_dim)


def family_preprocess(config) -> Preprocess | None:
    """The pixels a tower family prescribes (a timm model's own mean, std and interpolation), or None."""
    family = _family(config.family)
    return family.preprocess(config) if family.preprocess is not None else None
