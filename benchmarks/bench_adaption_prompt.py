"""Decode speed of frozenvl's ``adaption_prompt`` workflow against the bare base LLM and PEFT, in one run.

Three sides, all on the same random Llama (built in code with ``frozenvl.tiny``), greedy, batch 1, one
fixed text prompt, fp32 on CPU:

* ``base``: the bare base LLM, ``AutoModelForCausalLM.generate`` (the floor an adapter can only add to);
* ``frozenvl``: frozenvl's ``adaption_prompt`` workflow (``gate: scalar``, ``visual: none``, adapter_len
  10, every layer adapted) through ``FrozenVLModel.generate(task=...)``;
* ``peft``: PEFT's ``AdaptionPromptConfig`` model (``get_peft_model``) through ``PeftModel.generate``.

The adapter values are non-zero (prompts ~ N(0, 1), gates ~ N(0, 1)) so the adapter actually changes
the output. They are set on the PEFT model, saved with ``save_pretrained`` and brought into frozenvl
with ``frozenvl.importers.peft_adaption_prompt.import_peft_adaption_prompt`` + ``frozenvl.load``, so both
adapted sides hold identical weights; the script checks that they produce identical greedy tokens
(and prints the largest prefill-logit difference between them).

Every call yields exactly ``--new-tokens`` tokens: ``max_new_tokens=N, min_new_tokens=N`` on the
transformers / PEFT sides, ``eos_token_id=[]`` on the frozenvl side.

Method: one warm-up call per side (also used for the token checks), then ``--repeats`` timed calls per
side; each repeat runs the three sides in a rotated order (base, frozenvl, peft / frozenvl, peft, base /
...) to cancel drift. tokens/s = new tokens / wall time of one whole ``generate`` call (prefill
included: the prompt is short, so this is decode speed). The table shows each side's best and median
tokens/s; the ratios frozenvl/base and frozenvl/peft are of the best times, of the median times and of
the process CPU times of the best calls. Raw seconds of every call follow.

    python benchmarks/bench_adaption_prompt.py [--quick] [--new-tokens 64] [--repeats 3] [--threads 1]

Nothing is downloaded. ``--quick`` is a smoke run (same model, fewer tokens and repeats, < 1 min).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
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
from transformers import AutoModelForCausalLM

quiet()

import frozenvl  # noqa: E402
from frozenvl.importers.peft_adaption_prompt import import_peft_adaption_prompt  # noqa: E402
from frozenvl.tiny import build_llm, build_tokenizer  # noqa: E402

PROMPT = "You are a helpful assistant that can see images. Describe the image in one sentence."
WORKFLOW = "ap"

# ~32M parameters: 8 layers x (attention 0.79M + MLP 3.1M) + embeddings / LM head (vocab 512).
LLM = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=2048)
ADAPTER_LEN = 10
ADAPTER_LAYERS = 8  # all of them


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Side:
    name: str
    run: Callable[[], torch.Tensor]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    tokens: torch.Tensor | None = None


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out








# ------------------------------------------------------------------------------------------ models
def build_sides(root: Path, new_tokens: int):
    """(sides, info): the three generate callables on identical weights, plus facts to print."""
    from peft import AdaptionPromptConfig, PeftModel, get_peft_model

    tok_dir = root / "tokenizer"
    build_tokenizer(tok_dir)
    llm_dir = build_llm(root / "llm", tokenizer_dir=tok_dir, **LLM)

    # PEFT model with non-zero adapter values; saved, then imported into frozenvl.
    peft_base = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    peft_model = get_peft_model(
        peft_base,
        AdaptionPromptConfig(adapter_len=ADAPTER_LEN, adapter_layers=ADAPTER_LAYERS, task_type="CAUSAL_LM"),
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("adaption_prompt") or name.endswith("adaption_gate"):
                p.copy_(torch.randn(p.shape, generator=g))
    adapter_dir = root / "peft-adapter"
    peft_model.save_pretrained(adapter_dir)
    # Time the PEFT model as a user gets it from disk: base + PeftModel.from_pretrained.
    del peft_model, peft_base
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval(), adapter_dir
    ).eval()
    out = import_peft_adaption_prompt(adapter_dir, llm_dir, root / "frozenvl", workflow=WORKFLOW)
    model = frozenvl.load(out, dtype="float32").eval()
    base = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()

    family = model.workflow(WORKFLOW)
    # A text-only adapter (visual: none) has no text fallback: generate(task=WORKFLOW) runs it, as PEFT does.
    assert family.cfg.text_fallback is False
    gates = [float(family.gate[str(i)]) for i in family.adapted]
    tok = model.tokenizer
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    mask = torch.ones_like(ids)
    assert model.route(WORKFLOW, ids, None) == WORKFLOW
    plen = ids.shape[1]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    hf_kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                     eos_token_id=eos, pad_token_id=pad)

    def run_base():
        return base.generate(input_ids=ids, attention_mask=mask, **hf_kwargs)[:, plen:]

    def run_frozenvl():
        return model.generate(ids, mask, task=WORKFLOW, max_new_tokens=new_tokens, eos_token_id=[])

    def run_peft():
        return peft_model.generate(input_ids=ids, attention_mask=mask, **hf_kwargs)[:, plen:]

    with torch.inference_mode():
        pos = torch.arange(plen)[None]
        ref = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, mask, task=WORKFLOW, position_ids=pos).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    info = dict(
        params=n_params(base),
        adapter_params=sum(p.numel() for ps in family.parts().values() for p in ps),
        adapted=family.adapted,
        gates=gates,
        prompt_len=plen,
        logit_diff=(ref - got).abs().max().item(),
        adapter_effect=(got - plain).abs().max().item(),
        eos=eos,
    )
    sides = [Side("(a) base", run_base), Side("(b) frozenvl", run_frozenvl), Side("(c) peft", run_peft)]
    return sides, info


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 tokens, 2 repeats (< 1 min)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per call (default 64; --quick: 16)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 3; --quick: 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)

    new_tokens = args.new_tokens or (16 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 3)
    if new_tokens < 1 or repeats < 1 or args.threads < 1:
        ap.error("--new-tokens, --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)

    import peft

    print(
        f"frozenvl {frozenvl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, python {platform.python_version()}, {platform.machine()}, {args.threads} "
        f"thread(s) of {os.cpu_count()} cores, fp32 CPU, batch 1, greedy, {new_tokens} new tokens, {repeats} "
        f"repeat(s) per side after a warm-up" + (" [--quick]" if args.quick else "")
    )
    t_start = time.perf_counter()
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="frozenvl-bench-ap-") as tmp:
        log("building a random Llama, a PEFT adaption-prompt adapter, importing it into frozenvl ...")
        sides, info = build_sides(Path(tmp), new_tokens)
        print(
            f"base LLM: Llama, {info['params'] / 1e6:.1f}M parameters (hidden {LLM['hidden_size']}, "
            f"{LLM['num_layers']} layers, {LLM['num_heads']} heads / {LLM['num_kv_heads']} kv heads, intermediate "
            f"{LLM['intermediate_size']}, vocab 512), sdpa attention; prompt {info['prompt_len']} tokens"
        )
        print(
            f"adapter: adapter_len {ADAPTER_LEN}, layers {info['adapted'][0]}..{info['adapted'][-1]} "
            f"({len(info['adapted'])}), gate scalar, visual none, {info['adapter_params'] / 1e3:.1f}K parameters; "
            f"gates {', '.join(f'{x:+.2f}' for x in info['gates'])}"
        )
        print(
            f"prefill logits: max |frozenvl - peft| {info['logit_diff']:.2e}, "
            f"max |frozenvl - base| {info['adapter_effect']:.2e} (the adapter is active)"
        )
        log(f"built in {time.perf_counter() - t_start:.1f}s; measuring ...")

        # warm-up, also the token checks
        for s in sides:
            *_, s.tokens = timed(s.run)
            assert s.tokens.shape == (1, new_tokens), (s.name, tuple(s.tokens.shape))
        for k in range(repeats):
            order = sides[k % 3 :] + sides[: k % 3]
            for s in order:
                dt, cpu, _ = timed(s.run)
                s.wall.append(dt)
                s.cpu.append(cpu)
            speeds = ", ".join(f"{x.name} {new_tokens / x.wall[-1]:.1f} tok/s" for x in sides)
            log(f"  repeat {k + 1}/{repeats}: {speeds}")

    base, fz, pe = sides
    print()
    rows = []
    for s in sides:
        rows.append([
            s.name, f"{new_tokens / min(s.wall):.1f}", f"{new_tokens / statistics.median(s.wall):.1f}",
            f"{1000 * min(s.wall) / new_tokens:.2f}", f"{1000 * statistics.median(s.wall) / new_tokens:.2f}",
        ])
    print_table(
        f"greedy decode, batch 1, {new_tokens} new tokens per call; tok/s = new tokens / wall time of one "
        "generate call",
        ["side", "tok/s (best)", "tok/s (median)", "ms/token (best)", "ms/token (median)"],
        rows,
    )

    def ratios(other: Side) -> list[str]:
        best = min(other.wall) / min(fz.wall)
        median = statistics.median(other.wall) / statistics.median(fz.wall)
        cpu = other.cpu[other.wall.index(min(other.wall))] / fz.cpu[fz.wall.index(min(fz.wall))]
        return [f"{best:.3f}", f"{median:.3f}", f"{cpu:.3f}"]

    print_table(
        "ratios of tokens/s (> 1: frozenvl faster)",
        ["ratio", "best", "median", "CPU s of best calls"],
        [["(b)/(a) frozenvl / base", *ratios(base)], ["(b)/(c) frozenvl / peft", *ratios(pe)]],
    )
    print("seconds per call, wall (process CPU, all threads):")
    for s in sides:
        print(f"  {s.name:>12}: " + ", ".join(f"{w:.3f} ({c:.3f})" for w, c in zip(s.wall, s.cpu)))

    print_load_footer(t_start, load_start, args.threads)

    same = torch.equal(fz.tokens, pe.tokens)
    if same:
        print("correctness: frozenvl and PEFT generated identical greedy tokens")
    else:
        c = int((fz.tokens != pe.tokens).nonzero()[0, 1])
        note = ""
        if (fz.tokens == info["eos"]).any():
            note = " (frozenvl greedily picked eos, which min_new_tokens forbids PEFT)"
        print(f"correctness: TOKENS DIFFER between frozenvl and PEFT, first at step {c}: frozenvl "
              f"{int(fz.tokens[0, c])}, peft {int(pe.tokens[0, c])}{note}")
    print(f"(frozenvl tokens {'differ from' if not torch.equal(fz.tokens, base.tokens) else 'EQUAL'} the bare "
          "base model's: the adapter " + ("changes the output)" if not torch.equal(fz.tokens, base.tokens)
                                          else "did not change the greedy output)"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
