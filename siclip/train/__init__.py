"""Training: configuration dataclasses, the training task (student + objective + teacher), the loop."""

from .config import DataConfig, TrainConfig
from .loop import NonFiniteLoss, build_task, train, warmup_cosine
from .task import TrainingTask

__all__ = ["DataConfig", "NonFiniteLoss", "TrainConfig", "TrainingTask", "build_task", "train", "warmup_cosine"]
