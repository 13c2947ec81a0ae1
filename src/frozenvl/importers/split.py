"""What the LLaVA-style importers share (LLaVA, InternVL, LLaVA-NeXT): load the transformers
model, write its language model and vision tower as standalone checkpoints, and the projector (plus any
layout tokens) as a frozenvl ``prefix`` workflow."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from ..config import ModelConfig, WorkflowConfig
from ..families.base import LMParts
from ..model import FrozenVLModel
from ..vision.encoder import VisionTower
from .checkpoint import copy_preprocessor_config, has_tokenizer


class _NoTokenizer:
    """Stand-in for FrozenVLModel's tokenizer argument: the import only saves, it never tokenizes."""

    pad_token_id = 0


def load_checkpoint(model_class: type, src_dir: str) -> PreTrainedModel:
    """`model_class.from_pretrained(src_dir)` in the checkpoint's dtype, refusing missing weights."""
    model, info = model_class.from_pretrained(src_dir, dtype="auto", output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{src_dir}: the checkpoint lacks {len(missing)} weight(s), e.g. {missing[:5]}")
    return model.eval()


def write_split(
    hf: PreTrainedModel,
    src_dir: str,
    out_dir: str,
    workflow: str,
    wf: WorkflowConfig,
    fill_workflow: Callable[[Any], None],
) -> str:
    """Write ``out/llm`` (language model + lm_head, tokenizer, generation config), ``out/vision``
    (vision tower + preprocessor config) and ``out`` itself (frozenvl.json + the workflow, whose
    weights `fill_workflow(family)` sets). `hf` has LLaVA's layout: ``model.language_model``,
    ``model.vision_tower``, ``lm_head``."""
    os.makedirs(out_dir, exist_ok=True)
    llm_dir, vision_dir = os.path.join(out_dir, "llm"), os.path.join(out_dir, "vision")
    causal = _standalone_causal_lm(hf)
    LMParts(causal)  # frozenvl's layout check: fail before writing anything large
    if os.path.isfile(os.path.join(src_dir, "generation_config.json")):
        causal.generation_config = GenerationConfig.from_pretrained(src_dir)
    causal.save_pretrained(llm_dir)
    if has_tokenizer(src_dir):
        AutoTokenizer.from_pretrained(src_dir).save_pretrained(llm_dir)
    else:
        warnings.warn(
            f"{src_dir} has no tokenizer files: {llm_dir} has no tokenizer, and frozenvl.load({out_dir!r}) needs one there",
            stacklevel=3,
        )
    tower: PreTrainedModel = hf.model.vision_tower
    tower.save_pretrained(vision_dir)
    copy_preprocessor_config(src_dir, vision_dir)
    model = FrozenVLModel(
        ModelConfig(llm=os.path.abspath(llm_dir), vision=os.path.abspath(vision_dir), workflows={workflow: wf}),
        causal,
        _NoTokenizer(),
        VisionTower(tower),
    )
    with torch.no_grad():
        fill_workflow(model.workflow(workflow))
    model.save_pretrained(out_dir, tasks=[workflow])
    return out_dir


def processor_options(src_dir: str) -> dict[str, Any]:
    """The image processor's settings of a checkpoint (preprocessor_config.json, or the image processor
    nested in processor_config.json); {} when there are none."""
    import json

    for name, nested in (("preprocessor_config.json", False), ("processor_config.json", True)):
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            data = data.get("image_processor", {}) if nested else data
            if isinstance(data, dict) and data:
                return data
    return {}


def _standalone_causal_lm(llava: PreTrainedModel) -> PreTrainedModel:
    """A causal LM of the text config's class that uses a LLaVA-layout model's own language-model modules.

    The wrapper is built on the meta device and then takes over LLaVA's (already loaded) decoder and
    lm_head, so no second copy of the weights is allocated or randomly initialised.
    """
    text_config = llava.config.text_config
    decoder, head = llava.model.language_model, llava.lm_head
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(text_config, dtype=decoder.dtype)
    prefix = causal.base_model_prefix
    inner = getattr(causal, prefix, None)
    if type(inner) is not type(decoder) or not isinstance(causal.get_output_embeddings(), nn.Linear):
        raise NotImplementedError(
            f"{type(causal).__name__} is not laid out as <{prefix}: {type(decoder).__name__}> + lm_head; "
            "cannot build a standalone LLM from this LLaVA checkpoint"
        )
    setattr(causal, prefix, decoder)
    if not text_config.tie_word_embeddings and _same_storage(head.weight, decoder.get_input_embeddings().weight):
        # LLaVA tied its head to the embeddings but the text config does not tie: give the head its own copy.
        untied = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        untied.weight = nn.Parameter(head.weight.detach().clone())
        if head.bias is not None:
            untied.bias = nn.Parameter(head.bias.detach().clone())
        head = untied
    causal.set_output_embeddings(head)
    left = [n for n, t in (*causal.named_parameters(), *causal.named_buffers()) if t.is_meta]
    if left:
        raise NotImplementedError(f"{type(causal).__name__}: tensors {left[:5]} are not part of LLaVA's language model")
    return causal.eval()


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
