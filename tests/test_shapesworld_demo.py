"""The demo end to end at a tiny scale: bases build and reload, every family trains, the report is written."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import torch

import frozenvl
from frozenvl.shapesworld.bases import BaseSpec, build_bases
from frozenvl.shapesworld.demo import Scale, recipes, run_demo

TINY = Scale(n_train_images=24, n_eval_images=4, n_text_train=200, n_text_eval=6,
             bases=replace(BaseSpec(), vocab_size=400, llm_hidden=32, llm_layers=2, llm_heads=2, llm_kv_heads=1,
                           llm_intermediate=64, llm_steps=4, n_scene_texts=40, vit_hidden=32, vit_layers=2,
                           vit_heads=2, vit_steps=3, llm_batch=8, vit_batch=4),
             align_steps=2, tune_steps=2, batch_size=4, eval_batch=8)


def test_demo_smoke_at_tiny_scale(tmp_path):
    res = run_demo(str(tmp_path), scale=TINY, chat=False, progress=False)
    names = {r.name for r in recipes(TINY)}
    assert names <= set(res["runs"]) and "text" in res["runs"]
    for name in names:
        assert res["runs"][name]["base_unchanged"] is True
        assert res["runs"][name]["steps"] == TINY.align_steps + TINY.tune_steps
    # frozen workflows leave text-only input to the frozen base: same answers, by construction
    for name in ("prefix", "mm", "g"):
        assert res["runs"][name]["text_same_as_base"] == 1.0
    assert os.path.isfile(tmp_path / "report.md") and os.path.isfile(tmp_path / "chart.png")
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["runs"]["prefix"]["vqa_acc"] == res["runs"]["prefix"]["vqa_acc"]
    assert any(line.startswith("[") for line in res["findings"])


def test_bases_build_reload_and_cache(tmp_path):
    from frozenvl.shapesworld.writer import generate

    generate(tmp_path / "data", seed=0, n_train_images=4, n_eval_images=2, n_text_train=50)
    llm, vis = build_bases(tmp_path / "bases", tmp_path / "data", TINY.bases, progress=False)
    stamp = os.path.getmtime(os.path.join(os.path.dirname(llm), "done.json"))
    again = build_bases(tmp_path / "bases", tmp_path / "data", TINY.bases, progress=False)
    assert again == (llm, vis) and os.path.getmtime(os.path.join(os.path.dirname(llm), "done.json")) == stamp
    model = frozenvl.build(llm, vis, workflows={"mm": {"family": "prefix", "select_layer": -1}})
    assert model.tokens_per_image("mm") == (TINY.bases.vit_image // TINY.bases.vit_patch) ** 2
    ids = model.tokenizer("What is 3 plus 4?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids, task="text").logits.shape[-1] == len(model.tokenizer)
