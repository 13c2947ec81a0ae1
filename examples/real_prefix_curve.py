"""How many samples does a frozen SmolLM2 need to read colour and shape through a prefix? (docs/real_bases.md, "Learning curves")

The real track's frozen ``prefix`` (SmolLM2-135M-Instruct + DINOv2-S/14 from ``frozenvl bases``, the
LLM and the encoder frozen, only the connector trains) on ShapesWorld VQA questions of the chosen
types only (``--qtypes``, default ``colour,shape``: the issue's two targets), scored on held-out
scenes every ``--eval-every`` optimizer steps, beside the per-type majority answer of the training
questions. One stage trains the connector at ``--lr`` (5% warm-up, cosine to 0 over ``--steps``),
batch ``--batch``, loss per sample, under the real track's precision (bf16 autocast where the CPU
has bf16 matmuls).

    frozenvl bases                                            # once: the real bases (offline, cached)
    python examples/real_prefix_curve.py curves --connector pixel_shuffle:factor=2   # 64 tokens/image
    python examples/real_prefix_curve.py curves --connector pixel_shuffle:factor=4   # 16 tokens/image

Each call trains one run with ``--threads`` CPU threads (default 1, so two calls can share a 2-core
machine) and writes ``<out>/run-<tag>/curve.json``: one row per evaluation (step, samples seen,
training seconds so far, accuracy per question type with its 95% interval) and the majority row,
and each evaluation's answers (``predictions-<step>.jsonl``).
The scenes (``<out>/data``) are written by the first call and reused by later ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch

import frozenvl
from frozenvl.eval import evaluate, read_eval_file
from frozenvl.eval.verdicts import Scores, estimate, percent
from frozenvl.shapesworld.demo import LOSS, majority_baseline
from frozenvl.shapesworld.real import real_bases, train_precision
from frozenvl.shapesworld.writer import generate

STAMP = "curve_params.json"


def scenes(out: str, seed: int, n_train: int, n_eval: int, qtypes: list[str]) -> tuple[str, str]:
    """(training file, eval file) of the chosen question types; the scenes are written once (into a
    temporary folder, then moved, so a second call started meanwhile never reads half a set)."""
    data_dir = os.path.join(out, "data")
    want = {"seed": seed, "train_scenes": n_train, "eval_scenes": n_eval}
    if _read(os.path.join(data_dir, STAMP)) != want:
        tmp = tempfile.mkdtemp(dir=out, prefix=".data-")
        generate(tmp, seed=seed, n_train_images=n_train, n_eval_images=n_eval, n_text_train=0, overwrite=True)
        _write(os.path.join(tmp, STAMP), want)
        shutil.rmtree(data_dir, ignore_errors=True)
        os.replace(tmp, data_dir)
    tag = "-".join(qtypes)
    train_path, eval_path = os.path.join(data_dir, f"train_{tag}.json"), os.path.join(data_dir, f"eval_{tag}.jsonl")
    with open(os.path.join(data_dir, "train_mixed.json")) as f:
        # training ids name their type (train00012-vqa-colour-0; see frozenvl.shapesworld.writer)
        train = [r for r in json.load(f) if any(f"-vqa-{q}-" in r["id"] for q in qtypes)]
    items = [it for it in read_eval_file(os.path.join(data_dir, "eval_vqa.jsonl")) if it["qtype"] in qtypes]
    if not train or not items:
        raise SystemExit(f"--qtypes {','.join(qtypes)}: no such VQA questions in the scenes")
    _write(train_path, train)
    with open(eval_path, "w") as f:
        f.writelines(json.dumps(it) + "\n" for it in items)
    return train_path, eval_path


def _read(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def standardize_features(model, task: str, image_paths: list[str]) -> dict[str, torch.Tensor]:
    """Make workflow `task`'s connector read each vision channel standardised: minus its mean, over its
    std, both over every patch of `image_paths` (a forward pre-hook, so nothing else changes). DINOv2's
    channels differ in spread by 10x (docs/real_bases.md), and colour lies along the narrow ones, which
    a connector trained with Adam picks up slowly."""
    from PIL import Image

    feats = []
    for k in range(0, len(image_paths), 16):
        pics = [Image.open(p).convert("RGB") for p in image_paths[k : k + 16]]
        feats.append(model.vision_features(task, model.pixel_values(pics, task)).flatten(0, 1).float())
    x = torch.cat(feats)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    connector = model.workflow(task).connector
    connector.register_forward_pre_hook(lambda _m, inputs: ((inputs[0] - mean.to(inputs[0])) / std.to(inputs[0]),))
    return {"mean": mean, "std": std}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder for the scenes and the runs")
    ap.add_argument("--connector", default="pixel_shuffle:factor=2",
                    help="the prefix's connector (default pixel_shuffle:factor=2: the real track's 64 tokens)")
    ap.add_argument("--layers", default="",
                    help="DINOv2 hidden layers the connector reads, e.g. 4 or -2,4 (two layers: one encoder, "
                         "their features side by side per patch; docs/vision.md, \"Mixed encoders\"); "
                         "default: the workflow's select_layer (-2)")
    ap.add_argument("--qtypes", default="colour,shape", help="VQA question types to train and score")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-scenes", type=int, default=2000)
    ap.add_argument("--eval-scenes", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0, help="training seed (the scenes always use seed 0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--standardize", type=int, default=0, metavar="N",
                    help="standardise each vision channel before the connector, with the mean and std of the "
                         "patch features of the first N training images (default 0: off; an experiment, not a "
                         "library option: see standardize_features)")
    args = ap.parse_args()
    qtypes = [q.strip() for q in args.qtypes.split(",") if q.strip()]
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--layers {args.layers!r}: expected integers separated by commas, e.g. -2,4")
    for name in ("steps", "eval_every", "batch", "train_scenes", "eval_scenes", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.standardize < 0:
        ap.error("--standardize must be >= 0")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    llm_dir, vision_dir, _ = real_bases()
    train_path, eval_path = scenes(args.out, 0, args.train_scenes, args.eval_scenes, qtypes)
    items = read_eval_file(eval_path)
    majority = majority_baseline(train_path, eval_path)["scores"]
    tag = f"{args.connector.replace(':', '-').replace('=', '')}-lr{args.lr:g}-b{args.batch}-s{args.steps}-seed{args.seed}" \
        + (f"-std{args.standardize}" if args.standardize else "") + (f"-layers{'_'.join(map(str, layers))}" if layers else "")
    run_dir = os.path.join(args.out, f"run-{'-'.join(qtypes)}-{tag}")
    shutil.rmtree(run_dir, ignore_errors=True)
    vision: str | list[dict] = [{"path": vision_dir, "select_layer": k} for k in layers] or vision_dir
    cfg = {"llm": llm_dir, "vision": vision, "output_dir": run_dir,
           "workflow": {"name": "prefix", "family": "prefix", "connector": args.connector},
           "data": {"train": train_path},
           "stages": [{"name": "tune", "train": ["connector"], "lr": args.lr, "steps": args.steps,
                       "batch_size": args.batch, "warmup_ratio": 0.05, "schedule": "cosine"}],
           "seed": args.seed, "precision": train_precision(), "save_every": 0, "keep_last": 1, "log_every": 10,
           **LOSS}
    rows: list[dict] = []
    table: list[tuple[dict, dict]] = []  # (row, its Estimates) for the closing table
    clock = {"start": time.time(), "eval": 0.0}

    def score(trainer, position) -> None:
        if position.global_step % args.eval_every and position.global_step != args.steps:
            return
        t0 = time.time()
        rep = evaluate(trainer.model, items, task="prefix", max_new_tokens=8, batch_size=24, progress=False)
        clock["eval"] += time.time() - t0
        with open(os.path.join(run_dir, f"predictions-{position.global_step}.jsonl"), "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in sorted(rep.predictions, key=lambda p: p["id"]))
        per = {"vqa_acc": [p["score"] for p in rep.predictions]}
        for q in qtypes:
            per[f"vqa_acc/{q}"] = [p["score"] for p in rep.predictions if p["qtype"] == q]
        ests = {k: estimate(Scores.of([v], seed_free=True, bounds=(0, 1))) for k, v in per.items() if v}
        est = {k: e.to_dict() for k, e in ests.items()}
        row = {"step": position.global_step, "samples": position.global_step * args.batch,
               "train_seconds": round(time.time() - clock["start"] - clock["eval"], 1),
               "eval_seconds": round(time.time() - t0, 1), "estimates": est}
        rows.append(row)
        table.append((row, ests))
        print(f"step {row['step']:5d} ({row['samples']} samples, {row['train_seconds']:.0f} s): "
              + ", ".join(f"{k.replace('vqa_acc/', '')} {100 * v['mean']:.1f}%" for k, v in est.items()), flush=True)
        _write(os.path.join(run_dir, "curve.json"), {"args": vars(args), "config": cfg, "rows": rows,
                                                     "majority": {k: estimate(v).to_dict() for k, v in majority.items()}})

    from frozenvl.train import train

    model = None
    if args.standardize:
        from accelerate.utils import set_seed

        set_seed(args.seed)  # the connector's initial weights as the trainer would draw them
        model = frozenvl.build(llm_dir, vision, workflows={"prefix": {"family": "prefix", "connector": args.connector}})
        with open(train_path) as f:
            images = sorted({r["image"] for r in json.load(f)})[: args.standardize]
        stats = standardize_features(model, "prefix", [os.path.join(os.path.dirname(train_path), i) for i in images])
        print(f"standardised channels: std {stats['std'].min():.3f} to {stats['std'].max():.3f} "
              f"over {len(images)} images", flush=True)
    print(f"{run_dir}: {len(json.load(open(train_path)))} training questions, {len(items)} eval questions; "
          "majority " + ", ".join(f"{k.replace('vqa_acc/', '')} {100 * estimate(v).mean:.1f}%" for k, v in majority.items()),
          flush=True)
    train(cfg, model=model, show_progress=False, callbacks=[score])
    cols = [f"vqa_acc/{q}" for q in qtypes] + ["vqa_acc"]
    print("\n| step | samples | " + " | ".join(c.replace("vqa_acc/", "").replace("vqa_acc", "all") for c in cols) + " |")
    print("|---:|---:|" + "---:|" * len(cols))
    print("| majority | - | " + " | ".join(percent(estimate(majority[c])) for c in cols) + " |")
    for r, ests in table:
        print(f"| {r['step']} | {r['samples']} | " + " | ".join(percent(ests[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
