"""The demo's real track (`frozenvl demo --bases real`): ShapesWorld on SmolLM2-135M-Instruct + DINOv2-S/14.

What differs from the tiny track, and why:

- the bases are not pretrained here: `frozenvl.realbases.ensure_bases` materialises them (cached,
  offline, from PyPI wheels; see docs/real_bases.md);
- image tokens: DINOv2-S/14 gives a 16x16 patch grid at 224 px; the families that take a connector
  merge it 2x2 (`pixel_shuffle:factor=2`), 64 tokens per image instead of 256, which is what fits
  the CPU budget (benchmarks/bench_real_bases.py measures both);
- training runs under bf16 autocast where the hardware has bf16 matmuls (`train_precision`);
- the full fine-tune (the LLaVA baseline) trains the LLM at LLaVA's own rate (2e-5), not the tiny
  track's;
- text skills are the real model's: ARC-Easy and PIQA scored by log-likelihood, through each
  workflow's own path (text_fallback off) and as deployed (the base, for frozen workflows), and
  exact agreement with the base's greedy answers on the held-out chat prompts
  (`eval/chat_prompts.txt`). The ShapesWorld text questions are the tiny LLM's pretraining format
  and say nothing about SmolLM2, so the real track does not ask them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model import FrozenVLModel

#: Workflow options per family on the real bases (merged over the tiny track's recipe options).
CONNECTOR_64 = "pixel_shuffle:factor=2"
REAL_FIT: dict[str, dict[str, Any]] = {
    "prefix": {"connector": CONNECTOR_64},
    "inner_adaptor": {"connector": CONNECTOR_64},
    "wings": {"connector": CONNECTOR_64},
    "visual_experts": {"connector": CONNECTOR_64},
    "adaption_prompt": {"adapter_layers": 8},  # LLaMA-Adapter's share of the layers, not the tiny LLM's all
    "cross_attention": {"every": 4},  # Flamingo's spacing on a 30-layer LLM, not the tiny LLM's every layer
}
#: LLaVA's learning rate for the LLM in its fine-tuning stage.
FULL_FINETUNE_LR = 2e-5


def train_precision() -> str:
    """The real track's training precision: bf16 autocast (fp32 masters, docs/training.md) where the
    hardware runs bf16 matmuls natively (a GPU, or a CPU with AVX512-BF16 or AMX), fp32 elsewhere.
    On a 2-core AMX CPU bf16 trains the real prefix ~1.7x faster (benchmarks/bench_real_bases.py);
    without bf16 instructions it would be emulated, and slower than fp32."""
    import torch

    if torch.cuda.is_available():
        return "bf16"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if native else "fp32"


#: Text benchmarks of the real track, as frozenvl.eval.text_skills names them.
BENCHMARKS = ("arc_easy", "piqa")


def real_bases(say: Callable[..., None] = print) -> tuple[str, str, str]:
    """(LLM dir, vision dir, text-benchmark root) of the real bases, materialised on first use."""
    from ..realbases import ensure_bases

    bases = ensure_bases(log=lambda msg: say(f"   {msg}", flush=True))
    return str(bases.llm_dir), str(bases.vision_dir), str(bases.text_benchmarks_dir)


def fit_workflow(workflow: dict[str, Any]) -> dict[str, Any]:
    """A recipe's workflow options with the real track's per-family options on top; the tiny
    track's `select_layer` (its ViT's trained layer) is dropped: DINOv2 takes its default."""
    out = {k: v for k, v in workflow.items() if k != "select_layer"}
    return {**out, **REAL_FIT.get(workflow["family"], {})}


def fit_stages(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stages with the LLM's learning rate set to LLaVA's wherever a stage trains the LLM."""
    out = []
    for st in stages:
        st = dict(st)
        if "llm" in st["train"]:
            lr = st["lr"]
            st["lr"] = {**lr, "llm": FULL_FINETUNE_LR} if isinstance(lr, dict) else \
                {**{p: lr for p in st["train"] if p != "llm"}, "llm": FULL_FINETUNE_LR}
        out.append(st)
    return out


def probe_bases(model: FrozenVLModel, llm_dir: str, vision_dir: str, spec: Any) -> dict[str, dict[str, float]]:
    """What the real bases give any workflow, as the tiny track's probes measure it (the report's
    "What the frozen bases know"): linear probes of DINOv2's patch features at the workflows'
    default layer, through their own preprocessing, on `spec.probe_vit_scenes` fresh scenes; and
    SmolLM2's zero-shot answers on `spec.probe_llm_scenes` scenes described in words. Zero-shot, the
    chat model answers in sentences of its own (scored right when one names the answer and no other
    candidate), so its figure is a floor of what it can read from words, not the trained ceiling the
    tiny LLM's probe is."""
    from ..vision.images import ImagePreprocessor
    from .bases import probe_llm
    from .probes import probe_tower

    pre = ImagePreprocessor.from_pretrained(vision_dir, vision_config=model.vision.config, mode="pad")
    return {"vit": probe_tower(model.vision, pre, n_scenes=spec.probe_vit_scenes, seed=spec.seed),
            "llm": probe_llm(llm_dir, spec, spec.probe_llm_scenes, sentences=True)}


def chat_items(n: int | None = None) -> list[dict[str, Any]]:
    """The held-out chat prompts as text eval items (no gold answer: they are compared with the
    base's own greedy answers, item by item)."""
    from ..eval.text_skills import default_chat_prompts

    prompts = default_chat_prompts()[:n] if n is not None else default_chat_prompts()
    return [{"id": f"chat-{k:03d}", "task": "text", "qtype": "chat", "question": p, "answer": ""}
            for k, p in enumerate(prompts)]


def load_benchmarks(root: str, limit: int | None) -> dict[str, list[Any]]:
    """The first `limit` items of each text benchmark (all with None)."""
    from ..eval.text_skills import load_benchmark

    return {b: load_benchmark(b, root, "validation", limit=limit) for b in BENCHMARKS}


def benchmark_correct(model: FrozenVLModel, benches: dict[str, list[Any]], task: str, *,
                      deployed: bool, batch_size: int = 16, progress: bool = False) -> dict[str, list[float]]:
    """Per benchmark, per item: 1.0 where workflow `task` ranks the gold choice first by summed
    log-likelihood (own path unless `deployed`), else 0.0."""
    from ..eval.text_skills import correct_choices, score_multiple_choice

    out = {}
    for name, items in benches.items():
        res = score_multiple_choice(model, items, task=task, deployed=deployed, batch_size=batch_size,
                                    progress=progress)
        out[name] = [float(c) for c in correct_choices(res.logprobs, res.gold)]
    return out


def text_skill_predictions(model: FrozenVLModel, benches: dict[str, list[Any]], task: str,
                           base: dict[str, list[float]], *, progress: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Per-item benchmark scores of workflow `task` in the demo's prediction format: one list per
    (benchmark, path), keyed ``"<bench>"`` (as deployed) and ``"<bench>_own"`` (own path).
    `base`: the base's scores (`benchmark_correct` on the text workflow), which is what a workflow
    with text_fallback is deployed as."""
    own = benchmark_correct(model, benches, task, deployed=False, progress=progress)
    deployed = base if model.workflow(task).cfg.text_fallback else own
    out: dict[str, list[dict[str, Any]]] = {}
    for name, items in benches.items():
        out[name] = [{"id": it.id, "score": s} for it, s in zip(items, deployed[name])]
        out[f"{name}_own"] = [{"id": it.id, "score": s} for it, s in zip(items, own[name])]
    return out
