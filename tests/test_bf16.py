"""bf16 bases: inference in bf16 for every family, and train (fp32 masters under autocast) ->
generate -> save -> load -> generate, with the workflow back in the base's dtype."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import frozenvl
from frozenvl.train import train
from frozenvl.train.checkpoint import MASTERS, list_checkpoints

from .conftest import write_llava_data

BF16 = torch.bfloat16
FAMILIES = {
    "prefix": {"family": "prefix"},
    "inner_adaptor": {"family": "inner_adaptor", "layers": [0, 2]},
    "cross_attention": {"family": "cross_attention", "every": 1, "resampler_depth": 1, "resampler_latents": 4,
                        "resampler_heads": 2, "resampler_head_dim": 8},
    "bind": {"family": "bind"},
    "adaption_prompt": {"family": "adaption_prompt", "adapter_len": 4, "adapter_layers": 2, "visual": "v1"},
    "wings": {"family": "wings"},
}
PROMPT = "<image>\nwhat colour is the image"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_llava_data(tmp_path_factory.mktemp("data"), n=8)


def _config(llm, vis, data, out, workflow, parts, **over):
    cfg = {
        "llm": llm, "vision": vis, "output_dir": str(out), "dtype": "bfloat16", "precision": "bf16",
        "workflow": {"name": "mm", **workflow},
        "data": {"train": data, "max_length": 256},
        # lr large enough that two steps move bf16 weights (whose spacing is 2^-8 relative)
        "stages": [{"name": "s", "train": parts, "lr": 2e-2, "steps": 2, "batch_size": 2, "warmup_ratio": 0.0}],
        "save_every": 1, "log_every": 1, "seed": 0,
    }
    cfg.update(over)
    return cfg


def _outputs(model, images, trained: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens, then last-position logits of a two-image batch. Always in this
    order: in bf16 an image encoded alone or in a batch of two differs in the last bits, and the
    encoded-image cache remembers which it was."""
    kw = {"prompt": PROMPT, "images": [images[0]], "task": "mm", "max_new_tokens": 5, "eos_token_id": []}
    tokens = model.generate(**kw)
    if not trained:  # cache == recompute in bf16 (the round trips below compare cached runs)
        assert torch.equal(tokens, model.generate(**kw, use_cache=False))
    inputs = model.prepare_inputs([PROMPT, PROMPT], [[images[0]], [images[1]]], "mm")
    with torch.no_grad():
        logits = model(**inputs, task="mm").logits[:, -1]
    assert logits.dtype == BF16
    if trained:  # (gated families start as the base itself, blind to the image)
        assert (logits[0] - logits[1]).abs().max() > 0  # the image reaches the output
    return tokens, logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_base_inference_train_save_load(bases, images, data, tmp_path, family):
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"mm": FAMILIES[family]}, dtype=BF16)
    wf = model.workflow("mm")
    assert {p.dtype for p in wf.parameters()} == {BF16}
    _outputs(model, images, trained=False)  # a bf16 workflow runs inference as built
    init = {n: t.clone() for n, t in wf.owned_state_dict().items()}

    res = train(_config(llm, vis, data, tmp_path / "run", FAMILIES[family], sorted(wf.parts())), model=model,
                show_progress=False)
    assert res.steps == 2 and res.base_unchanged
    # training is over: every own parameter is back in the base's dtype (fp32 while it trained)
    assert {p.dtype for p in wf.parameters()} == {BF16}
    assert model.llm.dtype == BF16 and {p.dtype for p in model.vision.parameters()} == {BF16}
    assert any(not torch.equal(t, init[n]) for n, t in wf.owned_state_dict().items()), "training changed nothing"

    tokens, logits = _outputs(model, images)
    saved = load_file(str(tmp_path / "run" / "workflow-mm.safetensors"))
    assert {t.dtype for t in saved.values()} == {BF16}
    loaded = frozenvl.load(tmp_path / "run")
    assert {p.dtype for p in loaded.workflow("mm").parameters()} == {BF16}
    got_tokens, got_logits = _outputs(loaded, images)
    assert torch.equal(got_tokens, tokens) and torch.equal(got_logits, logits)

    # every checkpoint is a model dir in bf16 too, with the fp32 masters beside it for --resume
    last = list_checkpoints(tmp_path / "run")[-1]
    masters = load_file(os.path.join(last, MASTERS))
    assert {t.dtype for t in masters.values()} == {torch.float32}
    assert {t.dtype for t in load_file(os.path.join(last, "workflow-mm.safetensors")).values()} == {BF16}
    assert torch.equal(_outputs(frozenvl.load(last), images)[1], logits)


def test_bf16_resume_continues_from_the_fp32_masters(bases, data, tmp_path):
    """Saving a checkpoint after every step, stopped after step 1 and resumed, a bf16-base run ends
    exactly where an uninterrupted one that saved nothing midway does: saving leaves the fp32 masters
    untouched, and they (not the checkpoint's bf16 model dir) are what training continues from."""
    llm, vis = bases()
    wf = FAMILIES["inner_adaptor"]
    ref = _config(llm, vis, data, tmp_path / "ref", wf, ["connector", "adapter"], save_every=0)
    ref["stages"][0].update(steps=3, lr=1e-3)  # small steps: fp32 masters and their bf16 copies differ
    train(ref, show_progress=False)

    class Stop(Exception):
        pass

    def stop(trainer, position):
        if position.global_step == 1:
            raise Stop

    crash = {**ref, "output_dir": str(tmp_path / "crash"), "save_every": 1}
    with pytest.raises(Stop):
        train(crash, show_progress=False, callbacks=[stop])
    masters = load_file(os.path.join(list_checkpoints(tmp_path / "crash")[-1], MASTERS))
    assert any(not torch.equal(t, t.to(BF16).float()) for t in masters.values())  # not bf16 values in disguise
    train(crash, resume=True, show_progress=False)
    a = load_file(str(tmp_path / "ref" / "workflow-mm.safetensors"))
    b = load_file(str(tmp_path / "crash" / "workflow-mm.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in open(tmp_path / run / "metrics.jsonl")] for run in ("ref", "crash")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
