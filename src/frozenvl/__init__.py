"""frozenvl: give a pretrained language model sight without breaking what it already knows."""

from .config import ConfigError, ModelConfig, WorkflowConfig
from .families import FAMILIES
from .model import FrozenVLModel, load

build = FrozenVLModel.build

__all__ = ["FAMILIES", "ConfigError", "FrozenVLModel", "ModelConfig", "WorkflowConfig", "build", "load"]
__version__ = "0.1.0"
