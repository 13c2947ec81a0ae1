"""Is bf16 faster than fp32 on this CPU? A training step and greedy generation, side by side.

A ~50M-parameter tiny Llama (frozenvl.tiny) with an inner_adaptor workflow (a tiny CLIP tower):

* train step: forward + backward + AdamW step on a batch of image+text samples, in fp32
  (fp32 base and workflow) and in the trainer's bf16 discipline (bf16 base, fp32 master weights
  of the workflow, `torch.autocast("cpu", bfloat16)`);
* generation: greedy tokens with the KV cache, fp32 model vs bf16 model (base and workflow in
  bf16, as the trainer leaves them).

Prints best and median seconds over `--repeats` and the fp32/bf16 ratio (> 1: bf16 is faster).

    python benchmarks/bench_bf16_cpu.py [--threads 2] [--repeats 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import (  # benchmarks/ is on sys.path
    load_average,
    log,
    n_params,
    print_load_footer,
    quiet,
    timed,
    timed_train_steps,
)

WORKFLOW = {"family": "inner_adaptor", "layers": [0, 8]}
PROMPT = "<image>\nwhat colour is the image, and what shape is in it"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    import torch
    from PIL import Image

    import frozenvl
    from frozenvl.tiny import build_tiny_bases

    quiet()
    torch.set_num_threads(args.threads)
    t_start, load_start = time.perf_counter(), load_average()
    root = tempfile.mkdtemp(prefix="bench-bf16-")
    log("building the tiny bases ...")
    llm, vis = build_tiny_bases(root, hidden_size=512, num_layers=16, num_heads=8, num_kv_heads=4,
                                intermediate_size=1536)
    images = [Image.new("RGB", (48, 40), (40 * k, 200 - 40 * k, 90)) for k in range(args.batch)]
    prompts = [PROMPT + f" {k}" for k in range(args.batch)]

    results: dict[str, dict[str, tuple[float, float]]] = {"train step": {}, "generate": {}}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        log(f"{name}: building ...")
        model = frozenvl.build(llm, vis, workflows={"mm": WORKFLOW}, dtype=dtype)
        inputs = model.prepare_inputs(prompts, [[im] for im in images], "mm")
        # loss on the text tokens: not on image slots or left padding
        labels = inputs["input_ids"].masked_fill((inputs["input_ids"] < 0) | (inputs["attention_mask"] == 0), -100)
        n_llm = n_params(model.llm)

        log(f"{name}: train step x{args.repeats} ...")
        results["train step"][name] = timed_train_steps(model, "mm", inputs, labels, args.repeats)

        def generate() -> None:
            model.encoded_images.clear()  # every repeat encodes its image again
            model.generate(prompt=PROMPT, images=[images[0]], task="mm", max_new_tokens=args.new_tokens,
                           eos_token_id=[])

        log(f"{name}: generate x{args.repeats} ...")
        results["generate"][name] = timed(generate, args.repeats)

    print(f"tiny Llama: {n_llm / 1e6:.1f}M parameters (16 layers, hidden 512), inner_adaptor after layers 0 and 8; "
          f"{args.threads} thread(s), train batch {args.batch}, generate {args.new_tokens} new tokens (batch 1)")
    print(f"{'':12} {'fp32 best':>10} {'fp32 med':>9} {'bf16 best':>10} {'bf16 med':>9} {'fp32/bf16 (best)':>17}")
    for what, by in results.items():
        (f_best, f_med), (b_best, b_med) = by["fp32"], by["bf16"]
        print(f"{what:12} {f_best:10.3f} {f_med:9.3f} {b_best:10.3f} {b_med:9.3f} {f_best / b_best:17.2f}")
    print_load_footer(t_start, load_start, args.threads)


if __name__ == "__main__":
    main()
