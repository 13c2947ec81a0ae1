"""Generation for every workflow: KV cache, greedy / sampling, left-padded batches, eos, stop strings, streaming.

One loop serves all workflows (the `text` one included): prefill once, then one token per step
through the workflow's own cache. `use_cache=False` recomputes the whole sequence every step; it
exists to check the cache (both must give the same tokens).

The decode loop reads nothing back to the host that it does not need: eos bookkeeping stays on the
device, and whether every row has finished is read only every `FINISHED_CHECK_EVERY` steps (and
only when an eos can finish a row); the extra steps produce padding, which `generate` cuts off, so
the result is the same as stopping at once. Stop strings need the text, so with them each step's
tokens are read back and decoded incrementally (a bounded window per token, never the whole output).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .constants import TEXT_TASK
from .data.prompt import position_ids_from_mask

if TYPE_CHECKING:
    from .model import FrozenVLModel

# How often (in decode steps) the loop asks the device whether every row has finished.
FINISHED_CHECK_EVERY = 8
# Tokens an incremental decode waits for the rest of a multi-byte character before emitting anyway.
MAX_PENDING_TOKENS = 8


def eos_token_ids(model: FrozenVLModel) -> list[int]:
    """The base's eos ids: its generation config's (one id or several), else the tokenizer's; [] if none."""
    gen_cfg = getattr(model.llm, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    eos = eos if eos is not None else model.tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    stop: list[str] = field(default_factory=list)
    use_cache: bool = True
    seed: int | None = None

    @classmethod
    def make(cls, model: FrozenVLModel, **kwargs: Any) -> GenerationConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown generation argument(s) {unknown}; known: {sorted(known)}")
        tok = model.tokenizer
        if "eos_token_id" not in kwargs:
            kwargs["eos_token_id"] = eos_token_ids(model)
        elif isinstance(kwargs["eos_token_id"], int):
            kwargs["eos_token_id"] = [kwargs["eos_token_id"]]
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = [kwargs["stop"]]
        kwargs.setdefault("pad_token_id", tok.pad_token_id if tok.pad_token_id is not None else 0)
        cfg = cls(**kwargs)
        if cfg.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
        if cfg.do_sample and (cfg.temperature <= 0 or not 0 < cfg.top_p <= 1):
            raise ValueError("sampling needs temperature > 0 and 0 < top_p <= 1")
        return cfg


def _next_token(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


# ------------------------------------------------------------------ text, incrementally
class IncrementalDetokenizer:
    """The text of a growing token sequence, piece by piece, decoding only a bounded tail per token.

    Each `push` decodes the tokens since the last emitted piece together with the piece before them
    (its context: tokenizers that drop a leading space or merge bytes then decode the tail exactly as
    inside the whole sequence) and returns the text that is new. A tail that ends inside a multi-byte
    character (decoded as U+FFFD) waits for the next token, up to `MAX_PENDING_TOKENS`.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool, lock: Any = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.lock = lock if lock is not None else nullcontext()
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # end of what has been emitted
        self._prefix_text = ""  # decode(ids[_prefix:_read])

    def _decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._decode(self.ids[self._prefix :])
        if text.endswith("\ufffd") and len(self.ids) - self._read < MAX_PENDING_TOKENS:
            return ""  # an incomplete UTF-8 sequence: wait for the rest of the character
        return self._advance(text)

    def flush(self) -> str:
        """What is still held back (an incomplete character, decoded as it is)."""
        if self._read == len(self.ids):
            return ""
        return self._advance(self._decode(self.ids[self._prefix :]))

    def _advance(self, text: str) -> str:
        piece = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        return piece


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


class _StopWatch:
    """Per row: has the generated text (special tokens included) reached a stop string yet?

    Only a tail as long as the longest stop string is kept and searched, so each step costs the
    same however long the output grows."""

    def __init__(self, model: FrozenVLModel, rows: int, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        lock = getattr(model, "_tokenizer_lock", None)
        self.texts = [IncrementalDetokenizer(model.tokenizer, skip_special_tokens=False, lock=lock) for _ in range(rows)]
        self.tails = [""] * rows
        self.hit = [False] * rows

    def update(self, tokens: list[int], finished: list[bool]) -> list[bool]:
        for row, tok in enumerate(tokens):
            if self.hit[row] or finished[row]:
                continue  # a finished row only gets padding
            tail = self.tails[row] + self.texts[row].push(tok)
            self.hit[row] = any(s in tail for s in self.stops)
            self.tails[row] = tail[len(tail) - self.keep :] if self.keep else ""
        return self.hit


# ------------------------------------------------------------------ the loop
@torch.no_grad()
def _decode_loop(
    model: FrozenVLModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    task: str,
    cfg: GenerationConfig,
    image_rows: torch.Tensor | None = None,
    *,
    watch_stops: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next token of every row [B], which rows have finished [B] bool) step by step.

    Ends after `max_new_tokens` steps, or (checked every few steps, or at each step with stop
    strings) once every row has finished; later steps of a finished row hold `pad_token_id`."""
    device = model.device
    input_ids = input_ids.to(device)
    mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    eos = torch.tensor(cfg.eos_token_id, device=device, dtype=torch.long)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    pad = torch.full_like(finished, cfg.pad_token_id, dtype=torch.long)
    stops = _StopWatch(model, input_ids.shape[0], cfg.stop) if watch_stops and any(cfg.stop) else None
    can_finish = bool(eos.numel()) or stops is not None

    # Prefill (with forward's input checks). Images are encoded once per call; reused below.
    image_embeds = None
    if task != TEXT_TASK and pixel_values is not None:
        image_embeds = model._image_embeds(task, pixel_values.to(device))
        image_rows = model._image_rows(input_ids, len(pixel_values), task, image_rows, pixel_values)
    out = model(input_ids, mask, task=task, image_embeds=image_embeds, position_ids=position_ids_from_mask(mask),
                use_cache=cfg.use_cache, logits_to_keep=1, image_rows=image_rows)
    cache = out.past_key_values
    logits = out.logits[:, -1]
    full_ids = input_ids
    for step in range(cfg.max_new_tokens):
        token = torch.where(finished, pad, _next_token(logits, cfg, gen))
        if eos.numel():
            finished = finished | torch.isin(token, eos)
        if stops is not None:  # needs the text: the one per-step read-back, only with stop strings
            host_tokens, host_finished = torch.stack([token, finished.long()]).tolist()
            hits = stops.update(host_tokens, [bool(f) for f in host_finished])
            finished = finished | torch.tensor(hits, device=device)
        yield token, finished
        if step == cfg.max_new_tokens - 1:
            return  # no forward pass for a token nobody will read
        checked = stops is not None or step % FINISHED_CHECK_EVERY == FINISHED_CHECK_EVERY - 1
        if can_finish and checked and bool(finished.all()):
            return
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if cfg.use_cache:
            # no placeholders in a decode step (images live in the cache) and tokens the model made
            # itself: the forward pass proper, without forward's host-side input checks
            pos = mask.long().sum(-1, keepdim=True) - 1
            out = model._step(token[:, None], mask, task, past_key_values=cache, position_ids=pos, use_cache=True,
                              logits_to_keep=1)
            cache = out.past_key_values
        else:
            full_ids = torch.cat([full_ids, token[:, None]], dim=1)
            out = model._step(full_ids, mask, task, position_ids=position_ids_from_mask(mask), logits_to_keep=1,
                              image_embeds=image_embeds, image_rows=image_rows)
        logits = out.logits[:, -1]


def generate_steps(
    model: FrozenVLModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    task: str,
    cfg: GenerationConfig,
    image_rows: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, step by step ([B] each)."""
    for token, _ in _decode_loop(model, input_ids, attention_mask, pixel_values, task, cfg, image_rows):
        yield token


def generate(model, input_ids, attention_mask, pixel_values, task, cfg: GenerationConfig,
             image_rows: torch.Tensor | None = None) -> torch.Tensor:
    """[B, steps]: every row's new tokens, up to the step at which the last row finished."""
    tokens, all_done = [], []
    for token, finished in _decode_loop(model, input_ids, attention_mask, pixel_values, task, cfg, image_rows):
        tokens.append(token)
        all_done.append(finished.all())
    out = torch.stack(tokens, dim=1)
    done = torch.stack(all_done).nonzero()  # one read-back, after the loop
    return out[:, : int(done[0, 0]) + 1] if len(done) else out


def stream_text(model, input_ids, attention_mask, pixel_values, task, cfg: GenerationConfig,
                image_rows: torch.Tensor | None = None) -> Iterator[str]:
    """Text pieces of a single prompt as they are generated; eos and stop strings are not yielded.

    Linear in the output length: each token decodes a bounded window, and only the text not yet
    yielded (at most a stop string's length plus the newest piece) is searched for stop strings."""
    if input_ids.shape[0] != 1:
        raise ValueError("streaming takes one prompt at a time")
    eos = set(cfg.eos_token_id)
    stops = [s for s in cfg.stop if s]
    detok = IncrementalDetokenizer(model.tokenizer, skip_special_tokens=True, lock=getattr(model, "_tokenizer_lock", None))
    pending = ""  # decoded, not yet yielded: a possible start of a stop string
    steps = _decode_loop(model, input_ids, attention_mask, pixel_values, task, cfg, image_rows, watch_stops=False)
    for token, _ in steps:
        t = int(token[0])
        if t in eos:
            break
        pending += detok.push(t)
        cut = _first_stop(pending, stops)
        if cut is not None:
            if cut:
                yield pending[:cut]
            return
        keep = _stop_prefix_len(pending, stops)
        if len(pending) > keep:
            yield pending[: len(pending) - keep]
            pending = pending[len(pending) - keep :]
    # generation ended: flush what was held back (a possible stop-string prefix, a partial character)
    pending += detok.flush()
    cut = _first_stop(pending, stops)
    pending = pending if cut is None else pending[:cut]
    if pending:
        yield pending
