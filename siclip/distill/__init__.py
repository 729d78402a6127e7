"""WIKD: the feature, contrastive-relation and interactive-contrastive distillation terms, the combined
SiCLIP objective, and the teachers (a frozen model, a cache, or open_clip)."""

from .objective import ObjectiveConfig, SiCLIPObjective
from .teacher import CachedTeacher, FrozenTeacher
from .terms import ContrastiveRelationDistillation, FeatureDistillation, InteractiveContrastiveLoss

__all__ = [
    "CachedTeacher", "ContrastiveRelationDistillation", "FeatureDistillation", "FrozenTeacher",
    "InteractiveContrastiveLoss", "ObjectiveConfig", "SiCLIPObjective",
]  # fmt: skip
