"""The demo's report: report.md and its figures, drawn with matplotlib (Agg: no display needed).

- chart.png: grouped bars per metric with 95% error bars; the chance baselines drawn as bands;
- qtypes.png: VQA accuracy per question type beside the per-type majority baseline;
- loss.png: the training loss of every workflow (each run dir's metrics.jsonl);
- examples.png: three eval scenes with each workflow's answer and predicted box.

It reads only the results dict (results.json's content), the first seed's predictions and the run
directories, so a `--bases real` run reports through the same code.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

__all__ = ["write_report"]

FIGURES = ("chart.png", "qtypes.png", "loss.png", "examples.png")
_PANELS = [  # (metric, title, baseline in results["baselines"] or None)
    ("vqa_acc", "VQA accuracy", "majority"),
    ("grounding_acc50", "Grounding Acc@0.5", "constant_box"),
    ("grounding_miou", "Grounding mIoU", "constant_box"),
    ("caption_cider", "Caption CIDEr-D", None),
    ("text_acc_seen", "Text accuracy (pretraining questions)", None),
    ("text_same_as_base_own", "Text answers = base: deployed (hatched) vs own path", None),
]
_BASELINE_NAME = {"majority": "majority answer per type", "constant_box": "median training box"}



def _printable(text: str) -> str:
    """`text` with every non-printable character (control codes, ...) shown as "?"."""
    return "".join(c if c.isprintable() else "?" for c in text)

def _colours(names: list[str]) -> dict[str, Any]:
    """One colour per workflow, the same in every figure; the base LLM ("text") in grey."""
    cmap = plt.get_cmap("tab10")
    others = [n for n in names if n != "text"]
    return {"text": (0.55, 0.55, 0.55, 1.0), **{n: cmap([0, 1, 2, 3, 4, 5, 6, 8, 9, 10][i % 10] / 10 + 0.05)
                                                 for i, n in enumerate(others)}}


def _is_pct(key: str) -> bool:
    return not key.startswith("caption")


def _bar(ax, x: float, est: dict[str, Any], colour, width: float, scale: float, **style: Any) -> None:
    mean = scale * est["mean"]
    err = None
    if est.get("low") is not None:
        err = [[mean - scale * est["low"]], [scale * est["high"] - mean]]
    ax.bar(x, mean, width, color=colour, yerr=err, capsize=3, error_kw={"elinewidth": 1}, **style)


def _band(ax, est: dict[str, Any], scale: float, label: str) -> None:
    """A baseline: dashed line at its mean, shaded over its interval."""
    ax.axhline(scale * est["mean"], color="black", linestyle="--", linewidth=1, label=label)
    if est.get("low") is not None:
        ax.axhspan(scale * est["low"], scale * est["high"], color="grey", alpha=0.2)


def _chart(path: str, results: dict[str, Any], colours: dict[str, Any]) -> None:
    runs = results["runs"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (key, title, baseline) in zip(axes.flat, _PANELS):
        names = [n for n, r in runs.items() if key in r["metrics"]]
        scale = 100 if _is_pct(key) else 1
        for i, n in enumerate(names):
            if key == "text_same_as_base_own":  # the pair: as deployed (fallback on) beside the own path
                _bar(ax, i - 0.2, runs[n]["metrics"]["text_same_as_base"], colours[n], 0.38, scale,
                     alpha=0.45, hatch="//", edgecolor="black", linewidth=0.5)
                _bar(ax, i + 0.2, runs[n]["metrics"][key], colours[n], 0.38, scale)
            else:
                _bar(ax, i, runs[n]["metrics"][key], colours[n], 0.7, scale)
        if baseline and key in results["baselines"][baseline]["metrics"]:
            _band(ax, results["baselines"][baseline]["metrics"][key], scale, _BASELINE_NAME[baseline])
            ax.legend(loc="upper right", fontsize=8)
        ax.set_title(title, fontsize=11)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=9)
        if _is_pct(key):
            ax.set_ylim(0, 105)
            ax.set_ylabel("%")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
        if not names:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="grey")
    n = len(results["seeds"])
    fig.suptitle(f"ShapesWorld, {n} training seed{'s' * (n > 1)} (data seed {results['data_seed']}): "
                 "mean and 95% interval" + (" (one seed: no interval)" if n < 2 else ""), fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _qtypes(path: str, results: dict[str, Any], colours: dict[str, Any]) -> None:
    majority = results["baselines"]["majority"]["metrics"]
    qtypes = sorted(k.split("/", 1)[1] for k in majority if k.startswith("vqa_acc/"))
    keys = [f"vqa_acc/{q}" for q in qtypes] + ["vqa_acc"]
    names = [n for n, r in results["runs"].items() if "vqa_acc" in r["metrics"]]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(keys) + 2), 5))
    width = 0.8 / max(1, len(names))
    for j, key in enumerate(keys):
        for i, n in enumerate(names):
            est = results["runs"][n]["metrics"].get(key)
            if est is not None:
                _bar(ax, j - 0.4 + width * (i + 0.5), est, colours[n], width, 100)
        m = majority[key]
        ax.hlines(100 * m["mean"], j - 0.45, j + 0.45, color="black", linewidth=2)
        if m.get("low") is not None:
            ax.add_patch(Rectangle((j - 0.45, 100 * m["low"]), 0.9, 100 * (m["high"] - m["low"]),
                                   color="grey", alpha=0.2, linewidth=0))
    handles = [Rectangle((0, 0), 1, 1, color=colours[n]) for n in names]
    handles.append(plt.Line2D([], [], color="black", linewidth=2))
    ax.legend(handles, [*names, "majority answer per type (band: 95% interval)"], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_xticks(range(len(keys)), [*qtypes, "overall"])
    ax.set_ylim(0, 105)
    ax.set_ylabel("VQA accuracy, %")
    ax.set_title("VQA per question type beside the majority baseline (95% intervals)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loss_rows(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: a readable curve from per-step losses."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _loss(path: str, out: str, results: dict[str, Any], colours: dict[str, Any]) -> None:
    names = [n for n in results["runs"] if n != "text"]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    lowest, highest = float("inf"), 0.0
    for n in names:
        for k, s in enumerate(results["seeds"]):
            rows = [r for r in _loss_rows(os.path.join(out, "runs", f"seed{s}", n, "metrics.jsonl"))
                    if r.get("tokens", 1) > 0]  # a step without answer tokens has no loss
            if not rows:
                continue
            steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
            smooth = _smooth(losses, max(1, len(losses) // 25))
            lowest, highest = min(lowest, *smooth), max(highest, *smooth)
            if k == 0:
                ax.plot(steps, losses, color=colours[n], linewidth=0.6, alpha=0.25)
            ax.plot(steps, smooth, color=colours[n], linewidth=1.8 if k == 0 else 0.9, alpha=1.0 if k == 0 else 0.45,
                    label=n if k == 0 else None)
    if highest > 0 and lowest > 0 and highest / lowest > 5:  # log only where the range asks for it
        ax.set_yscale("log")
    ax.set_xlabel("training step (all stages)")
    ax.set_ylabel("loss on answer tokens (moving average; raw: faint)")
    extra = "; thin: other seeds" if len(results["seeds"]) > 1 else ""
    ax.set_title(f"Training loss per workflow, seed {results['seeds'][0]}{extra}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _image_of(item_id: str) -> str:
    return item_id.split("-", 1)[0]  # "eval00003-vqa-colour-0" -> "eval00003" (writer.py's ids)


def example_scenes(preds: dict[str, dict[str, list[dict[str, Any]]]], n: int = 3) -> list[dict[str, Any]]:
    """The first `n` eval scenes with a grounding item: per scene its image, one grounding item and
    one VQA item, each with every workflow's prediction."""
    by_image: dict[str, dict[str, Any]] = {}
    for name, kinds in preds.items():
        for kind in ("grounding", "vqa"):
            for p in kinds.get(kind, []):
                scene = by_image.setdefault(_image_of(p["id"]), {"image": p.get("image"), "grounding": {}, "vqa": {}})
                scene[kind].setdefault(p["id"], {"item": p, "answers": {}})["answers"][name] = p["prediction"]
    picked = []
    for key in sorted(by_image):
        scene = by_image[key]
        if scene["grounding"] and scene["image"]:
            g = scene["grounding"][min(scene["grounding"])]
            vqa_ids = sorted(scene["vqa"])
            v = scene["vqa"][vqa_ids[len(picked) % len(vqa_ids)]] if vqa_ids else None  # vary the question type
            picked.append({"key": key, "image": scene["image"], "grounding": g, "vqa": v})
        if len(picked) == n:
            break
    return picked


