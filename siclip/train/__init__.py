"""Training: configuration dataclasses, the training task (student + objective + teacher), the loop."""

from .config import DataConfig, TrainConfig
from .guard import NonFiniteLoss, TrainingInterrupted
from .loop import build_task, train, train_or_continue, warmup_cosine
from .state import CheckpointError, RunDirectoryBusy
from .task import TrainingTask

__all__ = ["CheckpointError", "DataConfig", "NonFiniteLoss", "RunDirectoryBusy", "TrainConfig", "TrainingInterrupted", "TrainingTask",
           "build_task", "train", "train_or_continue", "warmup_cosine"]  # fmt: skip
