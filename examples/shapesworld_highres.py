"""Small shapes in a large scene: does tiling beat one downscaled view? (docs/vision.md, "ShapesWorld at high resolution")

The ShapesWorld shapes (13-37 px across) drawn on a ``--side`` x ``--side`` canvas (default 192 px),
seen by the demo's tiny ViT, which was pretrained on 64-px views of 64-128-px scenes:

* ``single``: the whole scene as one 64-px view, so every shape shrinks ``side / 64`` times (at 192 px a
  small shape is 4-6 px across, under one 8-px patch);
* ``tiled``: InternVL's dynamic tiling (``tiling: dynamic``, ``max_tiles`` = (side / 64)^2, thumbnail
  on): a grid of 64-px tiles that shows the shapes at the scale the ViT knows, plus the same 64-px view
  of the whole scene as the thumbnail.

Both are the demo's frozen ``prefix`` recipe (align the connector, then tune it; seed, steps, batch and
learning rates as in ``frozenvl demo``), with the same connector (``--connector``; default the 2x2
``pixel_shuffle``: 16 tokens per 64-px view, so the tiled workflow gets 16 per tile), trained on the high-resolution scenes' mixed VQA,
caption and grounding data and scored on held-out high-resolution scenes: VQA per question type
beside the per-type majority answer, and grounding Acc@0.5 beside the median box. Both trainings run
at once, one CPU thread each (as the demo's jobs do).

    frozenvl demo --out demo_out --no-chat        # once: the demo's bases (or any finished demo dir)
    python examples/shapesworld_highres.py demo_out
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil

import frozenvl
from frozenvl.eval import evaluate
from frozenvl.eval.verdicts import Scores, estimate, percent
from frozenvl.shapesworld.demo import (
    DEMO_BOXES,
    FULL,
    LOSS,
    VISION_LAYER,
    constant_box_baseline,
    majority_baseline,
    recipes,
)
from frozenvl.shapesworld.jobs import Job, job_threads, run_jobs
from frozenvl.shapesworld.writer import generate

VIEW = 64  # the tiny ViT's input side


def workflows(side: int, connector: str, max_tiles: int | None = None) -> dict[str, dict]:
    """The two runs' workflows; `max_tiles` defaults to the grid that shows the scene at the ViT's scale."""
    common = {"family": "prefix", "select_layer": VISION_LAYER, "connector": connector}
    return {"single": dict(common),
            "tiled": {**common, "tiling": "dynamic", "max_tiles": max_tiles or (side // VIEW) ** 2}}


def run_config(llm_dir: str, vision_dir: str, data_dir: str, folder: str, name: str, workflow: dict,
               seed: int) -> dict:
    """The demo's frozen-prefix training (its `prefix` run's stages: align the connector, then tune it)."""
    stages = next(r for r in recipes(FULL) if r.name == "prefix").stages
    return {"llm": llm_dir, "vision": vision_dir, "output_dir": folder, "workflow": {"name": name, **workflow},
            # the tiny LLM's 512 positions: every tile's tokens, the prompt and the answer
            "data": {"train": os.path.join(data_dir, "train_mixed.json"), "max_length": 512},
            "stages": stages, "seed": seed, "save_every": 0, "keep_last": 1, "log_every": 1, **LOSS}


def train_one(cfg: dict, stamp: dict) -> None:
    """One training (a job: module level, so a spawned worker can import it); the stamp says what it
    was trained from, so that a later call can reuse it."""
    from frozenvl.train import train

    with job_threads():
        train(cfg, show_progress=False)
    _write_stamp(cfg["output_dir"], stamp)


STAMP = "highres_params.json"


def _stamp(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, STAMP)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_stamp(folder: str, stamp: dict) -> None:
    with open(os.path.join(folder, STAMP), "w") as f:
        json.dump(stamp, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_out", help="a `frozenvl demo --out` folder: its tiny bases are used")
    ap.add_argument("--out", default=None, help="where data and runs go (default: <demo_out>/highres)")
    ap.add_argument("--side", type=int, default=192, help="scene side in px, a multiple of 64 (default 192)")
    ap.add_argument("--connector", default="pixel_shuffle:factor=2",
                    help="both runs' connector (default pixel_shuffle:factor=2: 16 tokens per view; the demo's "
                         "mlp2x_gelu gives 64, which only fits the tiny LLM's 512 positions up to --side 128)")
    ap.add_argument("--max-tiles", type=int, default=None,
                    help="the tiled run's max_tiles (default (side / 64)^2: tiles at the ViT's own scale)")
    ap.add_argument("--runs", default="single,tiled", help="which of single,tiled to run (default both)")
    ap.add_argument("--train-images", type=int, default=FULL.n_train_images)
    ap.add_argument("--eval-images", type=int, default=FULL.n_eval_images)
    ap.add_argument("--seed", type=int, default=0, help="first training seed (the scenes' seed too)")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds: seed, seed+1, ... (default 3)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    if args.side % VIEW or args.side < 2 * VIEW:
        ap.error(f"--side must be a multiple of {VIEW} and at least {2 * VIEW}, got {args.side}")
    found = sorted(glob.glob(os.path.join(args.demo_out, "bases", "bases-*", "done.json")))
    if not found:
        ap.error(f"{args.demo_out}: no finished tiny bases under bases/ (run `frozenvl demo --out {args.demo_out}` first)")
    home = os.path.dirname(found[0])
    llm_dir, vision_dir = os.path.join(home, "llm"), os.path.join(home, "vision")
    out = args.out or os.path.join(args.demo_out, "highres")
    data_dir = os.path.join(out, f"data-{args.side}")
    scenes = {"seed": args.seed, "side": args.side, "train_images": args.train_images, "eval_images": args.eval_images}
    if _stamp(data_dir) != scenes:  # another scene set asked for: written again (runs on the old one retrain)
        generate(data_dir, seed=args.seed, n_train_images=args.train_images, n_eval_images=args.eval_images,
                 n_text_train=0, image_size=(args.side, args.side), box_format=DEMO_BOXES, overwrite=True)
        _write_stamp(data_dir, scenes)

    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    known = workflows(args.side, args.connector, args.max_tiles)
    if not wanted or set(wanted) - set(known):
        ap.error(f"--runs must name some of {', '.join(known)}, got {args.runs!r}")
    wfs = {k: v for k, v in known.items() if k in wanted}
    seeds = list(range(args.seed, args.seed + args.seeds))
    tag = f"{args.side}-{args.connector.split(':')[0]}" + (f"-max{args.max_tiles}" if args.max_tiles else "")
    run_dir = {(name, sd): os.path.join(out, f"run-{tag}-{name}-seed{sd}") for name in wfs for sd in seeds}
    jobs = []
    for (name, sd), folder in run_dir.items():
        cfg = run_config(llm_dir, vision_dir, data_dir, folder, name, wfs[name], sd)
        stamp = {"cfg": {k: v for k, v in cfg.items() if k != "output_dir"}, "scenes": scenes}
        if _stamp(folder) == stamp and os.path.isfile(os.path.join(folder, "train_summary.json")):
            continue  # trained by an earlier call, with the same config and scenes
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished or other run trains again from scratch
        jobs.append(Job(f"{name}/seed{sd}", train_one, (cfg, stamp)))
    print(f"training {len(jobs)} runs ({len(run_dir) - len(jobs)} reused), {min(args.jobs, max(1, len(jobs)))} at a time",
          flush=True)
    run_jobs(jobs, args.jobs, on_done=lambda job, _: print(f"   {job.name} trained", flush=True))
    # each run's own training time (one thread), whether trained now or by an earlier call
    seconds = {name: sum(_train_seconds(run_dir[name, sd]) for sd in seeds) for name in wfs}

    print(f"evaluating {len(run_dir)} runs on {args.eval_images} scenes", flush=True)
    model = frozenvl.build(llm_dir, vision_dir, workflows={})
    per_item: dict[str, dict[str, list[list[float]]]] = {name: {} for name in wfs}
    tokens = {}
    for (name, _seed), folder in run_dir.items():
        model.load_workflow(folder, name)
        tokens[name] = model.image_token_counts(name, model.pixel_values([_first_eval_image(data_dir)], name))
        for kind, new_tokens in (("vqa", 8), ("grounding", 40)):
            rep = evaluate(model, os.path.join(data_dir, f"eval_{kind}.jsonl"), task=name, max_new_tokens=new_tokens,
                           progress=False)
            preds = sorted(rep.predictions, key=lambda p: p["id"])
            metric = "vqa_acc" if kind == "vqa" else "grounding_acc50"
            per_item[name].setdefault(metric, []).append([p["score"] for p in preds])
            if kind == "vqa":
                for q in sorted({p["qtype"] for p in preds}):
                    per_item[name].setdefault(f"vqa_acc/{q}", []).append([p["score"] for p in preds if p["qtype"] == q])
    majority = majority_baseline(os.path.join(data_dir, "train_mixed.json"), os.path.join(data_dir, "eval_vqa.jsonl"))
    box = constant_box_baseline(os.path.join(data_dir, "train_grounding.json"),
                                os.path.join(data_dir, "eval_grounding.jsonl"), DEMO_BOXES)
    base = {**majority["scores"], "grounding_acc50": box["scores"]["grounding_acc50"]}
    scores = {name: {k: Scores.of(v, bounds=(0, 1)) for k, v in m.items()} for name, m in per_item.items()}
    qtypes = sorted(k.split("/")[1] for k in majority["scores"] if "/" in k)
    cols = [f"vqa_acc/{q}" for q in qtypes] + ["vqa_acc", "grounding_acc50"]

    def cell(sc: Scores) -> str:
        return percent(estimate(sc))

    table = [f"{args.side}x{args.side} scenes, connector `{args.connector}`, {args.train_images} training / "
             f"{args.eval_images} eval images, seeds {seeds}; training "
             + ", ".join(f"{name} {v:.0f} s" for name, v in seconds.items()) + " (one thread, all seeds)", "",
             "| run | tokens/image | " + " | ".join(c.replace("vqa_acc/", "") for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols),
             "| majority / median box | - | " + " | ".join(cell(base[c]) for c in cols) + " |"]
    table += [f"| {name} ({_layout(wfs[name])}) | {tokens[name]} | " + " | ".join(cell(scores[name][c]) for c in cols)
              + " |" for name in wfs]
    if len(wfs) == 2:
        table.append("| tiled - single (paired) | - | " + " | ".join(
            cell(scores["tiled"][c].minus(scores["single"][c])) for c in cols) + " |")
    print("\n" + "\n".join(table) + "\n\n(95% intervals as in frozenvl.eval.verdicts)")
    # the demo's report.md shows every table found here (`frozenvl demo --out DEMO_OUT` again writes it)
    with open(os.path.join(out, f"results-{tag}.json"), "w") as f:
        json.dump({"side": args.side, "seeds": seeds, "train_seconds": seconds, "tokens_per_image": tokens,
                   "estimates": {name: {k: estimate(v).to_dict() for k, v in m.items()} for name, m in scores.items()},
                   "baselines": {k: estimate(v).to_dict() for k, v in base.items()}, "table": table}, f, indent=1)


def _train_seconds(folder: str) -> float:
    with open(os.path.join(folder, "train_summary.json")) as f:
        return json.load(f)["seconds"]


def _layout(wf: dict) -> str:
    return f"tiles, at most {wf['max_tiles']}, + thumbnail" if wf.get("tiling") else "one view"


def _first_eval_image(data_dir: str):
    from PIL import Image

    return Image.open(os.path.join(data_dir, "images", "eval", "00000.png")).convert("RGB")


if __name__ == "__main__":
    main()
