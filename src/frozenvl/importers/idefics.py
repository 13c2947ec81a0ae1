"""Import a Hugging Face IDEFICS checkpoint (``IdeficsForVisionText2Text``) as a frozenvl model.

IDEFICS is frozenvl's ``cross_attention`` family in ``style: idefics``: a Llama text path, a CLIP-style
vision encoder whose last hidden state (CLS included) feeds an optional perceiver resampler, gated
cross-attention blocks before every ``cross_layer_interval``-th decoder layer, and an additional
vocabulary (``<image>``, ``<fake_token_around_image>``, ...) with its own embedding and head rows.
The import splits it into a standalone ``LlamaForCausalLM``, a standalone ``CLIPVisionModel`` and a
workflow owning the resampler, the blocks and the additional vocabulary.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    IdeficsConfig,
    IdeficsForVisionText2Text,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.initialization import no_init_weights

from ..config import ModelConfig, parse_workflow
from ..families.base import LMParts
from ..model import FrozenVLModel
from ..vision.encoder import VisionTower
from .checkpoint import PREPROCESSOR_FILE, copy_preprocessor_config, has_tokenizer, read_checkpoint_config

# IDEFICS' image normalisation (OpenAI CLIP's), used when the checkpoint has no preprocessor config.
_IDEFICS_MEAN = [0.48145466, 0.4578275, 0.40821073]
_IDEFICS_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_TOKEN = "<image>"


def import_idefics(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    workflow: str = "mm",
    tokenizer: str | os.PathLike | None = None,
) -> str:
    """Convert the local IDEFICS checkpoint in ``src`` into a frozenvl model directory ``out``.

    Written: ``out/llm`` (``LlamaForCausalLM`` with IDEFICS' text weights and base vocabulary, plus
    the tokenizer and generation config), ``out/vision`` (``CLIPVisionModel`` with the vision weights,
    plus a preprocessor config) and ``out`` itself: ``frozenvl.json`` and
    ``workflow-<workflow>.safetensors`` with one ``cross_attention`` workflow (``style: idefics``)
    owning the perceiver resampler, the gated cross-attention blocks (gates as trained) and the
    additional vocabulary's embedding and head rows.

    The tokenizer (from ``tokenizer`` or else ``src``) must hold the additional tokens at ids
    ``vocab_size ..`` (IDEFICS' own tokenizers do); they become the workflow's ``extra_tokens`` and
    ``<image>`` among them marks images. In frozenvl's ``input_ids`` each image is one
    ``IMAGE_TOKEN_ID`` (-200) where IDEFICS writes its ``<image>`` id, and the image a token attends
    to is IDEFICS' processor rule (the most recent ``<image>``), computed from the ids.

    Raises ``ValueError`` for a directory that is not an IDEFICS checkpoint, one lacking weights, or a
    tokenizer without the additional vocabulary; nothing is written before those checks pass.
    """
    src_dir, out_dir = os.fspath(src), os.fspath(out)
    config = _read_idefics_config(src_dir)
    tok_dir = os.fspath(tokenizer) if tokenizer is not None else src_dir
    if not has_tokenizer(tok_dir):
        raise ValueError(
            f"{tok_dir} has no tokenizer files: the import needs IDEFICS' tokenizer (pass tokenizer=DIR / --tokenizer)"
        )
    tok = AutoTokenizer.from_pretrained(tok_dir)
    extra = _extra_tokens(tok, config, tok_dir)

    idefics, info = IdeficsForVisionText2Text.from_pretrained(src_dir, dtype="auto", output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{src_dir}: the checkpoint lacks {len(missing)} weight(s), e.g. {missing[:5]}")
    idefics.eval()
    state = idefics.state_dict()

    os.makedirs(out_dir, exist_ok=True)
    llm_dir, vision_dir = os.path.join(out_dir, "llm"), os.path.join(out_dir, "vision")

    # --- the language model ---------------------------------------------------------------
    causal = _standalone_llama(config, state, idefics.dtype)
    LMParts(causal)
    if os.path.isfile(os.path.join(src_dir, "generation_config.json")):
        causal.generation_config = GenerationConfig.from_pretrained(src_dir)
    causal.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)

    # --- the vision tower -----------------------------------------------------------------
    tower = _standalone_clip(config, state, idefics.dtype)
    tower.save_pretrained(vision_dir)
    copy_preprocessor_config(src_dir, vision_dir)
    if not os.path.isfile(os.path.join(vision_dir, PREPROCESSOR_FILE)):
        _write_preprocessor_config(vision_dir, config.vision_config.image_size)

    # --- resampler, blocks and additional vocabulary, as a cross_attention workflow --------
    wf = parse_workflow(workflow, _workflow_dict(config, extra))
    model = FrozenVLModel(
        ModelConfig(llm=os.path.abspath(llm_dir), vision=os.path.abspath(vision_dir), workflows={workflow: wf}),
        causal,
        tok,
        VisionTower(tower),
    )
    family = model.workflow(workflow)
    ids = family.token_ids.tolist()
    expected = list(range(config.vocab_size, config.vocab_size + config.additional_vocab_size))
    if ids != expected:
        raise ValueError(f"the additional tokens {extra} have ids {ids} in the tokenizer, expected {expected}")
    weights = _workflow_state(config, state)
    own = family.owned_state_dict()
    if set(weights) != set(own):
        raise ValueError(
            f"IDEFICS weights do not fill the workflow: missing {sorted(set(own) - set(weights))[:5]}, "
            f"unexpected {sorted(set(weights) - set(own))[:5]}"
        )
    params = dict(family.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.reshape(params[name].shape))
    model.save_pretrained(out_dir, tasks=[workflow])
    return out_dir


# ------------------------------------------------------------------------------------------ helpers
def _read_idefics_config(src_dir: str) -> Any:
    config = read_checkpoint_config(src_dir, "idefics", "IDEFICS", IdeficsConfig)
    if config.num_hidden_layers % config.cross_layer_interval:
        raise ValueError(
            f"{src_dir}: {config.num_hidden_layers} layers are not a multiple of cross_layer_interval "
            f"{config.cross_layer_interval} (transformers' IDEFICS cannot run it either)"
        )
    return config


def _extra_tokens(tok, config, tok_dir: str) -> list[str]:
    """The additional vocabulary's token strings, in id order."""
    names = tok.convert_ids_to_tokens(list(range(config.vocab_size, config.vocab_size + config.additional_vocab_size)))
    if len(tok) < config.vocab_size + config.additional_vocab_size or any(n is None for n in names):
        raise ValueError(
            f"the tokenizer in {tok_dir} has {len(tok)} tokens; IDEFICS' additional vocabulary needs ids "
            f"{config.vocab_size}..{config.vocab_size + config.additional_vocab_size - 1} (e.g. <image>)"
        )
    if IMAGE_TOKEN not in names:
        raise ValueError(f"the additional vocabulary {names} has no {IMAGE_TOKEN} token")
    return list(names)


def _standalone_llama(config, state: dict[str, torch.Tensor], dtype: torch.dtype) -> LlamaForCausalLM:
    text = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        # older 5.x IdeficsConfig (5.5) has no rope_parameters: its Llama uses the default rope
        rope_parameters=dict(getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}),
        tie_word_embeddings=False,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    with no_init_weights():  # every weight is assigned below: skip the random init
        causal = LlamaForCausalLM(text).to(dtype)
    # IDEFICS' text path has Llama's names; a tied checkpoint may store no separate lm_head.
    ours = {name: state[name] for name in causal.state_dict() if name in state}
    ours.setdefault("lm_head.weight", state["model.embed_tokens.weight"].clone())
    causal.load_state_dict(ours, strict=True, assign=True)  # share IDEFICS' tensors: no second copy
    return causal.eval()


