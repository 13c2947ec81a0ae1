"""Plain dataclass configs that round-trip through JSON.

A model config names the base LLM and vision encoder (hub id or local dir) and holds one workflow
config per named workflow. Each family defines its own workflow config class (a subclass of
:class:`WorkflowConfig`) with its extra fields; unknown keys and unknown families are errors that
list what exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "frozenvl.json"
FORMAT_VERSION = 1
RESERVED_TASKS = ("text",)
LLM_TRAIN_MODES = ("frozen", "full", "lora")
IMAGE_MODES = ("pad", "resize")


class ConfigError(ValueError):
    """A config value or key is wrong; the message says which and what is allowed."""


# Families whose connector (if any) never sees the patch grid, so a token-reducing one cannot apply.
_NO_TOKEN_GRID_CONNECTOR = {
    "adaption_prompt": "pools each image to one vector (visual v1) or reads it with learned queries (v2)",
    "bind": "pools each image to one vector for its bind network",
    "cross_attention": "reads the vision features with its resampler and cross-attention, not a connector",
}


def _check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")


@dataclass
class WorkflowConfig:
    """Fields every multimodal workflow has, whatever its family."""

    family: str
    # "linear" | "mlpNx_gelu" | "pixel_shuffle[:factor=F,depth=D]" | "avg_pool[:factor=F,depth=D]" (vision/connectors.py)
    connector: str = "mlp2x_gelu"
    select_layer: int = -2  # which vision hidden state feeds the connector
    keep_cls: bool = False  # keep the CLS token (LLaVA's "full" select strategy) instead of patches only
    image_mode: str = "pad"  # "pad" (LLaVA: pad to square with the mean colour) | "resize"
    llm_train: str = "frozen"  # "frozen" | "full" (LLaVA fine-tuned baseline) | "lora"
    lora_rank: int = 8
    lora_alpha: int = 16
    # A generate/chat request without any image runs the untouched base (the `text` workflow), so a
    # frozen-LLM workflow never changes text-only answers. None: on when llm_train is "frozen".
    text_fallback: bool | None = None
    # High resolution (vision/tiling.py, docs/vision.md): None (one encoder-sized view per image) |
    # "dynamic" (InternVL: up to max_tiles tiles + a thumbnail) | "anyres" (LLaVA-NeXT: a global view +
    # the tiles of the best of grid_pinpoints). Only for families that splice image tokens into the sequence.
    tiling: str | None = None
    max_tiles: int = 12
    min_tiles: int = 1
    use_thumbnail: bool = True  # dynamic: the whole image as one more tile, after the others
    grid_pinpoints: list[list[int]] | None = None  # anyres: (height, width) canvases; None: every grid <= max_tiles
    unpad: bool = True  # anyres: LLaVA-NeXT's spatial unpadding of the joined tile-token map
    image_newline: bool = False  # anyres: a learned token after each row (of the token map, or of tiles)
    skip_token: bool = False  # anyres without unpad: an all-padding tile is not encoded but one learned token
    max_image_tokens: int | None = None  # refuse an image that would take more placeholder slots
    # Grounding with location tokens (families/vocab.py, docs/training.md): N tokens <loc_00>.. added to
    # the tokenizer, with embedding and head rows the workflow owns; train on data in box format loc<N>.
    location_tokens: int = 0

    def validate(self) -> None:
        if self.image_mode not in IMAGE_MODES:
            raise ConfigError(f"image_mode {self.image_mode!r} is not one of {list(IMAGE_MODES)}")
        if self.llm_train not in LLM_TRAIN_MODES:
            raise ConfigError(f"llm_train {self.llm_train!r} is not one of {list(LLM_TRAIN_MODES)}")
        from .vision.connectors import check_connector_name, is_token_reducing

        if self.text_fallback is None:
            self.text_fallback = self.llm_train == "frozen"

        self._validate_tiling()
        from .data.boxes import MAX_BINS

        if self.location_tokens and not 2 <= self.location_tokens <= MAX_BINS:
            raise ConfigError(f"location_tokens must be 0 (none) or in 2..{MAX_BINS}, got {self.location_tokens}")
        try:
            check_connector_name(self.connector)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if is_token_reducing(self.connector) and self.family in _NO_TOKEN_GRID_CONNECTOR:
            raise ConfigError(
                f"connector {self.connector!r} merges patch tokens, but {self.family} "
                f"{_NO_TOKEN_GRID_CONNECTOR[self.family]}: use linear or mlpNx_gelu"
            )

    def _validate_tiling(self) -> None:
        from .vision.tiling import TILING_MODES

        if self.tiling is not None and self.tiling not in TILING_MODES:
            raise ConfigError(f"tiling {self.tiling!r} is not one of {[None, *TILING_MODES]}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ConfigError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={self.min_tiles}, max_tiles={self.max_tiles}")
        if self.max_image_tokens is not None and self.max_image_tokens < 1:
            raise ConfigError(f"max_image_tokens must be a positive int or null, got {self.max_image_tokens}")
        anyres_only = [k for k in ("image_newline", "skip_token") if getattr(self, k)]
        if self.grid_pinpoints is not None:
            anyres_only.append("grid_pinpoints")
        if anyres_only and self.tiling != "anyres":
            raise ConfigError(f"{', '.join(anyres_only)} need tiling: anyres (tiling is {self.tiling!r})")
        if self.skip_token and self.unpad:
            raise ConfigError("skip_token and unpad both drop padding: set unpad: false to use skip tokens")
        if self.grid_pinpoints is not None and (
            not self.grid_pinpoints or any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in self.grid_pinpoints)
        ):
            raise ConfigError(f"grid_pinpoints must be a non-empty list of [height, width], got {self.grid_pinpoints!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_workflow(name: str, data: dict[str, Any] | WorkflowConfig) -> WorkflowConfig:
    """Turn a plain dict (as users write it, or as read from JSON) into its family's config class."""
    from .families import get_family

    if name in RESERVED_TASKS:
        raise ConfigError(f"workflow name {name!r} is reserved: the {name!r} workflow is the untouched base LLM")
    if isinstance(data, WorkflowConfig):
        cfg = data
    else:
        if not isinstance(data, dict) or "family" not in data:
            raise ConfigError(f"workflow {name!r}: expected a dict with a 'family' key, got {data!r}")
        family_cls = get_family(data["family"])
        _check_keys(family_cls.config_class, data, f"workflow {name!r} (family {data['family']!r})")
        cfg = family_cls.config_class(**data)
    cfg.validate()
    return cfg


@dataclass
class ModelConfig:
    """What `frozenvl.json` holds: the base models by id/path and the workflows."""

    llm: str
    vision: str | list[str | dict[str, Any]] | None = None  # a list: mixed encoders (vision/mixed.py)
    workflows: dict[str, WorkflowConfig] = field(default_factory=dict)
    dtype: str | None = None  # e.g. "bfloat16"; None keeps the checkpoint's own dtype
    attn_implementation: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        from .vision.mixed import is_single, parse_vision

        if self.vision is not None and not is_single(self.vision):
            try:
                parse_vision(self.vision)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.workflows = {name: parse_workflow(name, wf) for name, wf in self.workflows.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "llm": self.llm,
            "vision": self.vision,
            "dtype": self.dtype,
            "attn_implementation": self.attn_implementation,
            "workflows": {name: wf.to_dict() for name, wf in self.workflows.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        _check_keys(cls, data, CONFIG_NAME)
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ConfigError(
                f"{CONFIG_NAME} has format_version {version}; this frozenvl reads up to {FORMAT_VERSION}: upgrade frozenvl"
            )
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ModelConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: is {directory!s} a frozenvl model directory?")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)
