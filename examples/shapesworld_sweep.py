"""The small sweep behind the ShapesWorld demo's per-family recipes (docs/shapesworld.md).

Each family's run from `frozenvl.shapesworld.demo.recipes` is trained with its non-gate learning
rates scaled (gates keep theirs), on a finished demo directory's bases and training data (seed 0),
and scored on VQA questions about scenes of *another* data seed. The demo's own eval set is not
used to choose, so the demo's figures are not tuned on it.

    frozenvl demo --out demo_out                      # once: bases and data
    python examples/shapesworld_sweep.py demo_out adaption_prompt,wings --mults 1,3
    python examples/shapesworld_sweep.py demo_out adaption_prompt --workflow '{"visual": "v2", "v2_heads": 4}'

Prints one JSON line per run (VQA overall and per question type), then the validation set's
per-type majority baseline.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import frozenvl
from frozenvl.eval import evaluate
from frozenvl.shapesworld import generate
from frozenvl.shapesworld.demo import FULL, LOSS, majority_baseline, recipes
from frozenvl.train import TrainConfig, train


def scaled(lr, mult: float):
    """`lr` (a number, or per selector) times `mult`, except the gates' entries."""
    if isinstance(lr, dict):
        return {k: v if "gate" in k else v * mult for k, v in lr.items()}
    return lr * mult


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo_out", help="a directory `frozenvl demo --out` has filled (bases/ and data/)")
    ap.add_argument("families", help="comma-separated run names (e.g. adaption_prompt,wings)")
    ap.add_argument("--mults", default="1,3", help="lr multipliers, comma-separated")
    ap.add_argument("--workflow", default="{}", help="JSON options added to each run's workflow")
    ap.add_argument("--val-seed", type=int, default=99, help="data seed of the validation scenes")
    ap.add_argument("--out", default="sweep_out")
    args = ap.parse_args()

    bases = sorted(glob.glob(os.path.join(args.demo_out, "bases", "bases-*")))
    if not bases:
        raise SystemExit(f"{args.demo_out}/bases has no built bases: run `frozenvl demo --out {args.demo_out}` first")
    base, data = bases[-1], os.path.join(args.demo_out, "data")
    val = os.path.join(args.out, f"val-seed{args.val_seed}")
    if not os.path.isfile(os.path.join(val, "eval_vqa.jsonl")):
        generate(val, seed=args.val_seed, n_train_images=10, n_eval_images=100, n_text_train=10,
                 box_format=FULL.bases.box_format, overwrite=True)
    extra = json.loads(args.workflow)
    runs = {r.name: r for r in recipes(FULL)}
    for name in args.families.split(","):
        if name not in runs:
            raise SystemExit(f"unknown run {name!r}; runs: {sorted(runs)}")
        for mult in (float(m) for m in args.mults.split(",")):
            run = runs[name]
            stages = [dict(st, lr=scaled(st["lr"], mult)) for st in run.stages]
            out = os.path.join(args.out, f"{name}-x{mult:g}")
            t = time.time()
            res = train(TrainConfig.from_dict({
                "llm": os.path.join(base, "llm"), "vision": os.path.join(base, "vision"), "output_dir": out,
                "workflow": {"name": name, **run.workflow, **extra},
                "data": {"train": os.path.join(data, run.data), "max_length": 256},
                "stages": stages, "seed": 0, "save_every": 0, "keep_last": 1, **LOSS,
            }), show_progress=False)
            report = evaluate(frozenvl.load(out), os.path.join(val, "eval_vqa.jsonl"), task=name,
                              max_new_tokens=8, batch_size=64, progress=False)
            print(json.dumps({"run": name, "mult": mult, "workflow": extra, "vqa": report.metrics["vqa_acc"],
                              "per_type": {k.split("/", 1)[1]: v for k, v in report.metrics.items()
                                           if k.startswith("vqa_acc/")},
                              "final_loss": res.final_loss, "seconds": round(time.time() - t)}), flush=True)
    majority = majority_baseline(os.path.join(data, "train_mixed.json"), os.path.join(val, "eval_vqa.jsonl"))
    print(json.dumps({"majority": {k: sum(s.rows[0]) / len(s.rows[0]) for k, s in majority["scores"].items()}}))


if __name__ == "__main__":
    main()
