"""Small helpers the benchmark scripts share (run them as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

# Importing this module first keeps every benchmark off the hub and tokenizers' thread pool quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if TYPE_CHECKING:
    import torch

    from frozenvl.model import FrozenVLModel


def quiet() -> None:
    """No warnings, no transformers progress bars or info logs in the benchmark output."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def log(msg: str) -> None:
    """Progress messages go to stderr, so stdout holds only the results."""
    print(msg, file=sys.stderr, flush=True)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_average() -> tuple[float, float, float] | None:
    """The machine's load: benchmarks print it, since other work on the machine skews ratios."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def fmt_load(load: tuple[float, float, float] | None) -> str:
    return "n/a" if load is None else "/".join(f"{x:.1f}" for x in load)


def print_load_footer(t_start: float, load_start: tuple[float, float, float] | None, threads: int) -> None:
    """Total time and the load average at start and end; a warning when other work competed for the CPU."""
    import time

    load_end = load_average()
    print(f"total time {time.perf_counter() - t_start:.0f}s; load average (1/5/15 min) at start "
          f"{fmt_load(load_start)}, at end {fmt_load(load_end)}")
    busy = [load[1] for load in (load_start, load_end) if load is not None]  # 5-minute averages
    if busy and max(busy) > threads + 0.5:
        print(f"warning: other processes competed for the CPU (load average above the {threads} thread(s) used): "
              "timings are noisy; trust the 'best' columns, re-run with more --repeats or on an idle machine")


def print_table(title: str, headers: list[str], rows: list[list[str]], left: tuple[str, ...] = ()) -> None:
    """A rich table, wide enough for a log file; the first column and those in `left` align left."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="left" if h == headers[0] or h in left else "right")
    for line in rows:
        table.add_row(*line)
    Console(width=200).print(table)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) wall seconds of `repeats` calls of `fn` after one warm-up call (kernel
    selection, allocator, first touch of memory-mapped weights)."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def timed_train_steps(model: FrozenVLModel, task: str, inputs: dict, labels: torch.Tensor,
                      repeats: int) -> tuple[float, float]:
    """(best, median) seconds of one training step of workflow `task` (forward + backward + AdamW) in
    the trainer's precision discipline: fp32 master weights of the workflow and bf16 autocast when the
    model was built in bf16, plain fp32 otherwise. Afterwards the model is in eval mode, its weights
    back in the dtype it was built in (ready to generate, as the trainer leaves it)."""
    import torch

    from frozenvl.train.precision import MasterWeights

    low = model.llm.dtype != torch.float32
    masters = MasterWeights(model.workflow(task), enabled=low)
    masters.to_fp32()
    optimizer = torch.optim.AdamW(model.trainable_parameters(task), lr=1e-5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=low)
    model.train()

    def step() -> None:
        with autocast:
            loss = model(**inputs, labels=labels, task=task).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        return timed(step, repeats)
    finally:
        masters.to_build_dtype()
        model.eval()
