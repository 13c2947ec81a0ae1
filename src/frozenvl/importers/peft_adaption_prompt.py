"""Import a PEFT adaption-prompt adapter (LLaMA-Adapter, ``AdaptionPromptConfig``) as a frozenvl workflow.

PEFT saves ``adapter_config.json`` (``peft_type`` "ADAPTION_PROMPT", ``adapter_len``,
``adapter_layers``, ``target_modules`` "self_attn") and ``adapter_model.safetensors`` with, for each of
the top ``adapter_layers`` decoder layers i, ``...layers.{i}.self_attn.adaption_prompt`` [1, len, hidden]
and ``...layers.{i}.self_attn.adaption_gate`` [1]. That is exactly an ``adaption_prompt`` workflow with
``gate: scalar``; frozenvl's forward reproduces PEFT's logits (bit for bit on Llama / Mistral, whose
``o_proj`` has no bias).

The base LLM is not copied: ``frozenvl.json`` records ``base_llm`` (a local directory as an absolute
path, or a hub id). Without ``vision`` the workflow is text-only (``visual: none``). With a vision
encoder it is a ``visual`` ("v1" by default) workflow whose fresh visual side has its output layer set
to zero, so the imported model still gives PEFT's logits, with or without images, until it is trained.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from ..config import ConfigError

_KEY_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$")


def read_peft_adaption_prompt(
    adapter_dir: str | os.PathLike,
) -> tuple[dict[str, Any], dict[int, dict[str, torch.Tensor]]]:
    """(adapter_config, {layer index: {"prompt": [len, hidden], "gate": [1]}}) of a saved PEFT adapter."""
    adapter_dir = os.fspath(adapter_dir)
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: is {adapter_dir} a PEFT adapter directory?")
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("peft_type") != "ADAPTION_PROMPT":
        raise ValueError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}, expected 'ADAPTION_PROMPT'")
    if config.get("target_modules", "self_attn") != "self_attn":
        raise ValueError(
            f"{cfg_path}: target_modules {config['target_modules']!r}; only 'self_attn' (Llama-style) is supported"
        )
    st_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    bin_path = os.path.join(adapter_dir, "adapter_model.bin")
    if os.path.isfile(st_path):
        from safetensors.torch import load_file

        state = load_file(st_path)
    elif os.path.isfile(bin_path):
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{adapter_dir} has neither adapter_model.safetensors nor adapter_model.bin")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY_RE.search(key)
        if m is None:
            raise ValueError(f"{adapter_dir}: unexpected tensor {key!r} in an adaption-prompt adapter")
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
    for idx, entry in layers.items():
        if set(entry) != {"prompt", "gate"}:
            raise ValueError(f"{adapter_dir}: layer {idx} has {sorted(entry)}, expected prompt and gate")
        entry["prompt"] = entry["prompt"].reshape(entry["prompt"].shape[-2:])
    return config, layers


def import_peft_adaption_prompt(
    adapter_dir: str | os.PathLike,
    base_llm_dir: str,
    out_dir: str | os.PathLike,
    workflow: str = "mm",
    vision: str | None = None,
    *,
    visual: str | None = None,
    attn_implementation: str | None = None,
) -> str:
    """Write a frozenvl model directory `out_dir` holding PEFT adapter `adapter_dir` as workflow `workflow`.

    `base_llm_dir`: the base LLM the adapter was trained on (local dir or hub id). `vision`: optional
    vision encoder; with it the workflow gets a zero-output visual side of kind `visual` ("v1" by
    default, or "v2"). Returns `out_dir`.
    """
    import frozenvl

    config, layers = read_peft_adaption_prompt(adapter_dir)
    adapter_len, adapter_layers = int(config["adapter_len"]), int(config["adapter_layers"])
    if visual is None:
        visual = "none" if vision is None else "v1"
    if visual != "none" and vision is None:
        raise ConfigError(f"visual {visual!r} needs a vision encoder: give vision=...")
    wf: dict[str, Any] = {
        "family": "adaption_prompt",
        "adapter_len": adapter_len,
        "adapter_layers": adapter_layers,
        "gate": "scalar",
        "visual": visual,
    }
    if visual == "v2":
        wf["v2_queries"] = adapter_len
    model = frozenvl.build(base_llm_dir, vision, workflows={workflow: wf}, attn_implementation=attn_implementation)
    family = model.workflow(workflow)
    if sorted(layers) != family.adapted:
        raise ValueError(
            f"{adapter_dir} adapts layers {sorted(layers)} but adapter_layers={adapter_layers} on this "
            f"{model.llm.config.num_hidden_layers}-layer LLM means layers {family.adapted}: wrong base LLM?"
        )
    with torch.no_grad():
        for idx, entry in layers.items():
            prompt, gate = family.prompt[str(idx)], family.gate[str(idx)]
            if tuple(entry["prompt"].shape) != tuple(prompt.shape) or entry["gate"].numel() != 1:
                raise ValueError(
                    f"{adapter_dir}: layer {idx} prompt {tuple(entry['prompt'].shape)} / gate "
                    f"{tuple(entry['gate'].shape)} do not fit this LLM (expected {tuple(prompt.shape)} and (1,)): "
                    "wrong base LLM?"
                )
            prompt.copy_(entry["prompt"])
            gate.copy_(entry["gate"].reshape(1))
        if family.connector is not None:
            last = family.connector.proj_out if visual == "v2" else getattr(
                family.connector, f"linear_{family.connector.depth}"
            )
            last.weight.zero_()
            if last.bias is not None:
                last.bias.zero_()
    model.save_pretrained(out_dir)
    return os.fspath(out_dir)