def _examples(path: str, out: str, preds: dict[str, dict[str, list[dict[str, Any]]]], colours: dict[str, Any]) -> bool:
    from PIL import Image

    from ..data.boxes import box_format
    from ..eval import normalize_answer
    from ..vision.images import square_pad_offsets

    scenes = example_scenes(preds)
    if not scenes:
        return False
    # one row per scene: the image (with the boxes) on the left, the answers on the right
    fig, axes = plt.subplots(len(scenes), 2, figsize=(13, 3.6 * len(scenes)),
                             gridspec_kw={"width_ratios": [1, 1.7]}, squeeze=False)
    for row, scene in enumerate(scenes):
        ax, tx = axes[row]
        img = Image.open(os.path.join(out, scene["image"])).convert("RGB")  # relative to out, or absolute
        w, h = img.size
        side, left, top = square_pad_offsets(w, h)
        ax.imshow(img, interpolation="nearest")

        fmt = box_format(scene["grounding"]["item"].get("box_format"))  # how the eval items write boxes

        def draw(box_text: str, colour, style: str, width: float) -> bool:
            boxes = fmt.parse(box_text)
            if not boxes:
                return False
            x1, y1, x2, y2 = (v * side for v in boxes[0])
            ax.add_patch(Rectangle((x1 - left, y1 - top), x2 - x1, y2 - y1, fill=False, edgecolor=colour,
                                   linestyle=style, linewidth=width))
            return True

        g = scene["grounding"]
        draw(str(g["item"]["answer"]), "black", "--", 2.0)
        target = g["item"]["question"].rsplit(":", 1)[-1].strip().rstrip(".")  # "... describes: the red circle."
        lines = [(f"Where is {target}? (true box dashed: {g['item']['answer']})", "black")]
        for name, answer in sorted(g["answers"].items()):
            ok = draw(answer, colours[name], "-", 1.5)
            lines.append((f"  {name:<16} {answer[:40] if ok else 'no box: ' + answer[:32]!s}", colours[name]))
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(scene["key"], fontsize=10)
        v = scene["vqa"]
        if v is not None:
            truth = v["item"]["answer"]
            truth = truth[0] if isinstance(truth, list) else truth
            lines.append((f"Q: {v['item']['question']} (true: {truth})", "black"))
            for name, answer in sorted(v["answers"].items()):
                mark = "right" if normalize_answer(answer) == normalize_answer(truth) else "wrong"
                lines.append((f"  {name:<16} {answer[:32]!s}  [{mark}]", colours[name]))
        tx.axis("off")
        for i, (text, colour) in enumerate(lines):
            text = _printable(text)  # a model's raw output may hold control characters no font has
            tx.text(0.0, 1.0 - i / max(16, len(lines)), text, transform=tx.transAxes, fontsize=9, color=colour,
                    va="top", family="monospace")
    fig.suptitle("Example eval scenes: each workflow's predicted box and answer (first seed)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(key: str, est: dict[str, Any] | None) -> str:
    from .demo import fmt

    return fmt(key, est)


def _bases_section(results: dict[str, Any]) -> list[str]:
    """The ceiling every frozen-LLM workflow works under: what the ViT's features and the LLM know."""
    probes = results.get("bases", {}).get("probes")
    if not probes:
        return []
    vit, llm = probes["vit"], probes["llm"]
    keys = [k for k in ("colour", "kind", "size", "count", "box_acc50") if k in vit]
    qtypes = [k for k in llm if k != "overall"]
    real = results.get("track") == "real"
    encoder = "DINOv2's" if real else "the ViT's"
    layer = f" (hidden layer {vit['layer']}, the workflows' default)" if "layer" in vit else ""
    llm_text = ("SmolLM2's zero-shot VQA accuracy on fresh scenes *described in words*, in the chat answers "
                "it writes untrained (right when it names the answer and no other candidate answer): a floor "
                "of what it can read from words, not a trained ceiling."
                if real else "The base LLM's VQA accuracy on fresh scenes *described in words* (its pretraining "
                "format): no workflow that keeps this LLM frozen can be expected to beat it.")
    return ["", "## What the frozen bases know (the ceiling)", "",
            f"Linear probes on {encoder} patch features{layer}, on {vit.get('n_shapes_scored', '?')} shapes of "
            "fresh scenes (colour, kind, size and box from the patch under each shape's centre, box as Acc@0.5 of "
            "the linearly read box; count from the mean patch feature):", "",
            "| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys),
            "| " + " | ".join(f"{100 * vit[k]:.1f}%" for k in keys) + " |", "",
            llm_text, "",
            "| " + " | ".join([*("grounding Acc@0.5" if q == "box" else q for q in qtypes), "VQA overall"]) + " |",
            "|" + "---:|" * (len(qtypes) + 1),
            "| " + " | ".join(f"{100 * llm[k]:.1f}%" for k in [*qtypes, "overall"]) + " |"]


def _families_section(results: dict[str, Any]) -> list[str]:
    """Per workflow: what its stages train, how many parameters, and where its gates ended."""
    lines = ["", "## What each workflow trains", "",
             f"Loss weighting: `{results.get('loss', {})}`; box format `{results.get('box_format', 'unit')}`.", "",
             "| workflow | stages (train: lr, steps) | trainable params | gates mean abs (max), per seed |",
             "|---|---|---:|---|"]
    for name, row in results["runs"].items():
        if "stages" not in row:
            continue
        stages = "; ".join(f"{st['name']}: {'+'.join(st['train'])} @ {st['lr']}, {st['steps']}" for st in row["stages"])
        gates = "-"
        if "gates" in row:
            gates = ", ".join(f"{g:.3f} ({m:.3f})" for g, m in zip(row["gates"], row["gates_max"]))
        lines.append(f"| {name} | {stages} | {row['trainable_params']:,} | {gates} |")
    return lines


def highres_section(out: str) -> list[str]:
    """The tables of `examples/shapesworld_highres.py` found in ``<out>/highres`` (one per scene size and
    connector it was run with): one downscaled view against dynamic tiling on larger scenes."""
    found = []
    for path in sorted(glob.glob(os.path.join(out, "highres", "results-*.json"))):
        try:
            with open(path) as f:
                table = json.load(f)["table"]
        except (OSError, ValueError, KeyError, TypeError) as e:  # a broken file must not cost the report
            table = [f"({os.path.basename(path)} could not be read: {e})"]
        found += ["", *table]
    if not found:
        return []
    return ["", "## High resolution: one view vs dynamic tiling", "",
            "Small shapes on larger scenes, the frozen `prefix` recipe with the whole scene as one view of the ViT "
            "and with InternVL's dynamic tiling (`examples/shapesworld_highres.py`; docs/vision.md). Each table "
            "has its own seeds and scene set; 95% intervals as above.", *found]


def write_report(out: str, results: dict[str, Any], preds: dict[str, dict[str, list[dict[str, Any]]]],
                 timings: dict[str, Any] | None = None) -> list[str]:
    """Write report.md and the figures into `out`; returns the figure file names written."""
    from .demo import COLUMNS

    runs = results["runs"]
    colours = _colours(list(runs))
    _chart(os.path.join(out, "chart.png"), results, colours)
    _qtypes(os.path.join(out, "qtypes.png"), results, colours)
    _loss(os.path.join(out, "loss.png"), out, results, colours)
    figures = ["chart.png", "qtypes.png", "loss.png"]
    if _examples(os.path.join(out, "examples.png"), out, preds, colours):
        figures.append("examples.png")

    n = len(results["seeds"])
    base = results["baselines"]
    lines = ["# ShapesWorld demo report", "",
             f"Scale: {results['scale']}; training seeds {results['seeds']}; data seed {results['data_seed']}.", "",
             f"**Intervals.** {results['interval']}", "",
             "## Findings", ""]
    lines += [f"- **{f['verdict']}**: {f['claim']}: {f['line'].split(': ', 1)[1]}" for f in results["findings"]]
    if n < 2:
        lines += ["", "One training seed: no interval, so nothing is decided. Run `frozenvl demo --seeds 3`."]
    lines += ["", "## Results (mean and 95% interval)", "",
              "| workflow | " + " | ".join(t for _, t in COLUMNS) + " | trainable | steps |",
              "|---|" + "---:|" * (len(COLUMNS) + 2)]
    chance = base["majority"]["metrics"] | base["constant_box"]["metrics"]
    lines.append("| majority answer / median box | " + " | ".join(_fmt(k, chance.get(k)) for k, _ in COLUMNS)
                 + " | - | - |")
    for name, row in runs.items():
        params = f"{row['trainable_params']:,}" if "trainable_params" in row else "-"
        title = name if row["label"] == name else f"{name}: {row['label']}"
        lines.append(f"| {title} | " + " | ".join(_fmt(k, row["metrics"].get(k)) for k, _ in COLUMNS)
                     + f" | {params} | {row.get('steps', '-')} |")
    qtypes = sorted(k.split("/", 1)[1] for k in base["majority"]["metrics"] if k.startswith("vqa_acc/"))
    majority = base["majority"]["metrics"]
    answers = base["majority"]["answers"]
    lines += ["", "## VQA per question type", "",
              "| workflow | " + " | ".join(qtypes) + " | overall |", "|---|" + "---:|" * (len(qtypes) + 1),
              "| majority answer per type | " + " | ".join(
                  f"{_fmt('vqa', majority[f'vqa_acc/{q}'])} (\"{answers.get(q, '?')}\")" for q in qtypes)
              + f" | {_fmt('vqa', majority['vqa_acc'])} |"]
    for name, row in runs.items():
        if "vqa_acc" in row["metrics"]:
            lines.append(f"| {name} | " + " | ".join(_fmt("vqa", row["metrics"].get(f"vqa_acc/{q}")) for q in qtypes)
                         + f" | {_fmt('vqa', row['metrics']['vqa_acc'])} |")
    lines += _bases_section(results) + _families_section(results) + highres_section(out)
    lines += ["", "The majority baseline answers every question of a type with that type's most common training "
              "answer; \"learned\" means an interval above the baseline's interval. The median box answers every "
              "grounding question with the coordinate-wise median of the training boxes.", "",
              "`Text = base`: share of text questions (seen and held-out) answered exactly as the base LLM answers "
              "them. *Deployed*: with `text_fallback` on, image-free prompts go to the base itself, so a frozen "
              "workflow scores 100% by construction. *Own path*: text_fallback off, the prompt goes through the "
              "workflow's own modules: the figure that tells families apart. Text acc (seen): questions from the "
              "base LLM's text pretraining (what fine-tuning can make it forget); held-out: questions it never saw. "
              "Multimodal metrics are on held-out ShapesWorld images.", "",
              "An interval is \"± half-width\", or \"[low, high]\" where it was clipped to the score's range "
              "(0-100%). A figure that is 0% or 100% on every item and seed has a zero-width interval: the t "
              "interval's known limit at the ends of the range, which matters only for small eval sets.", "",
              "## Figures", "",
              "![metrics](chart.png)", "", "![per question type](qtypes.png)", "", "![loss](loss.png)", ""]
    if "examples.png" in figures:
        lines += ["![examples](examples.png)", ""]
    lines += ["Per-seed numbers: `results.json` (identical for identical seeds); per-item predictions: "
              "`predictions/seed<N>.json`; wall times: `timings.json`."]
    if timings:
        walls = [f"{k} {v:.0f}" for k, v in timings.items() if isinstance(v, (int, float))]
        lines += ["", "Wall time (s): " + ", ".join(walls)]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return figures
