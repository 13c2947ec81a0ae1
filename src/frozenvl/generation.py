"""Generation for every workflow: KV cache, greedy / sampling, left-padded batches, eos, stop strings, streaming.

One loop serves all workflows (the `text` one included): prefill once, then one token per step
through the workflow's own cache. `use_cache=False` recomputes the whole sequence every step; it
exists to check the cache (both must give the same tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .data.prompt import position_ids_from_mask

if TYPE_CHECKING:
    from .model import FrozenVLModel


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
    def make(cls, model: "FrozenVLModel", **kwargs) -> "GenerationConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown generation argument(s) {unknown}; known: {sorted(known)}")
        tok = model.tokenizer
        if "eos_token_id" not in kwargs:
            eos = model.llm.generation_config.eos_token_id if model.llm.generation_config is not None else None
            eos = eos if eos is not None else tok.eos_token_id
            kwargs["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
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


@torch.no_grad()
def generate_steps(
    model: "FrozenVLModel",
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    task: str,
    cfg: GenerationConfig,
    image_rows: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, step by step ([B] each); stops when all rows finished."""
    device = model.device
    input_ids = input_ids.to(device)
    mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(device)
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
    eos = torch.tensor(cfg.eos_token_id, device=device, dtype=torch.long)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    stop_texts = [""] * input_ids.shape[0]

    # Prefill. Images are encoded once per generate call; the connector output is reused below.
    image_embeds = None
    if task != "text" and pixel_values is not None:
        image_embeds = model._image_embeds(task, pixel_values.to(device))
    positions = position_ids_from_mask(mask)
    out = model(input_ids, mask, task=task, image_embeds=image_embeds, position_ids=positions,
                use_cache=cfg.use_cache, logits_to_keep=1, image_rows=image_rows)
    cache = out.past_key_values
    logits = out.logits[:, -1]
    full_ids = input_ids
    for step in range(cfg.max_new_tokens):
        token = _next_token(logits, cfg, gen)
        token = torch.where(finished, torch.full_like(token, cfg.pad_token_id), token)
        generated.append(token)
        yield token
        if eos.numel():
            finished |= torch.isin(token, eos)
        if cfg.stop:
            finished |= _hit_stop(model.tokenizer, generated, stop_texts, cfg.stop)
        if bool(finished.all()) or step == cfg.max_new_tokens - 1:
            return  # no forward pass for a token nobody will read
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if cfg.use_cache:
            pos = mask.long().sum(-1, keepdim=True) - 1
            out = model(token[:, None], mask, task=task, past_key_values=cache, position_ids=pos, use_cache=True,
                        logits_to_keep=1)  # no placeholders in a decode step: images live in the cache
            cache = out.past_key_values
        else:
            full_ids = torch.cat([full_ids, token[:, None]], dim=1)
            out = model(full_ids, mask, task=task, image_embeds=image_embeds, image_rows=image_rows,
                        position_ids=position_ids_from_mask(mask), logits_to_keep=1)
        logits = out.logits[:, -1]


def _hit_stop(tokenizer, generated: list[torch.Tensor], texts: list[str], stops: Sequence[str]) -> torch.Tensor:
    last = generated[-1].tolist()
    hits = []
    for row, tok in enumerate(last):
        texts[row] += tokenizer.decode([tok], skip_special_tokens=False)
        hits.append(any(s in texts[row] for s in stops))
    return torch.tensor(hits, device=generated[-1].device)


def generate(model, input_ids, attention_mask, pixel_values, task, cfg: GenerationConfig,
             image_rows: torch.Tensor | None = None) -> torch.Tensor:
    steps = list(generate_steps(model, input_ids, attention_mask, pixel_values, task, cfg, image_rows))
    return torch.stack(steps, dim=1)


def stream_text(model, input_ids, attention_mask, pixel_values, task, cfg: GenerationConfig,
                image_rows: torch.Tensor | None = None) -> Iterator[str]:
    """Text pieces of a single prompt as they are generated; eos and stop strings are not yielded."""
    if input_ids.shape[0] != 1:
        raise ValueError("streaming takes one prompt at a time")
    tok = model.tokenizer
    eos = set(cfg.eos_token_id)
    ids: list[int] = []
    emitted = ""
    cut = None
    for token in generate_steps(model, input_ids, attention_mask, pixel_values, task, cfg, image_rows):
        t = int(token[0])
        if t in eos:
            break
        ids.append(t)
        text = tok.decode(ids, skip_special_tokens=True)
        cut = _first_stop(text, cfg.stop)
        if cut is not None:
            text = text[:cut]
        elif text.endswith("\ufffd"):
            continue  # an incomplete UTF-8 sequence: wait for the next token
        else:
            # hold back a tail that could be the start of a stop string
            text = text[: len(text) - _stop_prefix_len(text, cfg.stop)]
        if len(text) > len(emitted):
            yield text[len(emitted) :]
            emitted = text
        if cut is not None:
            break
    if cut is None:
        # generation ended: flush what was held back (a possible stop-string prefix, a partial character)
        text = tok.decode(ids, skip_special_tokens=True)
        if len(text) > len(emitted):
            yield text[len(emitted) :]


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best
