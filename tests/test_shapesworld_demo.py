"""The demo end to end at a tiny scale: bases build and reload, every family trains, the report is written."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import replace

import pytest
import torch

import frozenvl
from frozenvl.shapesworld.bases import BaseSpec, build_bases
from frozenvl.shapesworld.demo import Scale, recipes, run_demo
from frozenvl.shapesworld.jobs import Job, run_jobs

TINY = Scale(n_train_images=24, n_eval_images=4, n_text_train=200, n_text_eval=6,
             bases=replace(BaseSpec(), vocab_size=400, llm_hidden=32, llm_layers=2, llm_heads=2, llm_kv_heads=1,
                           llm_intermediate=64, llm_steps=4, n_scene_texts=40, vit_hidden=32, vit_layers=2,
                           vit_heads=2, vit_steps=3, llm_batch=8, vit_batch=4, vit_pool=8,
                           probe_vit_scenes=12, probe_llm_scenes=3),
             align_steps=2, tune_steps=2, batch_size=4, eval_batch=8)


def test_demo_smoke_at_tiny_scale(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as a user's session has it (conftest turns the bars off)
    try:
        res = run_demo(str(tmp_path), scale=TINY, chat=False, progress=False)
        # piped (not a terminal): no progress bars, transformers' weight-loading ones included, and
        # the global setting is put back afterwards
        assert "Loading weights" not in capfd.readouterr().err and hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.disable_progress_bar()
    names = {r.name for r in recipes(TINY)}
    assert names <= set(res["runs"]) and "text" in res["runs"]
    for name in names:
        assert res["runs"][name]["base_unchanged"] is True
        assert res["runs"][name]["steps"] == TINY.align_steps + TINY.tune_steps
    # as deployed, frozen workflows leave text-only input to the frozen base: same answers, by construction
    for name in ("prefix", "mm", "g"):
        same = res["runs"][name]["metrics"]["text_same_as_base"]
        assert same["mean"] == 1.0 and same["low"] is None  # one seed: no interval
    # a frozen prefix without an image is the base itself, on its own path too
    assert res["runs"]["prefix"]["metrics"]["text_same_as_base_own"]["mean"] == 1.0
    for name in ("report.md", "chart.png", "qtypes.png", "loss.png", "examples.png", "results.json", "timings.json"):
        assert os.path.isfile(tmp_path / name), name
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["runs"]["prefix"]["metrics"]["vqa_acc"]["mean"] == res["runs"]["prefix"]["metrics"]["vqa_acc"]["mean"]
    assert "timings" not in saved and "train_seconds" not in json.dumps(saved)
    assert res["findings"] and all(f["verdict"] == "not decided" for f in res["findings"])  # one seed decides nothing
    # the bases' ceiling is measured and reported
    vit, llm = res["bases"]["probes"]["vit"], res["bases"]["probes"]["llm"]
    assert {"colour", "kind", "size", "count", "box_acc50"} <= set(vit) and all(0 <= vit[k] <= 1 for k in ("kind", "count"))
    assert {"colour", "count", "exists", "box", "overall"} <= set(llm)
    # zero-initialised gates are reported per seed; every run says what it trains
    for name in ("adaption_prompt", "bind", "cross_attention"):
        assert len(res["runs"][name]["gates"]) == 1 and res["runs"][name]["gates"][0] >= 0
    assert "gates" not in res["runs"]["prefix"]
    assert res["runs"]["mm"]["trained"] == ["adapter", "connector", "head"]
    assert res["loss"] == {"loss_weighting": "sample"}
    report = (tmp_path / "report.md").read_text()
    assert "What the frozen bases know" in report and "What each workflow trains" in report


def test_demo_two_seeds_intervals_verdicts_and_figures(tmp_path):
    only = ["prefix", "prefix_full", "mm", "g"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_demo(str(tmp_path / "a"), scale=TINY, seeds=2, seed=3, data_seed=1, chat=False, progress=False,
                       only=only, jobs=2)
    # the tiny models' raw answers hold control characters; the example figure must not pass them to a font
    assert not [w for w in caught if "missing from font" in str(w.message)]
    assert res["seeds"] == [3, 4] and res["data_seed"] == 1
    vqa = res["runs"]["prefix"]["metrics"]["vqa_acc"]
    assert len(vqa["per_seed"]) == 2 and vqa["low"] <= vqa["mean"] <= vqa["high"] and vqa["std"] is not None
    majority = res["baselines"]["majority"]
    assert set(majority["answers"]) >= {"colour", "count", "exists"}
    assert majority["metrics"]["vqa_acc"]["low"] is not None  # seed-free: the eval items' interval
    assert {f["verdict"] for f in res["findings"]} <= {"reproduced", "refuted", "not decided"}
    claims = " | ".join(f["claim"] for f in res["findings"])
    for part in ("prefix keeps the base's text answers", "forgets", "prefix learns to see",
                 "IAA g beats frozen prefix on grounding", "IAA mm beats frozen prefix on VQA"):
        assert part in claims, part
    kept = next(f for f in res["findings"] if f["claim"].startswith("prefix keeps"))
    assert kept["figures"]["own_path"]["per_seed"] == [1.0, 1.0] and kept["verdict"] == "reproduced"
    with open(tmp_path / "a" / "report.md") as f:
        report = f.read()
    for fig in ("chart.png", "qtypes.png", "loss.png", "examples.png"):
        assert f"]({fig})" in report and os.path.getsize(tmp_path / "a" / fig) > 10_000
    assert "VQA per question type" in report and "majority answer per type" in report
    # the same seeds again (bases cached, every workflow retrained from scratch), one training at a
    # time instead of two at once: an identical results.json
    first = (tmp_path / "a" / "results.json").read_bytes()
    run_demo(str(tmp_path / "a"), scale=TINY, seeds=2, seed=3, data_seed=1, chat=False, progress=False, only=only,
             jobs=1, retrain=True)
    assert (tmp_path / "a" / "results.json").read_bytes() == first


def test_demo_reuses_finished_runs_and_retrains_the_others(tmp_path, monkeypatch):
    from frozenvl.shapesworld import demo

    only = ["prefix", "bind"]
    run_demo(str(tmp_path), scale=TINY, chat=False, progress=False, only=only, jobs=1)
    first = (tmp_path / "results.json").read_bytes()
    trained: list[str] = []
    train_run = demo._train_run
    monkeypatch.setattr(demo, "_train_run", lambda cfg, *a: trained.append(cfg["workflow"]["name"]) or train_run(cfg, *a))

    # a second call (as after a stop during evaluation) trains nothing and gives the same results
    run_demo(str(tmp_path), scale=TINY, chat=False, progress=False, only=only, jobs=1)
    assert trained == [] and (tmp_path / "results.json").read_bytes() == first
    # a run that did not finish (no stamp), or was trained from another config, is trained again
    os.remove(tmp_path / "runs" / "seed0" / "bind" / demo.RUN_STAMP)
    stamp = tmp_path / "runs" / "seed0" / "prefix" / demo.RUN_STAMP
    stamp.write_text(stamp.read_text().replace('"stamp": "', '"stamp": "0'))
    run_demo(str(tmp_path), scale=TINY, chat=False, progress=False, only=only, jobs=1)
    assert sorted(trained) == ["bind", "prefix"] and (tmp_path / "results.json").read_bytes() == first
    # retrain: every run again
    trained.clear()
    run_demo(str(tmp_path), scale=TINY, chat=False, progress=False, only=only, jobs=1, retrain=True)
    assert sorted(trained) == ["bind", "prefix"] and (tmp_path / "results.json").read_bytes() == first
    # the stamp covers what decides the weights: the config and the training file
    cfg = {"llm": str(tmp_path), "data": {"train": str(tmp_path / "data" / "train_mixed.json")}, "seed": 0}
    assert demo._run_stamp(cfg, 1) != demo._run_stamp({**cfg, "seed": 1}, 1) != demo._run_stamp(cfg, 2)


def test_bases_build_reload_and_cache(tmp_path):
    from frozenvl.shapesworld.writer import generate

    generate(tmp_path / "data", seed=0, n_train_images=4, n_eval_images=2, n_text_train=50)
    llm, vis = build_bases(tmp_path / "bases", tmp_path / "data", TINY.bases, progress=False)
    stamp = os.path.getmtime(os.path.join(os.path.dirname(llm), "done.json"))
    again = build_bases(tmp_path / "bases", tmp_path / "data", TINY.bases, progress=False)
    assert again == (llm, vis) and os.path.getmtime(os.path.join(os.path.dirname(llm), "done.json")) == stamp
    # the two pretrainings side by side (two worker processes): the same bases, byte for byte
    side_by_side = build_bases(tmp_path / "bases2", tmp_path / "data", TINY.bases, progress=False, jobs=2)
    for one, two in zip((llm, vis), side_by_side):
        assert open(os.path.join(one, "model.safetensors"), "rb").read() == \
            open(os.path.join(two, "model.safetensors"), "rb").read()
    model = frozenvl.build(llm, vis, workflows={"mm": {"family": "prefix", "select_layer": -1}})
    assert model.tokens_per_image("mm") == (TINY.bases.vit_image // TINY.bases.vit_patch) ** 2
    ids = model.tokenizer("What is 3 plus 4?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids, task="text").logits.shape[-1] == len(model.tokenizer)


def test_jobs_keep_their_order_and_name_a_failure():
    jobs = [Job(f"sqrt {v}", math.sqrt, (v,)) for v in (16.0, 4.0, 9.0)]
    seen = []
    assert run_jobs(jobs, 2, on_done=lambda job, res: seen.append((job.name, res))) == [4.0, 2.0, 3.0]
    assert sorted(seen) == [("sqrt 16.0", 4.0), ("sqrt 4.0", 2.0), ("sqrt 9.0", 3.0)]
    assert run_jobs(jobs, 1) == [4.0, 2.0, 3.0]
    for workers in (1, 2):
        with pytest.raises(RuntimeError, match="demo job 'bad' failed: invalid literal"):
            run_jobs([Job("ok", math.sqrt, (1.0,)), Job("bad", int, ("x",))], workers)
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        run_jobs(jobs, 0)


def _conv(rid, answer, image="images/train/00000.png"):
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                          {"from": "gpt", "value": answer}]}


def test_majority_and_constant_box_baselines(tmp_path):
    from frozenvl.shapesworld.demo import constant_box_baseline, majority_baseline

    train = [_conv("train00000-vqa-colour-0", "red"), _conv("train00001-vqa-colour-0", "blue"),
             _conv("train00002-vqa-colour-0", "blue"), _conv("train00000-vqa-exists-0", "yes"),
             _conv("train00000-vqa-exists-1", "no"),  # a tie: the alphabetically first answer
             _conv("train00000-caption-caption-0", "a red circle"),
             _conv("train00000-grounding-box-0", "[0.10,0.10,0.30,0.30]"),
             _conv("train00001-grounding-box-0", "[0.20,0.20,0.40,0.40]"),
             _conv("train00002-grounding-box-0", "[0.90,0.90,1.00,1.00]")]
    (tmp_path / "train.json").write_text(json.dumps(train))
    rows = [{"id": "eval00000-vqa-colour-0", "task": "vqa", "qtype": "colour", "question": "q", "answer": "blue"},
            {"id": "eval00001-vqa-colour-0", "task": "vqa", "qtype": "colour", "question": "q", "answer": "red"},
            {"id": "eval00000-vqa-exists-0", "task": "vqa", "qtype": "exists", "question": "q", "answer": "no"},
            {"id": "eval00000-vqa-exists-1", "task": "vqa", "qtype": "exists", "question": "q", "answer": "yes"}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    maj = majority_baseline(str(tmp_path / "train.json"), str(tmp_path / "eval.jsonl"))
    assert maj["answers"] == {"colour": "blue", "exists": "no"}
    assert maj["scores"]["vqa_acc/colour"].rows == ((1.0, 0.0),)  # sorted by id
    assert maj["scores"]["vqa_acc"].rows == ((1.0, 1.0, 0.0, 0.0),) and maj["scores"]["vqa_acc"].seed_free
    g = [{"id": "eval00000-grounding-box-0", "task": "grounding", "qtype": "box", "question": "q",
          "answer": "[0.20,0.20,0.40,0.40]"},
         {"id": "eval00001-grounding-box-0", "task": "grounding", "qtype": "box", "question": "q",
          "answer": "[0.60,0.60,0.80,0.80]"}]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in g))
    box = constant_box_baseline(str(tmp_path / "train.json"), str(tmp_path / "g.jsonl"))
    assert box["box"] == [0.2, 0.2, 0.4, 0.4]  # the coordinate-wise median
    assert box["scores"]["grounding_acc50"].rows == ((1.0, 0.0),)
    (tmp_path / "none.json").write_text(json.dumps(train[5:6]))
    with pytest.raises(ValueError, match="no VQA training records"):
        majority_baseline(str(tmp_path / "none.json"), str(tmp_path / "eval.jsonl"))


def test_recipes_are_data_driven(monkeypatch):
    """A family joins with one FAMILY_RECIPES entry; a family without one gets the generic recipe."""
    from frozenvl.shapesworld import demo

    monkeypatch.setitem(demo.FAMILIES, "zz_new", object())
    monkeypatch.setitem(demo.FAMILY_RECIPES, "zz_new", {
        "workflow": lambda scale: {"depth": scale.bases.llm_layers},
        "stages": [("one", ["a"], 1e-3, 0.25), ("two", ["a", "b"], {"a": 1e-3, "b": 1e-2}, 0.75)]})
    monkeypatch.setitem(demo.FAMILIES, "zz_plain", object())
    runs = {r.name: r for r in recipes(TINY)}
    new = runs["zz_new"]
    assert new.workflow == {"family": "zz_new", "select_layer": demo.VISION_LAYER, "depth": TINY.bases.llm_layers}
    total = TINY.align_steps + TINY.tune_steps
    assert [(st["name"], st["train"], st["steps"]) for st in new.stages] == [("one", ["a"], 1), ("two", ["a", "b"], total - 1)]
    plain = runs["zz_plain"]
    assert [(st["train"], st["steps"], st["lr"]) for st in plain.stages] == [(["*"], total, 1e-3)]
    # gated families give their gates the first (higher) lr
    for name in ("adaption_prompt", "bind", "cross_attention"):
        st = runs[name].stages[-1]
        assert isinstance(st["lr"], dict) and st["lr"][st["train"][0]] == 1e-2


def test_scene_texts_box_only_grounding_descriptions():
    """The LLM reads a scene's boxes only where a grounding question needs them; VQA and captions
    get the plain left-to-right description (a third as long), and both list the same shapes."""
    import random

    from frozenvl.data.boxes import box_format
    from frozenvl.shapesworld.bases import describe_scene, scene_text_records
    from frozenvl.shapesworld.world import sample_scene

    scene = sample_scene(random.Random(3), min_shapes=3, max_shapes=3)
    plain, boxed = describe_scene(scene, "bins32", boxes=False), describe_scene(scene, "bins32")
    assert plain.count(";") == boxed.count(";") == 2 and " at " not in plain
    assert [part.split(" at ")[0] for part in boxed.split("; ")] == plain.split("; ")
    assert len(box_format("bins32").parse(boxed)) == 3
    records = scene_text_records(60, seed=0, fmt="bins32")
    assert len(records) == 60 and {r["task"] for r in records} == {"scene-caption", "scene-vqa", "scene-grounding"}
    for r in records:
        has_box = bool(box_format("bins32").parse(r["conversations"][0]["value"]))
        assert has_box == (r["task"] == "scene-grounding"), r


def test_report_shows_the_highres_tables_and_survives_a_broken_one(tmp_path):
    from frozenvl.shapesworld.report import highres_section

    assert highres_section(str(tmp_path)) == []  # no high-resolution runs: no section
    (tmp_path / "highres").mkdir()
    table = ["192x192 scenes, connector `mlp2x_gelu`", "", "| run | VQA |", "|---|---:|", "| tiled | 42.2% |"]
    (tmp_path / "highres" / "results-192-mlp2x_gelu.json").write_text(json.dumps({"table": table}))
    (tmp_path / "highres" / "results-128-mlp2x_gelu.json").write_text("{not json")
    lines = highres_section(str(tmp_path))
    assert lines[1] == "## High resolution: one view vs dynamic tiling"
    assert lines[-len(table):] == table
    assert any("results-128-mlp2x_gelu.json could not be read" in line for line in lines)
