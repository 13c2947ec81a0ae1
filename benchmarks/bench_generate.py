"""Generation speed of frozenvl against plain transformers, on the same weights, in one run.

Two comparisons, each at batch 1 and batch 4 (left padded, rows of different lengths):

* ``text``: frozenvl's ``text`` workflow (``FrozenVLModel.generate(task="text")``) against the bare
  base model (``AutoModelForCausalLM.generate``). Both run the very same module and tensors.
  Target: frozenvl >= 0.97x the bare model's tokens/s.
* ``mm``: frozenvl's ``prefix`` workflow imported from a LLaVA checkpoint (``import_llava_hf`` +
  ``frozenvl.load``) against transformers' ``LlavaForConditionalGeneration.generate`` on that
  checkpoint. Target: frozenvl >= 1.0x LLaVA's tokens/s.

Everything is greedy, fp32 on CPU, with exactly ``--new-tokens`` new tokens per row (eos disabled on
the frozenvl side with ``eos_token_id=[]``, suppressed on the transformers side with
``min_new_tokens``). Both sides get the same prompt ids (the image slots written with LLaVA's image
token id for transformers and frozenvl's placeholder id for frozenvl) and the same pixel_values, and
the script checks that they produce the same tokens.

Method: one warm-up call per side (also used for the token check), then ``--repeats`` timed calls per
side, alternating which side goes first in each repeat to cancel drift. tokens/s = batch *
new_tokens / wall time of one whole ``generate`` call (prefill and image encoding included). The
table shows tokens/s of each side's best (fastest) call, the ratio of the best times (what the
targets are checked on: the least disturbed estimate on a shared machine) and the ratio of the
median times. The raw wall and process-CPU seconds of every call follow the table.

    python benchmarks/bench_generate.py [--quick] [--new-tokens 128] [--repeats 3] [--threads N]

The models are random (built in code, nothing is downloaded); ``--quick`` uses much smaller ones
and fewer tokens as a smoke run (< 1 min).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from _common import load_average, log, n_params, print_load_footer, print_table, quiet  # benchmarks/ is on sys.path

quiet()

import frozenvl  # noqa: E402
from frozenvl.data.prompt import left_pad  # noqa: E402
from frozenvl.families.base import IMAGE_TOKEN_ID  # noqa: E402
from frozenvl.tiny import build_tokenizer, build_vision  # noqa: E402

# Prompts of different lengths (batch 4 uses all four, batch 1 the first). For `mm`, each row is
# "<chunk before the image>" + image slots + "<chunk after>", LLaVA-1.5 style.
TEXT_PROMPTS = [
    "You are a helpful assistant that can see images. Describe the image in one sentence.",
    "What colour is the square?",
    "There is a small red circle on the left and a big blue star at the top. How many shapes are there?",
    "Count the shapes.",
]
MM_PROMPTS = [
    ("USER: ", "\nWhat is in the image? ASSISTANT:"),
    ("USER: ", "\nDescribe the image in one sentence, then count the red shapes. ASSISTANT:"),
    ("You are a helpful assistant that can see images. USER: ", "\nWhat colour is the circle? ASSISTANT:"),
    ("USER: ", "\nWhere? ASSISTANT:"),
]


@dataclass
class Sizes:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int


DEFAULT = Sizes(
    hidden=512, layers=12, heads=8, intermediate=2048,  # ~51M parameters in the Llama text model
    image_size=224, patch_size=16, vision_hidden=256, vision_layers=4, vision_heads=4,  # 196 image tokens
)
QUICK = Sizes(
    hidden=128, layers=2, heads=4, intermediate=384,
    image_size=64, patch_size=16, vision_hidden=64, vision_layers=2, vision_heads=2,
)


# ------------------------------------------------------------------------------------------ models
def build_llava(root: Path, s: Sizes, seed: int = 0) -> Path:
    """A random LlavaForConditionalGeneration (Llama text model + CLIP tower) saved with its tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = build_tokenizer(root / "tokenizer")
    image_token = len(tok)  # one extra id after the tokenizer's vocabulary
    vision_dir = Path(
        build_vision(
            root / "clip", image_size=s.image_size, patch_size=s.patch_size, hidden_size=s.vision_hidden,
            num_layers=s.vision_layers, num_heads=s.vision_heads, seed=seed,
        )
    )
    text_config = LlamaConfig(
        vocab_size=len(tok) + 1,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        head_dim=s.hidden // s.heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        # Wider than the default 0.02 so the random model's greedy output varies from token to token
        # and from image to image: that makes the identical-tokens check below mean something.
        initializer_range=0.1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig.from_pretrained(vision_dir),
        text_config=text_config,
        image_token_index=image_token,
        image_seq_length=(s.image_size // s.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llava = LlavaForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        # eos gets logit 0 while the best of the other ~500 logits is always well above 0: the model never
        # picks eos greedily, so transformers' min_new_tokens (which masks eos) cannot change its greedy
        # tokens, and both sides can be compared token for token over all new tokens.
        llava.lm_head.weight[tok.eos_token_id].zero_()
    src = root / "llava"
    llava.save_pretrained(src)
    tok.save_pretrained(src)
    shutil.copyfile(vision_dir / "preprocessor_config.json", src / "preprocessor_config.json")
    return src




# ------------------------------------------------------------------------------------------ inputs
def text_inputs(tok, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [tok(p)["input_ids"] for p in TEXT_PROMPTS[:batch]]
    return left_pad(seqs, tok.pad_token_id)


def mm_inputs(tok, batch: int, n_img_tokens: int, llava_image_id: int):
    """(frozenvl ids, LLaVA ids, attention mask): identical except for the image slots' id."""
    fz, hf = [], []
    for before, after in MM_PROMPTS[:batch]:
        a, b = tok(before)["input_ids"], tok(after)["input_ids"]
        fz.append(a + [IMAGE_TOKEN_ID] * n_img_tokens + b)
        hf.append(a + [llava_image_id] * n_img_tokens + b)
    fz_ids, mask = left_pad(fz, tok.pad_token_id)
    hf_ids, mask2 = left_pad(hf, tok.pad_token_id)
    assert torch.equal(mask, mask2)
    return fz_ids, hf_ids, mask


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Row:
    case: str
    batch: int
    params: int
    prompt_len: str
    hf: list[float] = field(default_factory=list)  # wall seconds per call
    fz: list[float] = field(default_factory=list)
    hf_cpu: list[float] = field(default_factory=list)  # process CPU seconds per call (all threads)
    fz_cpu: list[float] = field(default_factory=list)
    same_tokens: bool = False
    distinct: str = ""  # distinct tokens generated per row (a check that the output is not degenerate)
    note: str = ""


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def measure(row: Row, run_hf, run_fz, new_tokens: int, repeats: int, eos_id: int | None, log) -> Row:
    # warm-up (one per side), also the correctness check
    *_, out_hf = timed(run_hf)
    *_, out_fz = timed(run_fz)
    assert out_hf.shape == out_fz.shape == (row.batch, new_tokens), (out_hf.shape, out_fz.shape)
    row.same_tokens = torch.equal(out_hf, out_fz)
    row.distinct = "/".join(str(len(set(r))) for r in out_fz.tolist())
    if not row.same_tokens:
        diff = (out_hf != out_fz).nonzero()
        r, c = diff[0].tolist()
        row.note = f"first difference row {r} step {c}: transformers {out_hf[r, c].item()} frozenvl {out_fz[r, c].item()}"
        if eos_id is not None and (out_fz == eos_id).any():
            row.note += " (frozenvl greedily picked eos, which min_new_tokens forbids transformers)"
    for k in range(repeats):
        order = [("hf", run_hf), ("fz", run_fz)] if k % 2 == 0 else [("fz", run_fz), ("hf", run_hf)]
        for side, fn in order:
            dt, cpu, _ = timed(fn)
            getattr(row, side).append(dt)
            getattr(row, side + "_cpu").append(cpu)
    tok = row.batch * new_tokens
    log(
        f"  {row.case:>4} b{row.batch}: transformers {tok / min(row.hf):7.1f} tok/s, "
        f"frozenvl {tok / min(row.fz):7.1f} tok/s (best of {repeats}), same tokens: {row.same_tokens}"
    )
    return row


def report(rows: list[Row], new_tokens: int, targets: dict[str, float]) -> None:
    headers = [
        "case", "batch", "params", "prompt len", "transformers tok/s", "frozenvl tok/s",
        "ratio (best)", "ratio (median)", "ratio (CPU s)", "target", "ok", "same tokens",
    ]
    table = []
    for r in rows:
        tok = r.batch * new_tokens
        best = min(r.hf) / min(r.fz)
        median = statistics.median(r.hf) / statistics.median(r.fz)
        cpu = min(r.hf_cpu) / min(r.fz_cpu)
        target = targets[r.case]
        table.append(
            [
                r.case, str(r.batch), f"{r.params / 1e6:.1f}M", r.prompt_len,
                f"{tok / min(r.hf):.1f}", f"{tok / min(r.fz):.1f}", f"{best:.3f}", f"{median:.3f}", f"{cpu:.3f}",
                f">= {target:.2f}", "yes" if best >= target else "NO", "yes" if r.same_tokens else "NO",
            ]
        )
    title = (
        f"greedy generation, {new_tokens} new tokens per row; tok/s = batch * new tokens / best call time; "
        "ratio = frozenvl / transformers; CPU s: of the best process CPU times"
    )
    print_table(title, headers, table, left=("prompt len",))
    for r in rows:
        if r.note:
            print(f"{r.case} b{r.batch}: {r.note}")
    print("distinct tokens among the new tokens of each row: "
          + ", ".join(f"{r.case} b{r.batch}: {r.distinct}" for r in rows))
    print("seconds per call, wall (process CPU, all threads):")
    for r in rows:
        hf = ", ".join(f"{w:.2f} ({c:.2f})" for w, c in zip(r.hf, r.hf_cpu))
        fz = ", ".join(f"{w:.2f} ({c:.2f})" for w, c in zip(r.fz, r.fz_cpu))
        print(f"  {r.case} b{r.batch}: transformers {hf} | frozenvl {fz}")






# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer tokens (smoke run, < 1 min)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 128; --quick: 16)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 3; --quick: 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    ap.add_argument("--batches", default="1,4", help="comma-separated batch sizes, at most 4 (default 1,4)")
    ap.add_argument("--only", choices=["text", "mm"], default=None, help="run one comparison only")
    args = ap.parse_args(argv)

    sizes = QUICK if args.quick else DEFAULT
    new_tokens = args.new_tokens or (16 if args.quick else 128)
    repeats = args.repeats or (2 if args.quick else 3)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or cores
    batches = [int(b) for b in args.batches.split(",")]
    if not all(1 <= b <= 4 for b in batches):
        ap.error("batch sizes must be between 1 and 4")
    torch.set_num_threads(threads)
    targets = {"text": 0.97, "mm": 1.0}

    print(
        f"frozenvl {frozenvl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}, {threads} thread(s) of {cores} cores, "
        f"fp32 CPU, {new_tokens} new tokens, {repeats} repeat(s) per side after a warm-up"
        + (" [--quick]" if args.quick else "")
    )
    from transformers import LlavaForConditionalGeneration

    from frozenvl.importers import import_llava_hf

    t_start = time.perf_counter()
    load_start = load_average()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="frozenvl-bench-") as tmp:
        root = Path(tmp)
        log("building a random LLaVA, importing it into frozenvl ...")
        src = build_llava(root, sizes)
        out = import_llava_hf(src, root / "frozenvl", workflow="mm")
        model = frozenvl.load(out, dtype="float32")
        llava = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
        tok = model.tokenizer
        eos, pad = tok.eos_token_id, tok.pad_token_id
        llm = model.llm  # the bare base model: the very module (and tensors) frozenvl's `text` workflow runs
        n_img = model.tokens_per_image("mm")
        vcfg = llava.config.vision_config
        print(
            f"text model: {type(llm).__name__}, {n_params(llm) / 1e6:.1f}M parameters (hidden {sizes.hidden}, "
            f"{sizes.layers} layers, {sizes.heads} heads, intermediate {sizes.intermediate}, vocab "
            f"{llm.config.vocab_size}); LLaVA: {n_params(llava) / 1e6:.1f}M parameters (CLIP {vcfg.image_size}px/"
            f"{vcfg.patch_size}, hidden {vcfg.hidden_size}, {vcfg.num_hidden_layers} layers: {n_img} image tokens)"
        )
        log(f"built in {time.perf_counter() - t_start:.1f}s; measuring ...")
        gen_common = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          eos_token_id=eos, pad_token_id=pad)

        if args.only in (None, "text"):
            for b in batches:
                ids, mask = text_inputs(tok, b)
                plen = ids.shape[1]

                def run_hf(ids=ids, mask=mask, plen=plen):
                    return llm.generate(input_ids=ids, attention_mask=mask, **gen_common)[:, plen:]

                def run_fz(ids=ids, mask=mask):
                    return model.generate(ids, mask, task="text", max_new_tokens=new_tokens, eos_token_id=[])

                lens = mask.sum(-1).tolist()
                row = Row("text", b, n_params(llm), "/".join(map(str, lens)))
                rows.append(measure(row, run_hf, run_fz, new_tokens, repeats, eos, log))

        if args.only in (None, "mm"):
            g = torch.Generator().manual_seed(0)
            pixels = torch.randn(4, 3, vcfg.image_size, vcfg.image_size, generator=g)
            for b in batches:
                fz_ids, hf_ids, mask = mm_inputs(tok, b, n_img, llava.config.image_token_id)
                pv = pixels[:b].clone()
                plen = hf_ids.shape[1]

                def run_hf(ids=hf_ids, mask=mask, pv=pv, plen=plen):
                    return llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, **gen_common)[:, plen:]

                def run_fz(ids=fz_ids, mask=mask, pv=pv):
                    return model.generate(ids, mask, pixel_values=pv, task="mm", max_new_tokens=new_tokens,
                                          eos_token_id=[])

                lens = mask.sum(-1).tolist()
                row = Row("mm", b, n_params(llava), "/".join(map(str, lens)))
                rows.append(measure(row, run_hf, run_fz, new_tokens, repeats, eos, log))

    print()
    report(rows, new_tokens, targets)
    print_load_footer(t_start, load_start, threads)
    ok = all(r.same_tokens for r in rows)
    print("correctness: frozenvl and transformers generated identical greedy tokens in every row" if ok
          else "correctness: TOKENS DIFFER in some row (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
