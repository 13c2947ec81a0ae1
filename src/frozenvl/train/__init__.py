"""Training: staged, frozen-base, crash-safe, multi-process (accelerate)."""

from .config import DataConfig, StageConfig, TrainConfig
from .trainer import Trainer, TrainResult, train

__all__ = ["DataConfig", "StageConfig", "TrainConfig", "TrainResult", "Trainer", "train"]
