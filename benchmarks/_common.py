"""Small helpers the benchmark scripts share (run them as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import os

import torch


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
