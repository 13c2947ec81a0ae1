"""GGUF chat LLM -> an ordinary HF causal-LM directory (float32 safetensors + tokenizer + template).

transformers reads GGUF files itself (the `gguf` package dequantizes them), but refuses to
`save_pretrained` a model loaded that way. So: load dequantized, move the weights into a plain
model built from the same config (no quantization_config), tie the embeddings, and save that with
the tokenizer. The saved directory is then reloaded and checked: the same logits as the GGUF
model (torch.equal), and a greedy answer through the model's own chat template.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECK_PROMPT = "What is the capital of France?"
CHECK_EXPECT = "Paris"


class GgufConversionError(ValueError):
    """The GGUF file did not convert into a working HF model."""


@contextlib.contextmanager
def _gguf_bar_only_on_a_terminal():
    """transformers' GGUF reader draws its own tqdm bar, which `disable_progress_bar()` does not reach;
    written to a log file it is hundreds of carriage-return updates, so it is shown on a terminal only."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None or sys.stderr.isatty():
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _load_gguf(gguf_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    with _gguf_bar_only_on_a_terminal():
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tokenizer


def _plain_copy(gguf_model):
    """The same weights in a model with no quantization state, which save_pretrained accepts."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    # GGUF stores eps as float32 (9.9999997e-06); write the decimal the model was published with.
    # The float32 arithmetic is the same, so the saved model's logits stay bit-identical.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.7g}")
    config.__dict__.pop("_model_name_or_path", None)  # the GGUF's display name, not a config field
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise GgufConversionError(
            f"GGUF weights do not fit {type(plain).__name__}: missing {missing}, unexpected {unexpected}"
        )
    plain.tie_weights()
    return plain.eval()


def greedy_chat_answer(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def convert_gguf_llm(gguf_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Convert and save `gguf_path` into `out_dir`; return the checks (raises when one fails)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    # The GGUF loader wants the file in a folder of its own (it reads the folder like a repo).
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".gguf-") as folder:
        local = Path(folder) / gguf_path.name
        shutil.copyfile(gguf_path, local)
        gguf_model, tokenizer = _load_gguf(local)
    if not tokenizer.chat_template:
        raise GgufConversionError(f"{gguf_path.name}: the GGUF file carries no chat template")
    model = _plain_copy(gguf_model)
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF gives no limit
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    tokenizer2 = AutoTokenizer.from_pretrained(out_dir)
    probe = tokenizer2.apply_chat_template(
        [{"role": "user", "content": CHECK_PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        same_logits = torch.equal(gguf_model(**probe).logits, reloaded(**probe).logits)
    answer = greedy_chat_answer(reloaded, tokenizer2, CHECK_PROMPT)
    cfg = reloaded.config
    checks: dict[str, Any] = {
        "architecture": type(reloaded).__name__,
        "params": sum(p.numel() for p in reloaded.parameters()),
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "embeddings_tied": reloaded.get_output_embeddings().weight.data_ptr()
        == reloaded.get_input_embeddings().weight.data_ptr(),
        "chat_template_kept": tokenizer2.chat_template == tokenizer.chat_template,
        "chat_template_is_chatml": "<|im_start|>" in (tokenizer2.chat_template or ""),
        "saved_logits_equal_gguf_logits": same_logits,
        "greedy_answer": {
            "prompt": CHECK_PROMPT, "answer": answer, "expect": CHECK_EXPECT, "passed": CHECK_EXPECT in answer
        },
    }
    failed = [k for k in ("embeddings_tied", "chat_template_kept", "saved_logits_equal_gguf_logits") if not checks[k]]
    if not checks["greedy_answer"]["passed"]:
        failed.append(f"greedy answer {answer!r} does not mention {CHECK_EXPECT}")
    if failed:
        raise GgufConversionError(f"{gguf_path.name}: converted model failed checks: {failed}")
    return checks
