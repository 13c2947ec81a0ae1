"""The demo's independent jobs (its trainings, its two base pretrainings), run side by side.

Tiny models use two cores badly inside one op: on 2 CPU cores, two one-thread processes train two
of the demo's workflows in about 0.7x the time of training them one after the other on two threads
(measured, docs/shapesworld.md "Time"). So the demo runs each job with **one CPU thread**, up to
`jobs` at once in spawned worker processes. One thread per job also makes every number
independent of `jobs`: a float reduction's order depends on the thread count, not on what else
runs, so ``--jobs 1`` and ``--jobs 4`` write the same results.json.

A job is a module-level function and its arguments (spawned workers import it by name; a script
that runs the demo with several jobs needs the ``if __name__ == "__main__":`` guard, as every
spawning library does). A job that fails stops the others and raises with its name; jobs already
finished keep what they wrote.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

#: CPU threads of one job (see the module docstring: fixed, so results do not depend on `jobs`)
JOB_THREADS = 1


@dataclass
class Job:
    """`fn(*args, **kwargs)` under a name (for messages)."""

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def default_jobs() -> int:
    """How many jobs run at once by default: the CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def job_threads() -> Iterator[None]:
    """Run the body with the jobs' thread count (restored after): for a job run in this process."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(JOB_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _worker_init() -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(JOB_THREADS)
    hf_logging.disable_progress_bar()  # many workers' bars would interleave; the parent reports instead


def run_jobs(jobs: Sequence[Job], workers: int, on_done: Callable[[Job, Any], None] | None = None) -> list[Any]:
    """Every job's result, in the order of `jobs`. With ``workers <= 1`` (or one job) they run
    here, one after the other; otherwise in `workers` spawned processes. `on_done(job, result)` is
    called here as each job finishes, in the order they finish."""
    if workers < 1:
        raise ValueError(f"jobs must be >= 1, got {workers}")
    if workers == 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            with job_threads():
                try:
                    results.append(job.fn(*job.args, **job.kwargs))
                except Exception as exc:
                    raise RuntimeError(f"demo job {job.name!r} failed: {exc}") from exc
            if on_done is not None:
                on_done(job, results[-1])
        return results
    # spawn, not fork: a forked child would inherit the parent's torch thread pools and locks
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_worker_init) as pool:
        futures: dict[Future, int] = {pool.submit(job.fn, *job.args, **job.kwargs): k for k, job in enumerate(jobs)}
        results: list[Any] = [None] * len(jobs)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in sorted(done, key=futures.__getitem__):
                job = jobs[futures[fut]]
                if (exc := fut.exception()) is not None:
                    for other in pending:
                        other.cancel()
                    why = (" (a worker process died: out of memory, or a script that starts the demo without an "
                           "`if __name__ == '__main__':` guard, which spawned workers need)"
                           if isinstance(exc, BrokenProcessPool) else "")
                    raise RuntimeError(f"demo job {job.name!r} failed: {exc}{why}") from exc
                results[futures[fut]] = fut.result()
                if on_done is not None:
                    on_done(job, results[futures[fut]])
        return results
