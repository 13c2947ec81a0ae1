"""The engine: one worker thread owns the model; requests queue for it and run in batches.

Requests are queued per workflow (the one that answers them: an image-free request to a workflow
with `text_fallback` queues for `text`). The worker takes the workflows in turn (round robin), so
neither text nor any multimodal workflow can starve the others, and decodes the head of that
workflow's queue together with up to `max_batch_size - 1` others that can share its decode loop:
all greedy requests of a workflow batch together (each row's tokens are what it would get alone),
sampled ones only with the same temperature / top_p and no seed (a seed makes a request run alone,
so its random numbers are its own). Each row has its own max_tokens, stop strings and eos; a
finished or cancelled row stops emitting, and the batch ends as soon as no row is left.

Batches are static: rows that arrive while a batch decodes wait for the next batch of their
workflow (no joining between decode steps; docs/serve.md).

Everything an HTTP thread needs is here and thread-safe: `prepare` (tokenize, route, images ->
pixel values; run it in the caller's thread), `submit` (raises `QueueFull`), `GenRequest.cancel`.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import inputs
from ..data.prompt import left_pad
from ..generation import (
    GenerationConfig,
    IncrementalDetokenizer,
    _first_stop,
    _stop_prefix_len,
    eos_token_ids,
    generate_steps,
)


class QueueFull(Exception):
    """The bounded queue has no room: the client should retry later."""


@dataclass
class Sampling:
    max_tokens: int | None  # None: `prepare` fills in what the context leaves
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def batch_key(self, request_id: int) -> tuple:
        """Requests with equal keys share a decode loop without changing what any of them gets."""
        if self.temperature == 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", request_id)
        return ("sample", self.temperature, self.top_p)


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    reason: str  # "stop" (eos or a stop string) | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    error: BaseException


Event = Delta | Finished | Failed
_ids = itertools.count()


@dataclass
class GenRequest:
    """One request, tokenized and with its pixel values; `on_event` is called from the worker thread."""

    task: str  # the workflow that answers (after routing)
    input_ids: list[int]
    pixel_values: torch.Tensor | None
    n_images: int
    sampling: Sampling
    on_event: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    _engine: Engine | None = None

    def cancel(self) -> None:
        """Stop this request (client gone, timeout): out of the queue at once, or its row stops emitting."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self._engine is not None:
                self._engine._dequeue(self)


class _Row:
    """One request's row in a batch: its text, stop strings, eos and max_tokens (mirrors stream_text)."""

    def __init__(self, engine: Engine, req: GenRequest):
        self.req, self.eos, self.stops, self.log = req, engine.eos, req.sampling.stop, engine.finished_log
        self.detok = IncrementalDetokenizer(engine.model.tokenizer, skip_special_tokens=True,
                                            lock=engine.model._tokenizer_lock)
        self.pending = ""  # decoded, not yet emitted: a possible start of a stop string
        self.tokens = 0
        self.active = True

    def _emit(self, text: str) -> None:
        if text:
            self.req.on_event(Delta(text))

    def finish(self, reason: str, flush: bool = True) -> None:
        """`flush`: emit what the detokenizer still holds (not after a stop string: that text follows it)."""
        if reason != "cancelled" and flush:
            self.pending += self.detok.flush()
            cut = _first_stop(self.pending, self.stops)
            self._emit(self.pending if cut is None else self.pending[:cut])
        self.active = False
        self.log.append((self.req.id, reason, self.tokens))
        self.req.on_event(Finished(reason, len(self.req.input_ids), self.tokens))

    def push(self, token: int) -> None:
        if self.req.cancelled.is_set():
            return self.finish("cancelled")
        self.tokens += 1
        if token in self.eos:
            return self.finish("stop")
        self.pending += self.detok.push(token)
        cut = _first_stop(self.pending, self.stops)
        if cut is not None:
            self._emit(self.pending[:cut])
            self.pending = ""
            return self.finish("stop", flush=False)
        if self.tokens >= self.req.sampling.max_tokens:
            return self.finish("length")
        keep = _stop_prefix_len(self.pending, self.stops)
        self._emit(self.pending[: len(self.pending) - keep])
        self.pending = self.pending[len(self.pending) - keep:]


