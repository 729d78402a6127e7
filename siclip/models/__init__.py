"""Models: MobileCLIP-S0 (image encoder MCi0, text encoder MCt) and SiCLIP, its SAS-P/shared student.

- :func:`create_model` / :func:`list_models`: named configurations (``mobileclip_s0``, ``siclip_s0``,
  ``mobileclip_tiny``, ``siclip_tiny``, ``clip_cnn_tiny``, ``clip_vit_tiny``, ``clip_vit_small``) stored as JSON data.
- :mod:`~siclip.models.towers`: image towers by family (MCi's hybrid, the pure CNN, siclip's ViT, any timm model).
- :func:`load_mobileclip_s0`: Apple's released checkpoint through a documented, strict key mapping;
  :func:`load_model` reads that layout or a siclip checkpoint, whichever the file is.
- :func:`build_siclip`: weight inheritance from a MobileCLIP teacher, with a report.
- :func:`reparameterize_model`: train-time branches → fused inference convolutions.
"""

from .checkpoint import (
    CheckpointMismatch, apple_key_to_siclip, convert_apple_state_dict, load_mobileclip_s0, load_model, siclip_key_to_apple, to_apple_state_dict,
)  # fmt: skip
from .clip import CLIP, CLIPOutput, ModelConfig, SiCLIPConfig
from .factory import create_model, get_model_config, list_models, load_checkpoint, register_model_config, save_checkpoint
from .fastvit import MCi, ImageConfig
from .loaded import LoadedClip
from .reparam import reparameterize_model
from .siclip import InheritanceReport, build_siclip, count_parameters_by_group, frozen_modules, fuse_frozen_towers, to_siclip
from .text import MCt, TextConfig
from .towers import TOWER_PRESETS, TimmTowerConfig, tower_preset
from .vit import ViTConfig, VisionTransformer

__all__ = [
    "CLIP", "CLIPOutput", "CheckpointMismatch", "ImageConfig", "InheritanceReport", "LoadedClip", "MCi", "MCt", "ModelConfig",
    "SiCLIPConfig", "TextConfig", "apple_key_to_siclip", "build_siclip", "convert_apple_state_dict", "count_parameters_by_group", "create_model",
    "frozen_modules", "fuse_frozen_towers", "get_model_config", "list_models", "load_checkpoint", "load_mobileclip_s0", "load_model",
    "register_model_config", "reparameterize_model", "save_checkpoint", "siclip_key_to_apple", "to_apple_state_dict", "to_siclip",
    "TOWER_PRESETS", "TimmTowerConfig", "ViTConfig", "VisionTransformer", "tower_preset",
]  # fmt: skip
