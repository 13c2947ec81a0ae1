"""frozenvl: give a pretrained language model sight without breaking what it already knows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ConfigError, ModelConfig, WorkflowConfig

if TYPE_CHECKING:
    from .families import FAMILIES
    from .model import FrozenVLModel, load

__all__ = ["FAMILIES", "ConfigError", "FrozenVLModel", "ModelConfig", "WorkflowConfig", "build", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The model and the families (transformers, every family module) load on first use, so that light
    # modules such as frozenvl.data.prompt or frozenvl.constants import in milliseconds.
    if name in ("FrozenVLModel", "load", "build"):
        from . import model

        return model.FrozenVLModel.build if name == "build" else getattr(model, name)
    if name == "FAMILIES":
        from .families import FAMILIES

        return FAMILIES
    raise AttributeError(f"module 'frozenvl' has no attribute {name!r}")
