"""frozenvl in one minute, on a CPU, with no downloads.

Builds a tiny random base LLM and vision encoder from local configs (the same `from_pretrained(dir)`
path a hub id takes), adds two workflows on the one frozen base, runs every workflow on a real
image file, and shows that `text` is the base LLM bit for bit. The models are random, so the
answers are gibberish: what matters is what runs where.

    python examples/quickstart.py [--out quickstart_out]
"""

from __future__ import annotations

import argparse
import os

import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import frozenvl
from frozenvl.tiny import build_tiny_bases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="quickstart_out")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)

    llm_dir, vision_dir = build_tiny_bases(os.path.join(args.out, "bases"), arch="qwen2", vision="clip")
    print(f"base LLM    : {llm_dir}\nvision tower: {vision_dir}")

    image_path = os.path.join(args.out, "shapes.png")
    img = Image.new("RGB", (96, 64), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    draw.ellipse((8, 8, 40, 40), fill=(220, 30, 30))
    draw.rectangle((56, 20, 88, 52), fill=(40, 60, 220))
    img.save(image_path)

    model = frozenvl.build(
        llm=llm_dir,
        vision=vision_dir,
        workflows={
            "mm": {"family": "prefix", "connector": "mlp2x_gelu"},
            "g": {"family": "inner_adaptor", "layers": [0, 2]},
        },
    )
    info = model.info()
    print(f"\nfrozen LLM params: {info['frozen_llm_params']:,}  frozen vision params: {info['frozen_vision_params']:,}")
    for name, wf in info["workflows"].items():
        print(f"  workflow {name:5s} family {wf['family']:14s} trainable {wf['trainable_params']:,}")

    question = "What colour is the circle?"
    for task in model.tasks:
        images = None if task == "text" else [image_path]
        content = question if task == "text" else f"<image>\n{question}"
        answer = model.chat([{"role": "user", "content": content}], images=images, task=task, max_new_tokens=12)
        seen = "no image" if images is None else f"{model.tokens_per_image(task)} vision tokens"
        print(f"\n[{task}] ({seen}) -> {answer!r}")

    bare = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    ids = model.tokenizer("a red circle and a blue square", return_tensors="pt").input_ids
    with torch.no_grad():
        same = torch.equal(model(ids, task="text").logits, bare(ids).logits)
    print(f"\n`text` logits torch.equal to the bare base LLM: {same}")

    out_dir = os.path.join(args.out, "model")
    model.save_pretrained(out_dir)
    sizes = {f: os.path.getsize(os.path.join(out_dir, f)) for f in sorted(os.listdir(out_dir))}
    print(f"saved {out_dir}: " + ", ".join(f"{f} ({n:,} B)" for f, n in sizes.items()))
    reloaded = frozenvl.load(out_dir)
    inputs = model.prepare_inputs(f"<image>\n{question}", [image_path], task="g")
    with torch.no_grad():
        same = torch.equal(model(**inputs, task="g").logits, reloaded(**inputs, task="g").logits)
    print(f"reloaded `g` logits identical: {same}")


if __name__ == "__main__":
    main()
