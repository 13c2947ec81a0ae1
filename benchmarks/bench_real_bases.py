"""Training and generation cost on the real bases (SmolLM2-135M-Instruct + DINOv2-S/14), side by side.

A `prefix` workflow (frozen LLM, trainable connector) on the bases `frozenvl bases` materialises,
measured in one process, in every combination of:

* image tokens: 256 per image (`mlp2x_gelu`, one token per 14-px patch of a 224-px view) or 64
  (`pixel_shuffle:factor=2`, 2x2 patches merged into one token before the MLP);
* precision: fp32, or the trainer's bf16 discipline (bf16 base, fp32 master weights of the
  workflow, `torch.autocast("cpu", bfloat16)`); generation then runs in bf16.

Per combination: one training step (forward + backward + AdamW on `--batch` image+question
samples, loss on the answer tokens) as samples/s, and greedy generation (one image, `--new-tokens`
new tokens, the image encoded each time) as tokens/s. Ratios against the 256-token fp32 row are
printed beside each row. The bases must already be cached (`frozenvl bases`); nothing is downloaded.

    python benchmarks/bench_real_bases.py [--threads 2] [--repeats 3] [--batch 4] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import time

from _common import (  # benchmarks/ is on sys.path
    load_average,
    log,
    print_load_footer,
    print_table,
    quiet,
    timed,
    timed_train_steps,
)

CONNECTORS = {256: "mlp2x_gelu", 64: "pixel_shuffle:factor=2"}
QUESTION = "<image>\nWhat colour is the large shape?"
ANSWER = " The large shape is red."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--tokens", default="256,64", help="image tokens per image to measure (256 and/or 64)")
    ap.add_argument("--precisions", default="fp32,bf16")
    args = ap.parse_args()

    import torch
    from PIL import Image, ImageDraw

    import frozenvl
    from frozenvl.realbases import ensure_bases

    quiet()
    torch.set_num_threads(args.threads)
    t_start, load_start = time.perf_counter(), load_average()
    bases = ensure_bases()  # cached: verifies the sha256 and returns
    images = []
    for k in range(args.batch):  # distinct scenes: a shape on a plain background
        im = Image.new("RGB", (224, 224), (230, 230, 230))
        ImageDraw.Draw(im).ellipse((20 + 10 * k, 40, 140 + 10 * k, 160), fill=(200, 40 * k, 40))
        images.append(im)

    rows, base_train, base_gen = [], None, None
    for tokens in (int(t) for t in args.tokens.split(",")):
        for precision in args.precisions.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
            log(f"{tokens} tokens/image, {precision}: building ...")
            model = frozenvl.build(str(bases.llm_dir), str(bases.vision_dir), dtype=dtype,
                                   workflows={"mm": {"family": "prefix", "connector": CONNECTORS[tokens]}})
            assert model.tokens_per_image("mm") == tokens, model.tokens_per_image("mm")
            prompts = [QUESTION + ANSWER] * args.batch
            inputs = model.prepare_inputs(prompts, [[im] for im in images], "mm")
            ids = inputs["input_ids"]
            n_answer = len(model.tokenizer(ANSWER, add_special_tokens=False)["input_ids"])
            labels = torch.full_like(ids, -100)
            labels[:, -n_answer:] = ids[:, -n_answer:]  # right-aligned: the answer ends every row

            log(f"{tokens} tokens/image, {precision}: train step x{args.repeats} ...")
            train_best, train_med = timed_train_steps(model, "mm", inputs, labels, args.repeats)

            def generate() -> None:
                model.encoded_images.clear()  # every call encodes its image again
                model.generate(prompt=QUESTION, images=[images[0]], task="mm", max_new_tokens=args.new_tokens,
                               eos_token_id=[])

            log(f"{tokens} tokens/image, {precision}: generate x{args.repeats} ...")
            gen_best, gen_med = timed(generate, args.repeats)
            base_train = base_train or train_best
            base_gen = base_gen or gen_best
            rows.append([str(tokens), precision, str(ids.shape[1]),
                         f"{args.batch / train_best:.2f}", f"{args.batch / train_med:.2f}", f"{base_train / train_best:.2f}",
                         f"{args.new_tokens / gen_best:.1f}", f"{args.new_tokens / gen_med:.1f}", f"{base_gen / gen_best:.2f}"])
            model = None  # free this model before the next one is built

    print_table(
        f"prefix on SmolLM2-135M-Instruct + DINOv2-S/14, {args.threads} thread(s), train batch {args.batch}, "
        f"generate {args.new_tokens} new tokens (batch 1); speed-ups vs the first row (best of {args.repeats})",
        ["img tokens", "precision", "seq len", "train samples/s best", "med", "x", "gen tok/s best", "med", "x"],
        rows, left=("precision",),
    )
    print_load_footer(t_start, load_start, args.threads)


if __name__ == "__main__":
    main()
