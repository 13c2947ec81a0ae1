"""`frozenvl demo`: the frozen-versus-fine-tuned finding, end to end, on a CPU in minutes.

1. writes ShapesWorld data (images + LLaVA JSON + eval JSONL);
2. builds the tiny bases (tokenizer, LLM pretrained on text tasks, ViT) — cached;
3. trains one workflow per family with the training engine, on the one frozen base: `prefix`
   (LLM frozen), `prefix` with `llm_train: full` (the LLaVA baseline that fine-tunes the LLM),
   `inner_adaptor` `mm` and `g` (IAA), and every other registered family with a generic recipe;
4. evaluates VQA, grounding, captions and held-out text tasks, and compares every workflow's
   text answers with the base LLM's;
5. prints a table, writes report.md + chart.png + results.json, then chats if a terminal is attached.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image, ImageDraw

from ..families import FAMILIES
from .bases import BaseSpec, build_bases

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


FULL = Scale(n_train_images=1500, n_eval_images=100, n_text_train=3000, n_text_eval=None,
             bases=BaseSpec(), align_steps=60, tune_steps=240, batch_size=16)
QUICK = Scale(n_train_images=200, n_eval_images=20, n_text_train=1200, n_text_eval=None,
              bases=replace(BaseSpec(), llm_steps=240, n_scene_texts=800, vit_steps=60),
              align_steps=10, tune_steps=30, batch_size=16)


@dataclass
class Run:
    """One trained workflow of the demo."""

    name: str
    label: str
    workflow: dict[str, Any]
    data: str  # training file in the data dir
    stages: list[dict[str, Any]]
    evals: list[str] = field(default_factory=lambda: ["vqa", "grounding", "caption"])


def recipes(scale: Scale) -> list[Run]:
    """The demo's runs: the seeds' comparison, then every other family with a generic recipe."""
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
    # Family options that must fit the tiny base; anything else takes the family's defaults.
    fit = {
        "adaption_prompt": {"adapter_layers": scale.bases.llm_layers},
        "cross_attention": {"every": 1, "resampler_depth": 2},
    }
    for family in sorted(FAMILIES):
        if family not in covered:  # families added later join with a generic recipe
            wf = {"family": family, "select_layer": VISION_LAYER, **fit.get(family, {})}
            # one stage over all the family's parts (not every family has a separate connector)
            steps = scale.align_steps + scale.tune_steps
            runs.append(Run(family, family, wf, "train_mixed.json", [stage("tune", ["*"], 1e-3, steps)]))
    return runs


def _data(out: str, scale: Scale, seed: int) -> str:
    from .writer import generate

    data_dir = os.path.join(out, "data")
    want = {"seed": seed, "n_train_images": scale.n_train_images, "n_eval_images": scale.n_eval_images,
            "n_text_train": scale.n_text_train}
    stamp = os.path.join(data_dir, "demo_params.json")
    if os.path.isfile(stamp) and json.load(open(stamp)) == want:
        return data_dir
    generate(data_dir, seed=seed, n_train_images=scale.n_train_images, n_eval_images=scale.n_eval_images,
             n_text_train=scale.n_text_train, n_text_eval=scale.n_text_eval, overwrite=True)
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


def run_demo(out: str = "demo_out", *, quick: bool = False, seed: int = 0, chat: bool | None = None,
             progress: bool = True, only: list[str] | None = None, scale: Scale | None = None) -> dict[str, Any]:
    """Run the whole demo; returns the results dict also written to results.json.

    `scale` overrides the preset sizes (FULL, or QUICK with `quick=True`); tests use a tiny one.
    """
    import frozenvl
    from ..eval import evaluate, read_eval_file, text_preservation
    from ..train import TrainConfig, train

    scale = scale or (QUICK if quick else FULL)
    t_start = time.time()
    os.makedirs(out, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.time()
    data_dir = _data(out, scale, seed)
    timings["data"] = time.time() - t
    t = time.time()
    llm_dir, vision_dir = build_bases(os.path.join(out, "bases"), data_dir, replace(scale.bases, seed=seed), progress)
    timings["bases"] = time.time() - t

    runs = [r for r in recipes(scale) if not only or r.name in only]
    label = "quick" if scale is QUICK else "full" if scale is FULL else "custom"
    results: dict[str, Any] = {"scale": label, "seed": seed, "runs": {}}
    for run in runs:
        cfg = TrainConfig.from_dict({
            "llm": llm_dir, "vision": vision_dir, "output_dir": os.path.join(out, "runs", run.name),
            "workflow": {"name": run.name, **run.workflow},
            "data": {"train": os.path.join(data_dir, run.data), "max_length": 256},
            "stages": run.stages, "seed": seed, "save_every": 0, "keep_last": 1, "log_every": 10,
        })
        if progress:
            print(f"\n== training {run.label} on {run.data}")
        res = train(cfg, show_progress=progress)
        results["runs"][run.name] = {"label": run.label, "train_seconds": res.seconds, "steps": res.steps,
                                     "final_loss": res.final_loss, "skipped": res.skipped,
                                     "base_unchanged": res.base_unchanged}
    timings["train"] = sum(r["train_seconds"] for r in results["runs"].values())

    # One model: the frozen base with every trained workflow loaded side by side.
    t = time.time()
    model = frozenvl.build(llm_dir, vision_dir, workflows={})
    for run in runs:
        model.load_workflow(os.path.join(out, "runs", run.name), run.name)
    results["runs"]["text"] = {"label": "base LLM (text workflow)"}
    for run in runs:
        info = model.info()["workflows"][run.name]
        results["runs"][run.name]["trainable_params"] = info["trainable_params"]
        for kind in run.evals:
            path = os.path.join(data_dir, f"eval_{kind}.jsonl")
            rep = evaluate(model, path, task=run.name, batch_size=scale.eval_batch,
                           max_new_tokens=40 if kind != "vqa" else 8, progress=progress)
            results["runs"][run.name].update(rep.metrics)
    text_sets = {"": "eval_text.jsonl", "_seen": "eval_text_seen.jsonl"}
    same: dict[str, list[int]] = {}
    for suffix, fname in text_sets.items():
        items = read_eval_file(os.path.join(data_dir, fname))
        tp = text_preservation(model, items, tasks=[r.name for r in runs], batch_size=scale.eval_batch,
                               max_new_tokens=16, progress=progress)
        for name, row in tp["tasks"].items():
            results["runs"].setdefault(name, {})
            results["runs"][name][f"text_acc{suffix}"] = row["accuracy"]
            n = same.setdefault(name, [0, 0])
            n[0] += row["n_same"]
            n[1] += tp["n_items"]
    for name, (n_same, n_all) in same.items():
        results["runs"][name]["text_same_as_base"] = n_same / max(1, n_all)
    timings["eval"] = time.time() - t
    timings["total"] = time.time() - t_start
    results["timings"] = timings
    results["findings"] = findings(results)
    write_report(out, results)
    print_table(results)
    for line in results["findings"]:
        print(line)
    print(f"\nreport: {os.path.join(out, 'report.md')}  chart: {os.path.join(out, 'chart.png')}  "
          f"total {timings['total']:.0f}s")
    if chat is None:
        chat = sys.stdin.isatty() and sys.stdout.isatty()
    if chat:
        _chat(model, results, data_dir)
    return results


COLUMNS = [
    ("vqa_acc", "VQA acc"), ("grounding_acc50", "Grnd Acc@0.5"), ("grounding_miou", "Grnd mIoU"),
    ("caption_cider", "Caption CIDEr"), ("text_acc_seen", "Text acc (seen)"), ("text_acc", "Text acc (held-out)"),
    ("text_same_as_base", "Text = base"),
    ("trainable_params", "Trainable"), ("train_seconds", "Train s"),
]


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "trainable_params":
        return f"{int(value):,}"
    if key == "train_seconds":
        return f"{value:.0f}"
    if key in ("caption_cider",):
        return f"{value:.2f}"
    return f"{100 * value:.1f}%"


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ShapesWorld: frozen base vs fine-tuned", title_justify="left")
    table.add_column("workflow")
    for _, title in COLUMNS:
        table.add_column(title, justify="right")
    for name, row in results["runs"].items():
        table.add_row(name, *[_fmt(k, row.get(k)) for k, _ in COLUMNS])
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # a log file: no need to squeeze the table into 80 columns
    console.print(table)


def findings(results: dict[str, Any]) -> list[str]:
    """The seeds' claims, checked on the numbers measured here (reported whatever they say)."""
    runs = results["runs"]
    out = []
    frozen = [n for n, r in runs.items() if n not in ("text", "prefix_full") and "text_same_as_base" in r]
    same = all(runs[n]["text_same_as_base"] == 1.0 for n in frozen)
    out.append(f"[{'reproduced' if same else 'NOT reproduced'}] frozen workflows answer the held-out text tasks "
               f"exactly like the base LLM: " + ", ".join(f"{n} {100 * runs[n]['text_same_as_base']:.0f}% same"
                                                         for n in frozen))
    for key, what in (("text_acc_seen", "pretraining text questions"), ("text_acc", "held-out text questions")):
        base = runs.get("text", {}).get(key)
        if "prefix_full" in runs and base is not None:
            full = runs["prefix_full"].get(key)
            verdict = "reproduced" if full is not None and full < base else "NOT reproduced"
            out.append(f"[{verdict}] the fine-tuned LLaVA baseline forgets ({what}): accuracy {100 * base:.1f}% "
                       f"(base) -> {100 * (full or 0):.1f}% (prefix_full)")
    if {"mm", "g", "prefix"} <= set(runs):
        vq_ok = runs["mm"].get("vqa_acc", 0) >= runs["prefix"].get("vqa_acc", 0)
        gr_ok = runs["g"].get("grounding_acc50", 0) >= runs["prefix"].get("grounding_acc50", 0)
        out.append(f"[{'reproduced' if vq_ok and gr_ok else 'NOT reproduced'}] inner_adaptor >= frozen prefix: "
                   f"VQA {100 * runs['mm'].get('vqa_acc', 0):.1f}% vs {100 * runs['prefix'].get('vqa_acc', 0):.1f}%, "
                   f"grounding Acc@0.5 {100 * runs['g'].get('grounding_acc50', 0):.1f}% vs "
                   f"{100 * runs['prefix'].get('grounding_acc50', 0):.1f}%")
    return out