def _standalone_clip(config, state: dict[str, torch.Tensor], dtype: torch.dtype) -> CLIPVisionModel:
    v = config.vision_config
    with no_init_weights():
        clip = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=v.embed_dim,
                intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_hidden_layers,
                num_attention_heads=v.num_attention_heads,
                num_channels=v.num_channels,
                image_size=v.image_size,
                patch_size=v.patch_size,
                hidden_act=v.hidden_act,
                layer_norm_eps=v.layer_norm_eps,
            )
        ).to(dtype)
    prefix = "model.vision_model."
    ours = {name: state[prefix + name.removeprefix("vision_model.")] for name in clip.state_dict()}
    clip.load_state_dict(ours, strict=True, assign=True)
    return clip.eval()


def _workflow_dict(config, extra: list[str]) -> dict[str, Any]:
    p = config.perceiver_config
    return {
        "family": "cross_attention",
        "style": "idefics",
        "every": config.cross_layer_interval,
        "gate_type": config.alpha_type,
        "qk_norm": bool(config.qk_layer_norms),
        "media_attention": "latest",
        "resampler": bool(config.use_resampler),
        "resampler_depth": p.resampler_depth,
        "resampler_latents": p.resampler_n_latents,
        "resampler_heads": p.resampler_n_heads,
        "resampler_head_dim": p.resampler_head_dim,
        "resampler_activation": "relu",
        "resampler_qk_norm": bool(p.qk_layer_norms_perceiver),
        "select_layer": -1,  # IDEFICS feeds the vision model's last hidden state, CLS token included
        "keep_cls": True,
        "image_mode": "resize",
        "extra_tokens": extra,
        "image_token": IMAGE_TOKEN,
    }


