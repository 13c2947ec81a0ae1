"""Training configs: what to train (a workflow on a base), on what data, in which stages.

A YAML file (or dict) like::

    llm: path/or/hub-id
    vision: path/or/hub-id
    output_dir: runs/mm
    workflow: {name: mm, family: inner_adaptor, layers: [0, 1]}
    data: {train: data/train.json, max_length: 512}
    stages:
      - {name: align, train: [connector], lr: 1.0e-3, epochs: 1, batch_size: 8}
      - {name: tune, train: [connector, adapter], lr: {connector: 2.0e-5, adapter: 1.0e-4}, epochs: 1}
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import yaml

from ..config import ConfigError, _check_keys

SCHEDULES = ("cosine", "constant", "linear")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SKIP_POLICIES = ("skip", "error")
TRUNCATION = ("skip", "truncate")
GROUPING = ("none", "modality_length")
LOSS_WEIGHTING = ("token", "sample")


def _choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{what} {value!r} is not one of {list(allowed)}")


@dataclass
class DataConfig:
    train: str
    image_root: str | None = None
    max_length: int | None = 2048
    truncation: str = "skip"  # an over-long sample: drop it ("skip") or cut it ("truncate")
    on_bad_sample: str = "skip"  # missing/broken image, bad format: "skip" and count, or "error"
    group_by: str = "none"
    # MiB of frozen vision features kept per process, so that an image is read and encoded once per
    # run (0: off); only for workflows that read plain vision-tower features (FrozenVLModel.caches_vision_features)
    feature_cache_mb: int = 1024

    def validate(self) -> None:
        if isinstance(self.feature_cache_mb, bool) or not isinstance(self.feature_cache_mb, int) or self.feature_cache_mb < 0:
            raise ConfigError(f"data.feature_cache_mb must be an integer >= 0 (MiB; 0 turns it off), got {self.feature_cache_mb!r}")
        _choice(self.truncation, TRUNCATION, "data.truncation")
        _choice(self.on_bad_sample, SKIP_POLICIES, "data.on_bad_sample")
        _choice(self.group_by, GROUPING, "data.group_by")


@dataclass
class StageConfig:
    name: str
    train: list[str]  # part names of the family ("connector", "adapter", ...) or fnmatch patterns
    lr: float | dict[str, float] = 1e-4
    epochs: float | None = None
    steps: int | None = None
    batch_size: int = 8  # per process, per micro step
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0

    def validate(self) -> None:
        _choice(self.schedule, SCHEDULES, f"stage {self.name!r} schedule")
        if (self.epochs is None) == (self.steps is None):
            raise ConfigError(f"stage {self.name!r}: give exactly one of epochs or steps")
        if not self.train:
            raise ConfigError(f"stage {self.name!r}: 'train' lists nothing to train")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError(f"stage {self.name!r}: batch_size and grad_accum must be >= 1")


@dataclass
class TrainConfig:
    llm: str
    output_dir: str
    workflow: dict[str, Any]
    data: DataConfig
    stages: list[StageConfig]
    vision: str | None = None
    init_from: str | None = None  # a frozenvl model dir holding the workflow to continue from
    seed: int = 0
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    save_every: int = 500  # optimizer steps; 0 = only at stage ends
    keep_last: int = 2
    log_every: int = 10
    tensorboard: bool = False
    dtype: str | None = None  # base weights' dtype when loading
    # How label tokens weigh in a step's loss (docs/training.md, "Loss weighting"): "token" (every
    # label token alike) or "sample" (every sample alike, however long its answer); times the
    # sample's task weight (its record's "task" key) and its own "loss_weight".
    loss_weighting: str = "token"
    task_weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            _check_keys(DataConfig, self.data, "data")
            self.data = DataConfig(**self.data)
        stages = []
        for k, st in enumerate(self.stages or []):
            if isinstance(st, dict):
                st = dict(st)
                st.setdefault("name", f"stage{k + 1}")
                _check_keys(StageConfig, st, f"stages[{k}]")
                if isinstance(st.get("train"), str):
                    st["train"] = [st["train"]]
                st = StageConfig(**st)
            stages.append(st)
        self.stages = stages
        self.validate()

    @property
    def workflow_name(self) -> str:
        return self.workflow.get("name", "mm")

    def workflow_config(self) -> dict[str, Any]:
        return {k: v for k, v in self.workflow.items() if k != "name"}

    def validate(self) -> None:
        _choice(self.precision, PRECISIONS, "precision")
        _choice(self.loss_weighting, LOSS_WEIGHTING, "loss_weighting")
        if self.task_weights is not None:
            if not isinstance(self.task_weights, dict) or not self.task_weights:
                raise ConfigError(f"task_weights must be a non-empty mapping task -> weight, got {self.task_weights!r}")
            for task, w in self.task_weights.items():
                if (not isinstance(task, str) or isinstance(w, bool) or not isinstance(w, (int, float))
                        or not math.isfinite(w) or w <= 0):
                    raise ConfigError(f"task_weights[{task!r}] must be a finite number > 0, got {w!r}")
        if not self.stages:
            raise ConfigError("the config has no stages: give at least one under 'stages'")
        if not isinstance(self.workflow, dict) or ("family" not in self.workflow and not self.init_from):
            raise ConfigError("'workflow' must be a dict with a 'family' (or give init_from)")
        if self.init_from and set(self.workflow) - {"name"}:
            raise ConfigError(
                f"with init_from the workflow's config comes from {self.init_from}: give only its 'name', "
                f"not {sorted(set(self.workflow) - {'name'})}"
            )
        self.data.validate()
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be distinct, got {names}")
        for st in self.stages:
            st.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a training config is a mapping, got {type(data).__name__}")
        _check_keys(cls, data, "training config")
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ConfigError(f"training config: missing required key(s) {missing}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from e
        base = os.path.dirname(os.path.abspath(path))
        cfg = cls.from_dict(data)
        # Relative data paths are relative to the config file; so are model paths that exist there
        # (anything else may be a hub id). output_dir stays relative to the working directory.
        if not os.path.isabs(cfg.data.train):
            cfg.data.train = os.path.join(base, cfg.data.train)
        if cfg.data.image_root and not os.path.isabs(cfg.data.image_root):
            cfg.data.image_root = os.path.join(base, cfg.data.image_root)
        for key in ("llm", "vision", "init_from"):
            value = getattr(cfg, key)
            if value and not os.path.isabs(value) and os.path.exists(os.path.join(base, value)):
                setattr(cfg, key, os.path.join(base, value))
        return cfg