def write_report(out: str, results: dict[str, Any]) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    lines = ["# ShapesWorld demo report", "",
             f"Scale: {results['scale']}, seed {results['seed']}. Timings (s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()), "",
             "| workflow | " + " | ".join(t for _, t in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, row in results["runs"].items():
        lines.append(f"| {name}: {row.get('label', '')} | " + " | ".join(_fmt(k, row.get(k)) for k, _ in COLUMNS) + " |")
    lines += ["", "## Findings", ""] + [f"- {line}" for line in results["findings"]]
    lines += ["", "`Text = base`: share of text questions (seen and held-out) answered exactly as the base LLM answers them.",
              "Text acc (seen): questions from the base LLM's text pretraining (the skills it had before being",
              "frozen: arithmetic, facts of a made-up world, word games); text acc (held-out): questions it never",
              "saw. Multimodal metrics are on held-out ShapesWorld images.", "",
              "![chart](chart.png)"]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _chart(os.path.join(out, "chart.png"), results)


def _chart(path: str, results: dict[str, Any]) -> None:
    """Grouped bars (VQA, grounding Acc@0.5, text acc) per workflow, drawn with Pillow."""
    metrics = [("vqa_acc", (66, 133, 244)), ("grounding_acc50", (52, 168, 83)), ("text_acc_seen", (234, 67, 53))]
    names = list(results["runs"])
    w, h, left, bottom = 120 * len(names) + 80, 320, 50, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    top = 20
    d.line([(left, top), (left, h - bottom), (w - 10, h - bottom)], fill="black")
    for frac in (0.25, 0.5, 0.75, 1.0):
        y = h - bottom - frac * (h - bottom - top)
        d.line([(left - 4, y), (w - 10, y)], fill=(220, 220, 220))
        d.text((5, y - 6), f"{int(frac * 100)}%", fill="black")
    for i, name in enumerate(names):
        x0 = left + 20 + 120 * i
        for j, (key, colour) in enumerate(metrics):
            v = results["runs"][name].get(key)
            if v is None:
                continue
            x = x0 + 28 * j
            d.rectangle([x, h - bottom - v * (h - bottom - top), x + 22, h - bottom], fill=colour)
        d.text((x0, h - bottom + 8), name[:16], fill="black")
    for j, (key, colour) in enumerate(metrics):
        d.rectangle([left + 160 * j, h - 22, left + 160 * j + 12, h - 10], fill=colour)
        d.text((left + 160 * j + 16, h - 22), key, fill="black")
    img.save(path)


def _chat(model, results: dict[str, Any], data_dir: str) -> None:
    from ..eval import read_eval_file

    runs = {n: r for n, r in results["runs"].items() if n != "text" and r.get("vqa_acc") is not None}
    best = max(runs, key=lambda n: runs[n]["vqa_acc"]) if runs else "text"
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

