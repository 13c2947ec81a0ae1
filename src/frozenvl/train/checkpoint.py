"""Crash-safe training checkpoints: written to a temp dir, then renamed; the last K kept.

A checkpoint is a frozenvl model dir (`frozenvl.json` and the workflow's own weights in the
base's dtype: `frozenvl.load` opens it) plus what resuming needs: the fp32 master weights when
those differ in dtype (`master.safetensors`), the optimizer and scheduler states, every process's
RNG states and the position in the data (`state.json`). Torch files are read with
`weights_only=True`: nothing arbitrary is unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..model import WEIGHTS_PATTERN

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
MASTERS = "master.safetensors"  # fp32 master weights (only when the workflow's own dtype is not fp32)


@dataclass
class Position:
    """Where training is: stage index, epoch in the stage, optimizer steps done in that epoch."""

    stage: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    stage_step: int = 0  # optimizer steps done in this stage
    global_step: int = 0
    tokens: int = 0  # label tokens trained on so far


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (half-written temp dirs are ignored)."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith(PREFIX) and os.path.isfile(os.path.join(root, n, "state.json"))]
    return [os.path.join(root, n) for n in sorted(names)]


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_to_saveable(state: dict[str, Any]) -> dict[str, Any]:
    # weights_only loading accepts tensors, lists, tuples, dicts, str and numbers: convert numpy's state.
    np_state = state["numpy"]
    out = dict(state)
    out["numpy"] = (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:])
    out["python"] = (state["python"][0], list(state["python"][1]), state["python"][2])
    return out


def _rng_from_saved(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    n = state["numpy"]
    out["numpy"] = (n[0], n[1].numpy(), *n[2:])
    p = state["python"]
    out["python"] = (p[0], tuple(p[1]), p[2])
    return out


def begin(output_dir: str, global_step: int) -> str:
    """Create the temp dir of a new checkpoint (main process)."""
    tmp = os.path.join(checkpoint_root(output_dir), f"{TMP_PREFIX}{PREFIX}{global_step:08d}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def write_main(tmp: str, masters: dict[str, torch.Tensor] | None, optimizer, scheduler, position: Position,
               extra: dict[str, Any]) -> None:
    """Everything but the model dir itself; `masters`: the fp32 weights, when the model dir's are not fp32."""
    if masters is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in masters.items()}, os.path.join(tmp, MASTERS))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    with open(os.path.join(tmp, "extra.json"), "w") as f:
        json.dump(extra, f, indent=1)
    # state.json is written last: its presence marks the content complete.
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(asdict(position), f)


def write_rng(tmp: str, rank: int) -> None:
    torch.save(_rng_to_saveable(rng_state()), os.path.join(tmp, f"rng-{rank}.pt"))


def commit(tmp: str, keep_last: int) -> str:
    """Atomically publish the temp dir and drop checkpoints beyond the last `keep_last`."""
    final = os.path.join(os.path.dirname(tmp), os.path.basename(tmp)[len(TMP_PREFIX):])
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    output_dir = os.path.dirname(os.path.dirname(final))
    ckpts = list_checkpoints(output_dir)
    for old in ckpts[: max(0, len(ckpts) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read(path: str, rank: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    with open(os.path.join(path, "state.json")) as f:
        position = Position(**json.load(f))
    with open(os.path.join(path, "extra.json")) as f:
        extra = json.load(f)
    rng_file = os.path.join(path, f"rng-{rank}.pt")
    masters = os.path.join(path, MASTERS)
    weights = masters if os.path.isfile(masters) else os.path.join(path, WEIGHTS_PATTERN.format(name=extra["task"]))
    return {
        "position": position,
        "extra": extra,
        "weights": load_file(weights, device=str(device)),
        "optimizer": torch.load(os.path.join(path, "optimizer.pt"), map_location=device, weights_only=True),
        "scheduler": torch.load(os.path.join(path, "scheduler.pt"), weights_only=True),
        "rng": _rng_from_saved(torch.load(rng_file, weights_only=True)) if os.path.isfile(rng_file) else None,
    }
