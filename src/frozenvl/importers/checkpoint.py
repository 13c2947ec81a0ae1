"""What the importers share: reading a transformers checkpoint's config, finding its tokenizer and
carrying its image preprocessing over to the standalone vision tower."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"


def read_checkpoint_config(src_dir: str, model_type: str, name: str, config_class: Any) -> Any:
    """`config_class.from_pretrained(src_dir)` after checking that `src_dir` is a local checkpoint
    directory whose config.json is valid JSON with `model_type`; each failure is a ValueError naming it."""
    article = "an" if name[:1] in "AEIOU" else "a"
    if not os.path.isdir(src_dir):
        raise ValueError(f"{src_dir} is not a directory: expected a local {name} checkpoint directory")
    path = os.path.join(src_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{src_dir} has no config.json: expected a transformers {name} checkpoint directory")
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    found = raw.get("model_type") if isinstance(raw, dict) else None
    if found != model_type:
        raise ValueError(
            f"{src_dir} is not {article} {name} checkpoint: its config.json has model_type {found!r}, "
            f"expected {model_type!r}"
        )
    return config_class.from_pretrained(src_dir)


def has_tokenizer(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES)


def copy_preprocessor_config(src_dir: str, vision_dir: str) -> None:
    """The image preprocessing of `src_dir` (preprocessor_config.json, or the image processor nested in
    transformers v5's processor_config.json) into `vision_dir`; nothing (a warning if unreadable) else."""
    target = os.path.join(vision_dir, PREPROCESSOR_FILE)
    legacy = os.path.join(src_dir, PREPROCESSOR_FILE)
    if os.path.isfile(legacy):
        shutil.copyfile(legacy, target)
        return
    combined = os.path.join(src_dir, PROCESSOR_FILE)  # transformers v5 nests the image processor here
    if os.path.isfile(combined):
        try:
            with open(combined, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            warnings.warn(f"{combined}: cannot read ({e}); no preprocessor config copied", stacklevel=3)
            return
        image_processor = data.get("image_processor") if isinstance(data, dict) else None
        if isinstance(image_processor, dict):
            with open(target, "w", encoding="utf-8") as f:
                json.dump(image_processor, f, indent=2)
                f.write("\n")
