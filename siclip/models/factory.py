"""Named model configurations (JSON files in ``configs/``, as open_clip keeps them), the factory and
the package's own checkpoints.

    create_model("siclip_tiny", text={"layers": 2}, siclip={"sharing": "none"})
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from siclip.storage import CheckpointError, load_weights, save_atomic

from .clip import CLIP, ModelConfig
from .siclip import fuse_towers, to_siclip
from .towers import tower_preset

CONFIG_DIR = Path(__file__).parent / "configs"
_REGISTRY: dict[str, ModelConfig] = {}


def _load_builtin() -> None:
    for path in sorted(CONFIG_DIR.glob("*.json")):
        config = ModelConfig.from_dict(json.loads(path.read_text()))
        _REGISTRY.setdefault(config.name, config)


def register_model_config(config: ModelConfig) -> None:
    """Add a named configuration (e.g. from a user's JSON) to the registry."""
    _REGISTRY[config.name] = config


def list_models() -> list[str]:
    if not _REGISTRY:
        _load_builtin()
    return sorted(_REGISTRY)


def _switches_family(image: dict, value) -> bool:
    """Whether an ``image`` override names another tower: a preset's name, or a section whose ``family`` differs."""
    if isinstance(value, str):
        return True
    return isinstance(value, dict) and "family" in value and value["family"] != image.get("family", "mci")


def get_model_config(name: str, **overrides) -> ModelConfig:
    """The registered configuration ``name`` with ``overrides`` (a dict updates a nested section).

    ``image`` may name another tower: a preset (``"vit_tiny"``, ``"cnn_tiny"``, ``"timm:resnet18"``;
    :data:`~siclip.models.towers.TOWER_PRESETS`) or a section with another ``family``; it then replaces the image
    section (that family's defaults fill the rest) and the model takes that tower's pixels (a timm model's own)."""
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; registered models: {list_models()}")
    data = _REGISTRY[name].to_dict()
    for key, value in overrides.items():
        if key not in data:
            raise ValueError(f"unknown model config field {key!r}; fields: {sorted(data)}")
        if key == "image" and _switches_family(data["image"], value):
            # Another tower (a preset's name, or a section of another family): its own defaults, and its own pixels
            # unless the overrides give some.
            data["image"] = tower_preset(value) if isinstance(value, str) else dict(value)
            if "preprocess" not in overrides:
                data.pop("preprocess", None)
        elif isinstance(value, dict) and isinstance(data[key], dict):
            unknown = set(value) - set(data[key])
            if unknown:
                raise ValueError(f"unknown {key} config field(s) {sorted(unknown)}; fields: {sorted(data[key])}")
            if key == "image" and value.get("model_name", data[key].get("model_name")) != data[key].get("model_name"):
                if "preprocess" not in overrides:  # another timm model: its own pixels
                    data.pop("preprocess", None)
            data[key] = {**data[key], **value}
        elif isinstance(value, dict) and key == "siclip":  # a MobileCLIP config made into a student
            from dataclasses import asdict

            from .clip import SiCLIPConfig

            data[key] = {**asdict(SiCLIPConfig()), **value}
        else:
            data[key] = value
    return ModelConfig.from_dict(data)


def create_model(name: str | ModelConfig, **overrides) -> CLIP:
    """Build a model from a registered name (or a config). A config with a ``siclip`` section gives
    a SAS-P/shared student built from scratch (nothing frozen); use
    :func:`~siclip.models.siclip.build_siclip` to inherit a teacher's weights."""
    config = name if isinstance(name, ModelConfig) else get_model_config(name, **overrides)
    model = CLIP(config)
    if config.siclip is not None:
        to_siclip(model, config.siclip, freeze=False, inherited=False)
    return model


def save_checkpoint(model: CLIP, path: str | Path, **extra) -> Path:
    """Config + weights (+ ``extra``), written atomically (:func:`siclip.storage.save_atomic`): never half a file."""
    payload = {"format": "siclip-model-1", "config": model.config.to_dict(), "state_dict": model.state_dict(),
               "fused_towers": list(getattr(model, "fused_towers", [])), **extra}  # fmt: skip
    return save_atomic(payload, path)


MODEL_FILE_HINT = "pass a model.pt written by siclip (train.py, import_mobileclip.py)"


def load_checkpoint(path: str | Path, map_location="cpu") -> CLIP:
    """A model saved by :func:`save_checkpoint`, rebuilt from its config (weights-only loading,
    :func:`siclip.storage.load_weights`; a file it cannot use raises ``CheckpointError`` naming it)."""
    path = Path(path)
    model = checkpoint_model(load_weights(path, what="model checkpoint", hint=MODEL_FILE_HINT), path)
    return model.to(map_location) if map_location != "cpu" else model


def checkpoint_model(payload, path: str | Path) -> CLIP:
    """The model a loaded :func:`save_checkpoint` payload holds (``path`` names it in errors and warnings)."""
    if not isinstance(payload, dict) or payload.get("format") != "siclip-model-1":
        raise CheckpointError(f"{path} is not a siclip model checkpoint (load_model reads Apple's MobileCLIP-S0 layout too); "
                              f"{MODEL_FILE_HINT}")  # fmt: skip
    if not isinstance(payload.get("config"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"{path} is a damaged siclip model checkpoint: it lacks its config or state_dict; {MODEL_FILE_HINT}")
    if "preprocess" not in payload["config"]:
        warnings.warn(f"{path} was saved before models carried their preprocessing: it loads with CLIP's mean and std "
                      "(the normalisation every siclip model was trained and evaluated with until then)", stacklevel=3)  # fmt: skip
    try:
        config = ModelConfig.from_dict(payload["config"])
        divergence = payload.get("sharing_divergence")  # the divergences a measured plan (threshold, optimal) was chosen from
        if divergence is not None and config.siclip is not None:
            import numpy as np

            model = CLIP(config)
            to_siclip(model, config.siclip, divergence={t: np.asarray(d, dtype=np.float64) for t, d in divergence.items()},
                      freeze=False, inherited=False)  # fmt: skip
        else:
            model = create_model(config)
        fuse_towers(model, payload.get("fused_towers", []))  # rebuild the fused layout, then load its weights
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # a config or weights this code cannot build
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise CheckpointError(f"{path}: its config or weights do not build a model ({type(err).__name__}: {first}); "
                              f"{MODEL_FILE_HINT}") from None  # fmt: skip
    return model
