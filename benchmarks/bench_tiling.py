"""Tiled images: prefill speed against transformers' InternVL, and the encoded-image cache in a chat.

1. **prefill**: a random InternVL (Qwen2 text, InternVL vision, pixel shuffle 0.5) saved with
   ``InternVLForConditionalGeneration.save_pretrained``, imported with ``import_internvl_hf``; one
   prompt with one image cut into 12 tiles + thumbnail; one forward pass over the whole prompt on each
   side (frozenvl with its encoded-image cache off, so both encode every tile). Prints best / median
   seconds and the ratio transformers / frozenvl (target >= 1.0), and the max |logit difference|.
2. **chat**: the same image re-sent on each of ``--turns`` turns (the prompt grows by one exchange per
   turn, as a chat re-sends its history); frozenvl with the cache on against off. Prints the ratio.

Run ``python benchmarks/bench_tiling.py`` (``--quick`` for a smaller model; ``--repeats``, ``--threads``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import load_average, log, print_load_footer, quiet


def _build(root: str, quick: bool):
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from frozenvl.importers import import_internvl_hf
    from frozenvl.tiny import build_tokenizer

    src, out = os.path.join(root, "src"), os.path.join(root, "out")
    os.makedirs(src)
    n_text = len(build_tokenizer(src, template="chatml", vocab_size=300))
    tile, patch = (56, 14) if quick else (112, 14)
    torch.manual_seed(0)
    text = Qwen2Config(vocab_size=n_text + 1, hidden_size=128 if quick else 256, intermediate_size=512,
                       num_hidden_layers=2 if quick else 6, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, tie_word_embeddings=False)
    vision = InternVLVisionConfig(hidden_size=64 if quick else 128, intermediate_size=256,
                                  num_hidden_layers=2 if quick else 4, num_attention_heads=4, image_size=tile,
                                  patch_size=patch, use_mean_pooling=True)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=n_text, downsample_ratio=0.5,
                            vision_feature_layer=-1, tie_word_embeddings=False,
                            image_seq_length=(tile // patch // 2) ** 2)
    InternVLForConditionalGeneration(config).save_pretrained(src)
    GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, max_patches=12,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(src)
    import_internvl_hf(src, out)
    return src, out, config, tile


def _time_pair(a, b, repeats: int) -> tuple[list[float], list[float]]:
    """Wall seconds of `repeats` calls of each, after a warm-up, alternating which goes first."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for k in range(repeats):
        for side in ((0, 1) if k % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            (a, b)[side]()
            times[side].append(time.perf_counter() - t0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    quiet()
    import numpy as np
    import torch
    from PIL import Image
    from transformers import InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    import frozenvl
    from frozenvl.constants import IMAGE_TOKEN_ID

    torch.set_num_threads(args.threads)
    t_start, load_start = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory() as root:
        log("building and importing a random InternVL ...")
        src, out, config, tile = _build(root, args.quick)
        hf = InternVLForConditionalGeneration.from_pretrained(src, attn_implementation="sdpa").eval()
        ours = frozenvl.load(out, attn_implementation="sdpa").eval()
        proc = GotOcr2ImageProcessorPil.from_pretrained(src)
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3 * tile, 4 * tile, 3), dtype=np.uint8))
        ref_in = proc([img], return_tensors="pt")
        n_tiles = int(ref_in["num_patches"][0])
        per_tile = config.image_seq_length
        g = torch.Generator().manual_seed(0)
        words = torch.randint(1, config.image_token_id, (32,), generator=g)
        ids = torch.cat([words[:8], torch.full((n_tiles * per_tile,), config.image_token_id), words[8:]])[None]
        our_ids = ids.masked_fill(ids == config.image_token_id, IMAGE_TOKEN_ID)
        pv = ours.pixel_values([img], "mm")
        ours.encoded_images.size = 0  # both sides encode every tile

        with torch.no_grad():
            diff = (hf(input_ids=ids, pixel_values=ref_in["pixel_values"]).logits
                    - ours(our_ids, pixel_values=pv, task="mm").logits).abs().max().item()
            t_hf, t_ours = _time_pair(lambda: hf(input_ids=ids, pixel_values=ref_in["pixel_values"]),
                                      lambda: ours(our_ids, pixel_values=pv, task="mm"), args.repeats)
        print(f"prefill: 1 image = {n_tiles} tiles ({per_tile} tokens each), prompt of {ids.shape[1]} tokens")
        print(f"  transformers best {min(t_hf):.4f}s median {statistics.median(t_hf):.4f}s")
        print(f"  frozenvl     best {min(t_ours):.4f}s median {statistics.median(t_ours):.4f}s")
        print(f"  ratio transformers/frozenvl (best) {min(t_hf) / min(t_ours):.2f}x (target >= 1.0); "
              f"max |logit diff| {diff:.2e}")

        # chat: every turn re-sends the image with a longer history
        def chat(turns: int) -> None:
            history = "<image> describe the picture"
            for turn in range(turns):
                ours.generate(prompt=history, images=[img], task="mm", max_new_tokens=4, eos_token_id=[])
                history += f" it is picture {turn} ."

        def without_cache() -> None:
            ours.encoded_images.size = 0
            chat(args.turns)

        def with_cache() -> None:  # starts empty: the first turn encodes, the later ones reuse
            ours.encoded_images.size = 16
            ours.encoded_images.clear()
            chat(args.turns)

        t_off, t_on = _time_pair(without_cache, with_cache, args.repeats)
        print(f"chat: {args.turns} turns re-sending the {n_tiles}-tile image, 4 new tokens per turn")
        print(f"  cache off best {min(t_off):.4f}s, cache on best {min(t_on):.4f}s: "
              f"gain {min(t_off) / min(t_on):.2f}x")
    print_load_footer(t_start, load_start, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
