"""Model directories: frozenvl.json + one safetensors file per workflow holding only its own weights."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .vision.mixed import map_paths

if TYPE_CHECKING:
    from .families.base import Family
    from .model import FrozenVLModel

WEIGHTS_PATTERN = "workflow-{name}.safetensors"


def weights_path(directory: str | os.PathLike, name: str) -> str:
    return os.path.join(directory, WEIGHTS_PATTERN.format(name=name))


def save_model(model: FrozenVLModel, directory: str | os.PathLike, tasks: Sequence[str] | None = None) -> None:
    """Write frozenvl.json and one safetensors file per workflow (all of them, or `tasks`)."""
    os.makedirs(directory, exist_ok=True)
    names = list(tasks) if tasks is not None else list(model.workflows.keys())
    for name in names:
        state = {k: v.contiguous().cpu() for k, v in model.workflow(name).owned_state_dict().items()}
        save_file(state, weights_path(directory, name), metadata={"format": "pt"})
    cfg = ModelConfig.from_dict(model.config.to_dict())
    cfg.workflows = {n: cfg.workflows[n] for n in names}
    # Base models stored inside the model dir are recorded relative to it, so the dir can move.
    cfg.llm = relative_to(cfg.llm, directory)
    cfg.vision = map_paths(cfg.vision, lambda p: relative_to(p, directory))  # one path, or each mixed encoder's
    cfg.save(directory)


def load_config(directory: str | os.PathLike) -> ModelConfig:
    """frozenvl.json of `directory`, with base paths recorded relative to it made absolute again."""
    cfg = ModelConfig.load(directory)
    cfg.llm = inside(cfg.llm, directory)
    cfg.vision = map_paths(cfg.vision, lambda p: inside(p, directory))
    return cfg


def relative_to(path: str | None, directory: str | os.PathLike) -> str | None:
    """`path` relative to `directory` when it lies inside it; else unchanged."""
    if path is None or not os.path.isabs(path):
        return path
    rel = os.path.relpath(path, os.path.abspath(directory))
    return rel if not rel.startswith("..") else path


def inside(path: str | None, directory: str | os.PathLike) -> str | None:
    """A relative `path` that names a folder inside `directory` -> that folder; else unchanged (a hub id)."""
    if path is None or os.path.isabs(path):
        return path
    local = os.path.join(os.path.abspath(directory), path)
    return local if os.path.isdir(local) else path


def load_weights(family: Family, path: str) -> None:
    """Copy the weights saved at `path` into `family`; the keys and shapes must match exactly."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} is missing")
    state = load_file(path, device=str(next(family.parameters()).device))
    expected = family.owned_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the workflow: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
    params = dict(family.named_parameters())
    with torch.no_grad():
        for key, tensor in state.items():
            params[key].copy_(tensor)