class Engine:
    def __init__(self, model: Any, *, max_batch_size: int = 8, max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.model = model
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.eos = set(eos_token_ids(model))
        self._queues: dict[str, deque[GenRequest]] = {t: deque() for t in model.tasks}
        self._last: str | None = None  # the workflow served last (round robin)
        self._cond = threading.Condition()
        self._queued = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"batches": 0, "rows": 0, "cancelled": 0, "running": 0, "max_batch_rows": 0}
        # recent batches as (workflow, rows), recent requests as (id, finish reason, tokens): for /health and tests
        self.batch_log: deque[tuple[str, int]] = deque(maxlen=256)
        self.finished_log: deque[tuple[int, str, int]] = deque(maxlen=256)

    # ------------------------------------------------------------------ caller side
    def prepare(self, task: str, prompt: str, images: list[Any], sampling: Sampling,
                on_event: Callable[[Event], None], default_max_tokens: int = 512) -> GenRequest:
        """Tokenize, route and preprocess in the caller's thread (errors here are the client's)."""
        model = self.model
        batch = model.prepare_inputs(prompt, images or None, task, add_special_tokens=False)
        routed = model.route(task, batch["input_ids"], batch["pixel_values"])
        ids = batch["input_ids"][0].tolist()
        if sampling.max_tokens is None:  # not given: whatever the context has left, up to the server's cap
            sampling.max_tokens = max(1, min(default_max_tokens, self.context_left(len(ids))))
        inputs.check_length(model.llm.config, len(ids), sampling.max_tokens)
        return GenRequest(routed, ids, batch["pixel_values"], len(images), sampling, on_event)

    def context_left(self, n_prompt_tokens: int) -> int:
        limit = getattr(self.model.llm.config, "max_position_embeddings", None)
        return max(limit - n_prompt_tokens, 0) if limit else 1 << 30

    def submit(self, req: GenRequest) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._queued >= self.max_queue:
                raise QueueFull(f"{self._queued} requests are waiting (the limit is {self.max_queue}); retry later")
            req._engine = self
            self._queues[req.task].append(req)
            self._queued += 1
            self._cond.notify()

    def _dequeue(self, req: GenRequest) -> None:
        with self._cond:
            self.stats["cancelled"] += 1
            queue = self._queues.get(req.task)
            if queue is not None and req in queue:
                queue.remove(req)
                self._queued -= 1
                self.finished_log.append((req.id, "cancelled", 0))

    def status(self) -> dict[str, int]:
        with self._cond:
            return {"queued": self._queued, **self.stats}

    # ------------------------------------------------------------------ worker
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="frozenvl-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            waiting = [r for q in self._queues.values() for r in q]
            for q in self._queues.values():
                q.clear()
            self._queued = 0
            self._cond.notify_all()
        for r in waiting:
            r.cancelled.set()
            r.on_event(Failed(QueueFull("the server is shutting down")))
        if self._thread is not None:
            self._thread.join(timeout)

    def _next_batch(self) -> list[GenRequest] | None:
        with self._cond:
            while not self._stopping and self._queued == 0:
                self._cond.wait()
            if self._stopping:
                return None
            order = list(self._queues)
            start = order.index(self._last) + 1 if self._last in order else 0
            task = next(t for t in order[start:] + order[:start] if self._queues[t])
            queue = self._queues[task]
            head = queue.popleft()
            key = head.sampling.batch_key(head.id)
            batch = [head]
            for req in list(queue):
                if len(batch) >= self.max_batch_size:
                    break
                if req.sampling.batch_key(req.id) == key:
                    queue.remove(req)
                    batch.append(req)
            self._queued -= len(batch)
            self._last = task
            self.stats["running"] = len(batch)
            self.stats["batches"] += 1
            self.stats["rows"] += len(batch)
            self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(batch))
            self.batch_log.append((task, len(batch)))
            return batch

    def _work(self) -> None:
        torch.set_grad_enabled(False)  # this thread only runs inference
        while (batch := self._next_batch()) is not None:
            try:
                self._run(batch)
            except Exception as e:  # a failing batch fails its requests, not the server
                for req in batch:
                    req.on_event(Failed(e))
            finally:
                with self._cond:
                    self.stats["running"] = 0

    def _run(self, batch: list[GenRequest]) -> None:
        model, task = self.model, batch[0].task
        ids, mask = left_pad([r.input_ids for r in batch], model.tokenizer.pad_token_id)
        pixels = [r.pixel_values for r in batch if r.pixel_values is not None]
        pixel_values = torch.cat(pixels) if pixels else None
        image_rows = inputs.rows_from_counts([r.n_images for r in batch]) if pixels else None
        s = batch[0].sampling
        cfg = GenerationConfig.make(
            model, max_new_tokens=max(r.sampling.max_tokens for r in batch), do_sample=s.temperature > 0,
            temperature=s.temperature or 1.0, top_p=s.top_p, seed=s.seed, eos_token_id=sorted(self.eos))
        rows = [_Row(self, r) for r in batch]
        steps = generate_steps(model, ids, mask, pixel_values, task, cfg, image_rows)
        try:
            for tokens in steps:
                for row, token in zip(rows, tokens.tolist()):
                    if row.active:
                        row.push(token)
                if not any(row.active for row in rows):
                    break
        finally:
            steps.close()
        for row in rows:  # the loop ended at its step limit: rows still going ran out of tokens
            if row.active:
                row.finish("cancelled" if row.req.cancelled.is_set() else "length")

