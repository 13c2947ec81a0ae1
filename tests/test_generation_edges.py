"""Generation edge cases: multi-byte stop strings, linear streaming, the context limit checked up front,
ready pixel tensors next to a prompt, and a decode loop without per-step host reads."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import frozenvl
from frozenvl import generation

from .conftest import perturb

PREFIX = {"family": "prefix"}
ADAPTION = {"family": "adaption_prompt", "adapter_layers": 2, "adapter_len": 4}


@pytest.fixture(scope="module")
def model(bases):
    llm, vis = bases()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # family init draws from the global generator: fixed, so are the answers
        m = frozenvl.build(llm, vis, workflows={"mm": PREFIX, "ap": ADAPTION})
    perturb(m, "mm")
    perturb(m, "ap", seed=2, scale=0.5)
    return m


def _ids(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def _script(monkeypatch, rows: list[list[int]]) -> list[int]:
    """Replace the sampler: step k returns rows[r][k] for row r (the real loop runs around it).
    Returns a list that grows by one entry per sampled step."""
    script = torch.tensor(rows, dtype=torch.long)
    calls: list[int] = []

    def scripted(logits, cfg, gen):
        calls.append(len(calls))
        return script[:, len(calls) - 1].to(logits.device)

    monkeypatch.setattr(generation, "_next_token", scripted)
    return calls


# --------------------------------------------------------------------------- stop strings
def test_multibyte_stop_string_stops_generate_and_stream(model, monkeypatch):
    before, stop_ids, after = _ids(model, "ab cd"), _ids(model, "é"), _ids(model, " xyz and more")
    assert len(stop_ids) >= 2  # "é" is two byte-level tokens: decoding token by token never sees it
    script = before + stop_ids + after
    kw = dict(task="text", max_new_tokens=len(script), eos_token_id=[])

    _script(monkeypatch, [script])
    out = model.generate(prompt="hello", stop=["é"], **kw)
    assert out[0].tolist() == before + stop_ids  # stops right after the token that completes "é"
    _script(monkeypatch, [script])
    assert "".join(model.stream("hello", stop=["é"], **kw)) == model.tokenizer.decode(before)
    # a stop string that spans the multi-byte character and the next token
    _script(monkeypatch, [script])
    out = model.generate(prompt="hello", stop=["é x"], **kw)
    k = next(k for k in range(1, len(after)) if "é x" in model.tokenizer.decode(before + stop_ids + after[:k]))
    assert out[0].tolist() == before + stop_ids + after[:k]


def test_rows_of_a_batch_stop_on_their_own_multibyte_stop(model, monkeypatch):
    a = _ids(model, "ab é cd ef gh ij kl")
    b = _ids(model, "no stop at all in this row")
    n = min(len(a), len(b))
    _script(monkeypatch, [a[:n], b[:n]])
    out = model.generate(prompt=["hello", "hi there"], task="text", max_new_tokens=n, eos_token_id=[], stop=["é"],
                         pad_token_id=0)
    cut = len(_ids(model, "ab é"))
    assert out.shape == (2, n)  # row 1 never stops
    assert out[0, :cut].tolist() == a[:cut] and set(out[0, cut:].tolist()) == {0}
    assert out[1].tolist() == b[:n]


def test_streaming_decodes_a_bounded_window_per_token(model, monkeypatch):
    """stream_text (and the stop watcher of generate) decode a bounded tail per token, never the
    whole output: linear in its length. The pieces still join to exactly the full decode."""
    text = "héllo wörld, naïve café — ünïcode 日本語 text " * 3
    script = _ids(model, text)
    assert len(script) > 8 * generation.MAX_PENDING_TOKENS  # much longer than the window allowed
    tok = model.tokenizer
    real_decode = tok.decode
    windows: list[int] = []

    def spy(ids, **kw):
        windows.append(len(ids))
        return real_decode(ids, **kw)

    monkeypatch.setattr(tok, "decode", spy)
    _script(monkeypatch, [script])
    streamed = "".join(model.stream("hi", task="text", max_new_tokens=len(script), eos_token_id=[]))
    assert streamed == real_decode(script, skip_special_tokens=True)
    assert max(windows) <= 2 * generation.MAX_PENDING_TOKENS  # independent of the output length
    assert sum(windows) <= 6 * len(script)

    windows.clear()
    _script(monkeypatch, [script])
    out = model.generate(prompt="hi", task="text", max_new_tokens=len(script), eos_token_id=[], stop=["\x00never"])
    assert out[0].tolist() == script
    assert max(windows) <= 2 * generation.MAX_PENDING_TOKENS and sum(windows) <= 6 * len(script)


def test_incremental_detokenizer_equals_the_full_decode(model):
    tok = model.tokenizer
    for text in ["plain ascii words", "é", "日本語とemoji 🙂🙂 mixed", " leading space and trailing "]:
        ids = _ids(model, text)
        detok = generation.IncrementalDetokenizer(tok, skip_special_tokens=True)
        pieces = [detok.push(t) for t in ids] + [detok.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
        assert all("\ufffd" not in p for p in pieces)  # no half characters are ever emitted


# --------------------------------------------------------------------------- context limit
def test_context_limit_is_checked_before_any_compute(model, images):
    limit = model.llm.config.max_position_embeddings
    calls = []
    hook = model.llm.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        ids = torch.full((1, limit - 4), _ids(model, "a")[0], dtype=torch.long)
        with pytest.raises(ValueError, match=r"max_new_tokens=8 = \d+ exceeds the LLM's max_position_embeddings"):
            model.generate(ids, task="text", max_new_tokens=8, eos_token_id=[])
        prompt = "red " * (limit - 20)
        assert model.prepare_inputs(prompt, task="text")["input_ids"].shape[1] <= limit  # the prompt alone fits
        with pytest.raises(ValueError, match=r"lower max_new_tokens \(at most \d+ here\)"):
            model.generate(prompt=prompt, task="text", max_new_tokens=64, eos_token_id=[])
        with pytest.raises(ValueError, match="exceeds the LLM's max_position_embeddings"):
            model.stream(prompt, task="text", max_new_tokens=64)
        with pytest.raises(ValueError, match="exceeds the LLM's max_position_embeddings"):
            model.chat([{"role": "user", "content": "<image>" + prompt}], images=[images[0]], task="mm",
                       max_new_tokens=64)
        assert calls == []  # nothing ran, so nothing was generated and lost
        model.generate(ids[:, :8], task="text", max_new_tokens=2, eos_token_id=[])
        assert calls  # the hook does see real work
    finally:
        hook.remove()


# --------------------------------------------------------------------------- ready pixel tensors
def test_pixel_values_and_image_tensors_next_to_a_prompt(model, images):
    kw = dict(task="mm", max_new_tokens=6, eos_token_id=[])
    pv = model.pixel_values([images[0]], "mm")
    from_pil = model.generate(prompt="<image> what is it", images=[images[0]], **kw)
    assert torch.equal(model.generate(prompt="<image> what is it", pixel_values=pv, **kw), from_pil)
    assert torch.equal(model.generate(prompt="<image> what is it", images=pv, **kw), from_pil)
    other = model.generate(prompt="<image> what is it", pixel_values=model.pixel_values([images[1]], "mm"), **kw)
    assert not torch.equal(other, from_pil)  # the tensor really is what the answer sees
    # per-image [3, H, W] tensors inside the lists work like the images they came from
    assert torch.equal(model.generate(prompt="<image> what is it", images=[pv[0]], **kw), from_pil)
    assert "".join(model.stream("<image> what is it", images=pv, **kw)) == model.tokenizer.decode(
        from_pil[0], skip_special_tokens=True)
    with pytest.raises(ValueError, match="images or pixel_values, not both"):
        model.generate(prompt="<image> what is it", images=[images[0]], pixel_values=pv, **kw)
    with pytest.raises(ValueError, match=r"pixel_values hold 1 image\(s\) but the prompt\(s\) have 2"):
        model.generate(prompt="<image> and <image>", images=pv, **kw)


@pytest.mark.parametrize("task", ["mm", "ap"])
def test_a_pixel_tensor_for_a_batch_goes_by_the_placeholders(model, images, task):
    """A stacked tensor for several prompts: each prompt's <image> count names its images' row, also
    for a family that keeps images out of the sequence (adaption_prompt: nothing to read rows off)."""
    prompts = ["<image> what is this", "a red circle", "<image> left of <image> is what"]
    per_prompt = [[images[0]], [], [images[1], images[2]]]
    kw = dict(task=task, max_new_tokens=6, eos_token_id=[])
    stacked = model.pixel_values([images[0], images[1], images[2]], task)
    inputs = model.prepare_inputs(prompts, stacked, task=task)
    assert inputs["image_rows"].tolist() == [0, 2, 2]
    expected = model.generate(prompt=prompts, images=per_prompt, **kw)
    assert torch.equal(model.generate(prompt=prompts, images=stacked, **kw), expected)
    assert torch.equal(model.generate(prompt=prompts, pixel_values=stacked, **kw), expected)


# --------------------------------------------------------------------------- host reads
_SRC = os.path.dirname(frozenvl.__file__) + os.sep


def _count_host_reads(monkeypatch) -> list[str]:
    """Record every tensor -> host read (bool(), int(), .item(), .tolist()) made from frozenvl's code."""
    seen: list[str] = []
    for name in ("__bool__", "__int__", "__index__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(_SRC):
                seen.append(f"{_name} {os.path.basename(caller.co_filename)}:{caller.co_name}")
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return seen


@pytest.mark.parametrize("task", ["text", "mm"])
def test_decode_loop_reads_nothing_back_per_step(model, images, monkeypatch, task):
    kw = dict(task=task, eos_token_id=[])
    if task == "mm":
        kw.update(prompt="<image> what is it", images=[images[0]])
    else:
        kw.update(prompt="what is it")
    counts = {}
    for n in (4, 28):
        seen = _count_host_reads(monkeypatch)
        model.generate(max_new_tokens=n, **kw)
        counts[n] = list(seen)
        monkeypatch.undo()
    assert counts[4] == counts[28]  # prefill only: no read-back per decode step
    # with an eos that can finish rows, "all finished?" is asked once every FINISHED_CHECK_EVERY steps
    never = model.tokenizer.eos_token_id
    for n in (4, 28):
        seen = _count_host_reads(monkeypatch)
        model.generate(max_new_tokens=n, **{**kw, "eos_token_id": [never]})
        counts[n] = list(seen)
        monkeypatch.undo()
    assert len(counts[28]) - len(counts[4]) <= 28 // generation.FINISHED_CHECK_EVERY


def test_rows_finishing_at_different_steps_give_the_same_tokens(model, monkeypatch):
    """The loop checks for "all finished" only every few steps; the result is cut exactly where the
    last row finished, with padding after each row's eos, as if it had stopped at once."""
    eos, pad, n = 7, 0, 20
    base = [[11 + (r * 5 + k) % 50 for k in range(n)] for r in range(3)]
    ends = [2, 5, 10]  # steps at which the rows emit eos (10 is not a multiple of the check period)
    for row, end in zip(base, ends):
        row[end] = eos
    calls = _script(monkeypatch, base)
    out = model.generate(prompt=["a", "bb", "ccc"], task="text", max_new_tokens=n, eos_token_id=[eos],
                         pad_token_id=pad)
    assert out.shape == (3, max(ends) + 1)
    for r, end in enumerate(ends):
        assert out[r, : end + 1].tolist() == base[r][: end + 1]
        assert set(out[r, end + 1 :].tolist()) <= {pad}
    assert len(calls) < max(ends) + 1 + generation.FINISHED_CHECK_EVERY