def _workflow_state(config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """IDEFICS weight names -> the cross_attention family's."""
    out = {
        "token_embed": state["model.embed_tokens.additional_embedding.weight"],
        "token_head": state["lm_head.additional_fc.weight"],
    }
    block_names = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm",
        "cross_attn.q_proj": "q_proj", "cross_attn.k_proj": "k_proj", "cross_attn.v_proj": "v_proj",
        "cross_attn.o_proj": "o_proj", "cross_attn.q_layer_norm": "q_norm", "cross_attn.k_layer_norm": "k_norm",
        "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "down_proj",
    }
    for k in range(config.num_hidden_layers // config.cross_layer_interval):
        src, dst = f"model.gated_cross_attn_layers.{k}.", f"blocks.{k * config.cross_layer_interval}."
        out[dst + "attn_gate"] = state[src + "alpha_cross_attn"]
        out[dst + "ff_gate"] = state[src + "alpha_dense"]
        for theirs, ours in block_names.items():
            if src + theirs + ".weight" in state:
                out[dst + ours + ".weight"] = state[src + theirs + ".weight"]
    if config.use_resampler:
        src = "model.perceiver_resampler."
        out["resampler.latents"] = state[src + "latents"]
        for part in ("weight", "bias"):
            out[f"resampler.norm.{part}"] = state[f"{src}layer_norm.{part}"]
        attn_names = {
            "context_layer_norm": "norm_media", "latents_layer_norm": "norm_latents", "q_layer_norm": "q_norm",
            "k_layer_norm": "k_norm", "q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj",
            "output_proj": "out_proj",
        }
        ff_names = {"ln": "norm", "fc": "fc1", "c_proj": "fc2"}
        for d in range(config.perceiver_config.resampler_depth):
            for names, sub, ours_sub in ((attn_names, 0, "attn"), (ff_names, 1, "ff")):
                for theirs, ours in names.items():
                    for part in ("weight", "bias"):
                        key = f"{src}blocks.{d}.{sub}.{theirs}.{part}"
                        if key in state:
                            out[f"resampler.layers.{d}.{ours_sub}.{ours}.{part}"] = state[key]
    return out


def _write_preprocessor_config(vision_dir: str, image_size: int) -> None:
    cfg = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "do_center_crop": False,
        "resample": 3,  # bicubic, as IDEFICS' processor
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": _IDEFICS_MEAN,
        "image_std": _IDEFICS_STD,
    }
    with open(os.path.join(vision_dir, PREPROCESSOR_FILE), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
