"""Training cost of an ``inner_adaptor`` workflow (frozen base) against the LLaVA fine-tuned baseline.

One model, two workflows, measured side by side in one run:

* (a) ``inner_adaptor`` (IAA): trainable decoder layers inserted after frozen layers ``--iaa-layers``
  (default ``0,1,5,6``; ``default`` = frozenvl's scaled IAA-14 rule), the base LLM frozen; the stage
  trains ``[connector, adapter]``.
* (b) ``prefix`` with ``llm_train: full`` (the LLaVA fine-tuned baseline: the workflow owns a full,
  trainable copy of the LLM); the stage trains ``[connector, llm]``.

Both train through the public :class:`frozenvl.train.Trainer` (one stage, ``steps`` = warm-up +
timed steps, ``save_every: 0``, ``log_every: 1``) on the same data (a small LLaVA JSON with real PNG
images and grounding answers, written by this script), the same batch size, max length, seed (hence
the same sample order), fp32 on CPU, AdamW (the trainer's optimizer), constant lr, no warm-up.

What is measured, per configuration, each in a fresh subprocess (so neither sees the other's heap):

* step time: ``tokens / tokens_per_s`` of each row of the run's ``metrics.jsonl``, i.e. the wall time
  of one optimizer step as the trainer itself times it (loading the micro-batches -- image decoding
  and preprocessing included --, forward, backward, gradient clipping, ``optimizer.step``). The median
  over the steps after ``--warmup`` is reported. As a cross-check the median interval between the
  trainer's per-step callbacks (which also includes logging) is printed too.
* peak memory: the process' resident set (Linux ``VmHWM``, the counter behind
  ``getrusage(RUSAGE_SELF).ru_maxrss``) during the training steps, minus the resident set after the
  Trainer was built (base LLM, vision tower, the workflow's own weights, tokenized dataset; the frozen
  weights, which may be memory-mapped from their safetensors files, are read once first so they are
  resident in both configurations). Just before training the heap is trimmed (``malloc_trim``) and
  the high-water mark reset (``/proc/self/clear_refs``) so the load's transient peak cannot mask the
  training peak; it is read in the callback after the last step, i.e. before the stage-end
  checkpoint and the final save (whose peak is shown separately). The headline number leaves out
  file-backed pages (``RssFile``: library code the first step pages in, the same in both), so it is
  the anonymous memory training adds: gradients, AdamW state, activations, temporaries and
  allocator slack; the total-RSS difference is shown next to it.
* exactly: trainable parameter counts (the stage's selection, deduplicated), gradient bytes
  (4 x trainable, fp32) and the AdamW state, summed tensor by tensor from the optimizer state the
  trainer wrote into its stage-end checkpoint (``optimizer.pt``: ``exp_avg``, ``exp_avg_sq``, ``step``).

    python benchmarks/bench_train.py [--quick] [--steps 10] [--warmup 2] [--batch-size 4] [--repeats 1]
                                     [--threads 1] [--iaa-layers 0,1,5,6|default] [--gradient-checkpointing]

``--repeats R`` runs each configuration R times, alternating (a b, b a, a b, ...) to cancel drift; step
times are pooled, memory is the median over the runs. ``--threads`` defaults to 1: on a shared
machine (the CPU-only development box is one) several OpenMP threads per process make step times
swing by 10x with the load of other processes, a single thread keeps them steady; use
``--threads N`` on a quiet machine. The load average before and after is printed with the results.

The models are random (built in code, nothing is downloaded); ``--quick`` uses much smaller ones and
fewer steps as a smoke run (< 1 min).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from _common import log, quiet  # benchmarks/ is on sys.path; sets the offline environment


@dataclass
class Sizes:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    batch_size: int
    max_length: int
    samples: int
    iaa_layers: str
    steps: int
    warmup: int


DEFAULT = Sizes(
    hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1536,
    image_size=224, patch_size=16, vision_hidden=256, vision_layers=4, vision_heads=4,  # 196 image tokens
    batch_size=4, max_length=512, samples=64, iaa_layers="0,1,5,6", steps=10, warmup=2,
)
QUICK = Sizes(
    hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384,
    image_size=64, patch_size=16, vision_hidden=64, vision_layers=2, vision_heads=2,  # 16 image tokens
    batch_size=2, max_length=256, samples=16, iaa_layers="0,2", steps=4, warmup=1,
)

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
           "purple": (130, 40, 160), "orange": (240, 140, 20)}
IMAGE_SHAPES = [(200, 150), (150, 220), (224, 224), (300, 180), (180, 260), (256, 192)]


# ------------------------------------------------------------------------------------------ data
def write_data(root: Path, n: int, seed: int = 0) -> Path:
    """A LLaVA-format JSON list: one PNG per sample (different sizes) and a grounding answer.

    The box is the drawn rectangle, as ``[x1,y1,x2,y2]`` in 0-1 on LLaVA's padded square image
    (:func:`frozenvl.data.boxes.to_square_box`).
    """
    from PIL import Image, ImageDraw

    from frozenvl.data.boxes import format_box, to_square_box

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(n):
        w, h = IMAGE_SHAPES[i % len(IMAGE_SHAPES)]
        colour = names[i % len(names)]
        img = Image.new("RGB", (w, h), (235, 235, 235))
        x1, y1 = rng.randrange(0, w // 2), rng.randrange(0, h // 2)
        x2, y2 = x1 + rng.randrange(w // 6, w // 2), y1 + rng.randrange(h // 6, h // 2)
        ImageDraw.Draw(img).rectangle([x1, y1, x2, y2], fill=COLOURS[colour])
        rel = f"images/{i:04d}.png"
        img.save(root / rel)
        box = format_box(to_square_box([x1, y1, x2, y2], w, h))
        records.append({
            "id": f"b{i}",
            "image": rel,
            "conversations": [
                {"from": "human", "value": "<image>\nWhere is the coloured rectangle and what colour is it?"},
                {"from": "gpt", "value": f"There is a {colour} rectangle at {box}."},
            ],
        })
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


def build_bases(root: Path, s: Sizes) -> tuple[str, str]:
    from frozenvl.tiny import build_llm, build_tokenizer, build_vision

    build_tokenizer(root / "llm")
    llm = build_llm(root / "llm", arch="llama", tokenizer_dir=root / "llm", hidden_size=s.hidden,
                    num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.kv_heads,
                    intermediate_size=s.intermediate)
    vision = build_vision(root / "vision", arch="clip", image_size=s.image_size, patch_size=s.patch_size,
                          hidden_size=s.vision_hidden, num_layers=s.vision_layers, num_heads=s.vision_heads)
    return llm, vision


def configs(llm: str, vision: str, data: Path, root: Path, s: Sizes, checkpointing: bool) -> dict[str, dict]:
    layers = None if s.iaa_layers == "default" else [int(x) for x in s.iaa_layers.split(",")]

    def cfg(tag: str, workflow: dict, train: list[str]) -> dict:
        return {
            "llm": llm,
            "vision": vision,
            "output_dir": str(root / f"run-{tag}"),  # run_child gives each run its own
            "workflow": {"name": "mm", **workflow},
            "data": {"train": str(data), "max_length": s.max_length},
            "stages": [{"name": "bench", "train": train, "lr": 1e-5, "steps": s.warmup + s.steps,
                        "batch_size": s.batch_size, "warmup_ratio": 0.0, "schedule": "constant"}],
            "precision": "fp32",
            "gradient_checkpointing": checkpointing,
            "save_every": 0,
            "keep_last": 1,
            "log_every": 1,
            "seed": 0,
        }

    return {
        "a": cfg("a", {"family": "inner_adaptor", "layers": layers}, ["connector", "adapter"]),
        "b": cfg("b", {"family": "prefix", "llm_train": "full"}, ["connector", "llm"]),
    }


# ------------------------------------------------------------------------------------------ child
def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return psutil.Process().memory_info().rss


def _peak() -> int:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _file_backed() -> int:
    """Resident file-backed and shared pages (libraries' code, mapped files): not training state."""
    kb = [_status_kb("RssFile"), _status_kb("RssShmem")]
    return 1024 * sum(k for k in kb if k is not None)


def _trim_and_reset_peak() -> bool:
    """Give freed heap back to the OS and reset the resident high-water mark; True if the reset worked."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(cfg_path: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    quiet()

    from frozenvl.train import TrainConfig, Trainer
    from frozenvl.train.trainer import base_checksum, select_parameters

    cfg = TrainConfig.from_dict(json.loads(Path(cfg_path).read_text()))
    rss_start = _rss()
    trainer = Trainer(cfg, show_progress=False)
    chosen = select_parameters(trainer.family, cfg.stages[0].train)
    seen: dict[int, int] = {}
    per_part = {}
    for sel, named in chosen.items():
        per_part[sel] = sum(p.numel() for _, p in named)
        for _, p in named:
            seen[id(p)] = p.numel()
    trainable = sum(seen.values())
    owned = sum(t.numel() for t in trainer.family.owned_state_dict().values())
    frozen_llm = sum(p.numel() for p in trainer.model.llm.parameters())
    frozen_vision = sum(p.numel() for p in trainer.model.vision.parameters())

    # The frozen weights may be memory-mapped from their safetensors files and only paged in when first
    # read; read them all now (as the trainer's own checksum does first thing), so that RSS@load holds
    # the whole model in both configurations.
    base_checksum(trainer.model)
    reset_ok = _trim_and_reset_peak()
    rss_load, file_load = _rss(), _file_backed()
    step_marks: list[float] = []
    peaks: list[int] = []
    files: list[int] = []

    def on_step(tr, position) -> None:
        step_marks.append(time.perf_counter())
        peaks.append(_peak())
        files.append(_file_backed())

    trainer.callbacks.append(on_step)
    t0 = time.perf_counter()
    result = trainer.train()
    peak_all = _peak()

    rows = [json.loads(x) for x in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    step_s = [r["tokens"] / r["tokens_per_s"] for r in rows if r["tokens"]]
    intervals = [b - a for a, b in zip([t0] + step_marks[:-1], step_marks)]
    ckpts = sorted((Path(cfg.output_dir) / "checkpoints").glob("step-*"))
    opt_bytes = 0
    opt_tensors = 0
    if ckpts:
        state = torch.load(ckpts[-1] / "optimizer.pt", map_location="cpu", weights_only=True)
        for per_param in state["state"].values():
            for v in per_param.values():
                if torch.is_tensor(v):
                    opt_bytes += v.numel() * v.element_size()
                    opt_tensors += 1
    out = {
        "trainable": trainable,
        "per_part": per_part,
        "owned": owned,
        "frozen_llm": frozen_llm,
        "frozen_vision": frozen_vision,
        "rss_start": rss_start,
        "rss_load": rss_load,
        "anon_load": rss_load - file_load,
        "peak_steps": peaks[-1],
        # resident-set peak less the file-backed pages (library code first run by the steps, ...) resident then
        "anon_peak_steps": peaks[-1] - files[-1],
        "peak_all": peak_all,
        "peak_reset": reset_ok,
        "step_s": step_s,
        "intervals": intervals,
        "optimizer_bytes": opt_bytes,
        "optimizer_tensors": opt_tensors,
        "label_tokens": result.tokens,
        "steps": result.steps,
        "base_unchanged": result.base_unchanged,
        "final_loss": result.final_loss,
    }
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------ parent
def run_child(cfg: dict, root: Path, tag: str, threads: int, log) -> dict:
    """Train one configuration in a fresh process (its own output dir) and return what it measured."""
    cfg = {**cfg, "output_dir": str(root / f"run-{tag}")}
    path = root / f"cfg-{tag}.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(path), "--threads", str(threads)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"configuration ({tag}) failed with exit code {proc.returncode}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    log(f"  ({tag}) done in {time.perf_counter() - t:.1f}s")
    return json.loads(line[len("RESULT "):])


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def report(runs: dict[str, list[dict]], names: dict[str, str], warmup: int) -> None:
    def pooled(k, key):
        return [x for r in runs[k] for x in (r[key][warmup:] or r[key])]

    def med(k, fn):
        return statistics.median(fn(r) for r in runs[k])

    def anon(r):
        return r["anon_peak_steps"] - r["anon_load"]

    def total(r):
        return r["peak_steps"] - r["rss_load"]

    def step(k):
        return statistics.median(pooled(k, "step_s"))

    res = {k: runs[k][0] for k in runs}  # the exact counts are the same in every run
    rows = []
    for k in ("a", "b"):
        r = res[k]
        rows.append([
            f"({k}) {names[k]}",
            f"{r['trainable'] / 1e6:.2f}M",
            mib(4 * r["trainable"]),
            mib(r["optimizer_bytes"]),
            mib(med(k, lambda r: r["rss_load"])),
            mib(med(k, anon)),
            mib(med(k, total)),
            mib(med(k, lambda r: r["peak_all"] - r["rss_load"])),
            f"{step(k):.3f}",
            f"{statistics.median(pooled(k, 'intervals')):.3f}",
        ])
    headers = ["configuration", "trainable", "grads MiB", "AdamW MiB", "RSS@load MiB", "peak-load MiB",
               "(RSS) MiB", "(+ckpt) MiB", "step s", "(callbacks) s"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    a, b = res["a"], res["b"]
    state_a = 4 * a["trainable"] + a["optimizer_bytes"]
    state_b = 4 * b["trainable"] + b["optimizer_bytes"]
    print()
    print(f"memory    (b)/(a): {med('b', anon) / med('a', anon):.2f}x  (peak-load: peak resident memory of the "
          f"training steps minus that after load, file-backed pages excluded; total RSS: "
          f"{med('b', total) / med('a', total):.2f}x)")
    print(f"step time (b)/(a): {step('b') / step('a'):.2f}x  (median seconds per optimizer step after {warmup} "
          f"warm-up step(s))")
    print(f"grads + AdamW state, exact (b)/(a): {state_b / state_a:.2f}x  ({mib(state_b)} vs {mib(state_a)} MiB); "
          f"trainable parameters (b)/(a): {b['trainable'] / a['trainable']:.2f}x")
    print()
    for k in ("a", "b"):
        r = res[k]
        parts = ", ".join(f"{p} {n:,}" for p, n in r["per_part"].items())
        print(f"({k}) trainable {r['trainable']:,} ({parts}); workflow owns {r['owned']:,}; frozen LLM "
              f"{r['frozen_llm']:,}, frozen vision {r['frozen_vision']:,}; AdamW state {r['optimizer_bytes']:,} bytes "
              f"in {r['optimizer_tensors']} tensors; {r['steps']} steps, {r['label_tokens']} label tokens, "
              f"final loss {r['final_loss']:.4f}, base unchanged: {r['base_unchanged']}")
        for j, run in enumerate(runs[k]):
            print(f"    run {j + 1}: s/step {[round(x, 3) for x in run['step_s']]}; RSS after load "
                  f"{mib(run['rss_load'])} MiB; peak-load {mib(anon(run))} MiB (total RSS {mib(total(run))} MiB)")
        if not all(run["peak_reset"] for run in runs[k]):
            print("    note: the resident high-water mark could not be reset after loading; the peak may "
                  "include the load's own peak")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller model, fewer steps (smoke run, < 1 min)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 10; --quick: 4)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2; --quick: 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="per step (default 4; --quick: 2)")
    ap.add_argument("--iaa-layers", default=None,
                    help="inner_adaptor insertion layers, comma-separated, or 'default' (frozenvl's rule); "
                         "default 0,1,5,6 (--quick: 0,2)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="train both configurations with gradient_checkpointing: true")
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration, alternating (default 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per training process (default 1: steady timings on a shared machine)")
    ap.add_argument("--keep", metavar="DIR", default=None, help="build everything in DIR and keep it")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = max(1, args.threads)
    if args.child:
        child(args.child, threads)
        return 0

    s = Sizes(**asdict(QUICK if args.quick else DEFAULT))
    for key, value in (("steps", args.steps), ("warmup", args.warmup), ("batch_size", args.batch_size),
                       ("iaa_layers", args.iaa_layers)):
        if value is not None:
            setattr(s, key, value)
    if s.steps < 1 or s.warmup < 0 or s.batch_size < 1 or args.repeats < 1:
        ap.error("--steps, --batch-size and --repeats must be >= 1, --warmup >= 0")

    import torch
    import transformers

    quiet()

    import frozenvl
    from frozenvl.families.inner_adaptor import default_insertion_layers

    print(
        f"frozenvl {frozenvl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}, {threads} thread(s) of {os.cpu_count()} cores, "
        f"fp32 CPU, AdamW, batch {s.batch_size}, max_length {s.max_length}, {s.warmup} warm-up + {s.steps} timed "
        f"steps per run, {args.repeats} run(s) per configuration, each in a fresh process, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}"
        + (" [--quick]" if args.quick else "")
    )
    load_before = _loadavg()
    t_start = time.perf_counter()
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="frozenvl-bench-train-")
    root = Path(args.keep or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        log("building the base models and the data ...")
        llm, vision = build_bases(root / "bases", s)
        data = write_data(root / "data", s.samples)
        cfgs = configs(llm, vision, data, root, s, args.gradient_checkpointing)
        layers = cfgs["a"]["workflow"]["layers"] or default_insertion_layers(s.layers)
        names = {
            "a": f"inner_adaptor layers {layers}, base frozen",
            "b": "prefix, llm_train: full (LLaVA fine-tuned)",
        }
        from transformers import AutoConfig

        vc = AutoConfig.from_pretrained(vision)
        n_img = (vc.image_size // vc.patch_size) ** 2
        print(
            f"LLM: Llama hidden {s.hidden}, {s.layers} layers, {s.heads} heads ({s.kv_heads} kv), intermediate "
            f"{s.intermediate}, vocab {AutoConfig.from_pretrained(llm).vocab_size}; vision: CLIP "
            f"{vc.image_size}px/{vc.patch_size} hidden {vc.hidden_size}, {vc.num_hidden_layers} layers -> {n_img} "
            f"image tokens; data: {s.samples} samples, one image each (grounding answers); frozenvl's default "
            f"insertion rule for {s.layers} layers would be {default_insertion_layers(s.layers)}"
        )
        runs: dict[str, list[dict]] = {"a": [], "b": []}
        order = [("a", "b") if j % 2 == 0 else ("b", "a") for j in range(args.repeats)]
        for j, pair in enumerate(order):
            for k in pair:
                log(f"training ({k}) {names[k]} (run {j + 1}/{args.repeats}) ...")
                runs[k].append(run_child(cfgs[k], root, f"{k}{j + 1}", threads, log))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print()
    report(runs, names, s.warmup)
    print()
    print(
        "What was measured. step s: median of tokens / tokens_per_s over the metrics.jsonl rows after the warm-up "
        "(the trainer's own timing of one optimizer step: micro-batch loading incl. image decoding, forward, "
        "backward, clipping, AdamW step); (callbacks) s: interval between the trainer's per-step callbacks (adds "
        "logging). Memory, in a fresh process per run: RSS@load = resident set after the Trainer was built (base "
        "LLM, vision tower, the workflow's own weights -- for (b) a full copy of the LLM --, tokenized data), heap "
        "trimmed; then the high-water mark (VmHWM = getrusage ru_maxrss) is reset and read after the last step. "
        "peak-load = that peak minus the file-backed pages resident then (library code the first step pages in), "
        "minus the anonymous memory after load: grads, AdamW state, activations, temporaries, allocator slack. "
        "(RSS) = the same with file-backed pages included; (+ckpt) = total RSS peak including the stage-end "
        "checkpoint and the final save. grads = 4 bytes x trainable; AdamW = the optimizer state's tensors summed "
        "from the checkpoint's optimizer.pt (exp_avg, exp_avg_sq, step)."
    )
    print(f"load average (1 min) before {load_before}, after {_loadavg()} on {os.cpu_count()} cores; "
          f"total time {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
