"""Import a Hugging Face LLaVA checkpoint (``LlavaForConditionalGeneration``) as a frozenvl model.

LLaVA-1.5 is exactly frozenvl's ``prefix`` family with an ``mlp2x_gelu`` connector: the projector's
output replaces the image tokens in the input embeddings and the language model runs unchanged. The
import splits the checkpoint into its three parts: a standalone causal LM, a standalone vision
encoder, and a frozenvl workflow that owns only the projector.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
)

from ..config import ModelConfig, parse_workflow
from ..families.base import LMParts
from ..model import FrozenVLModel
from ..vision.encoder import VisionTower
from .checkpoint import copy_preprocessor_config, has_tokenizer, read_checkpoint_config

# Vision encoders whose LLaVA feature selection frozenvl reproduces exactly, and whether each has a
# CLS token in front of the patch tokens (LLaVA's "default" strategy always drops the first token).
_VISION_HAS_CLS = {"clip_vision_model": True, "siglip_vision_model": False}


def import_llava_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    workflow: str = "mm",
    image_mode: str = "pad",
) -> str:
    """Convert the local LLaVA checkpoint in ``src`` into a frozenvl model directory ``out``.

    ``src`` holds a transformers ``LlavaForConditionalGeneration`` checkpoint (``config.json`` with
    ``model_type`` "llava" and its weights; tokenizer and processor files are optional). Written:

    * ``out/llm/``: the language model as a standalone causal LM of the text config's architecture
      (e.g. ``LlamaForCausalLM``) with LLaVA's language-model weights and ``lm_head``, plus the
      tokenizer when ``src`` has one (``frozenvl.load`` needs it; without one a warning says so)
      and ``src``'s generation config when present;
    * ``out/vision/``: the vision tower as a standalone encoder (e.g. ``CLIPVisionModel``) plus
      ``preprocessor_config.json`` when ``src`` has one (or a v5 ``processor_config.json`` holding one);
    * ``out`` itself: a frozenvl model (``frozenvl.json`` + ``workflow-<workflow>.safetensors``) with
      one ``prefix`` workflow named ``workflow``, whose ``mlp2x_gelu`` connector holds LLaVA's
      ``multi_modal_projector`` weights (``linear_1`` / ``linear_2``; a projector without biases is
      imported with zero biases, which computes the same function), ``select_layer`` =
      ``vision_feature_layer`` and ``keep_cls`` = (``vision_feature_select_strategy == "full"``).
      ``frozenvl.json`` records ``out/llm`` and ``out/vision`` by absolute path.

    The number of image tokens per image follows the vision encoder: one per patch, plus one for
    the CLS token with the "full" strategy. That is the number of features LLaVA itself splices in,
    i.e. the checkpoint's ``image_seq_length`` (e.g. 576 for CLIP ViT-L/14 at 336 px); in
    frozenvl's ``input_ids`` each image takes that many ``IMAGE_TOKEN_ID`` (-200) positions where
    LLaVA writes its ``image_token_index``. ``image_mode`` picks frozenvl's image preprocessing
    ("pad": LLaVA-1.5's pad-to-square; "resize").

    Weights keep the checkpoint's dtype. Returns ``str(out)``.

    Raises ``ValueError`` if ``src`` is not a LLaVA checkpoint (naming the ``model_type`` found)
    and ``NotImplementedError`` for LLaVA variants frozenvl cannot reproduce exactly (several vision
    feature layers, a projector activation other than gelu, vision encoders other than CLIP/SigLIP,
    the "default" strategy on an encoder without a CLS token).
    """
    src_dir, out_dir = os.fspath(src), os.fspath(out)
    config = read_checkpoint_config(src_dir, "llava", "LLaVA", LlavaConfig)
    wf = _workflow_config(config, src_dir, workflow, image_mode)

    llava, info = LlavaForConditionalGeneration.from_pretrained(src_dir, dtype="auto", output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{src_dir}: the checkpoint lacks {len(missing)} weight(s), e.g. {missing[:5]}")
    llava.eval()

    os.makedirs(out_dir, exist_ok=True)
    llm_dir, vision_dir = os.path.join(out_dir, "llm"), os.path.join(out_dir, "vision")

    # --- the language model ---------------------------------------------------------------
    causal = _standalone_causal_lm(llava)
    LMParts(causal)  # frozenvl's layout check: fail before writing anything large
    if os.path.isfile(os.path.join(src_dir, "generation_config.json")):
        causal.generation_config = GenerationConfig.from_pretrained(src_dir)
    causal.save_pretrained(llm_dir)
    if has_tokenizer(src_dir):
        AutoTokenizer.from_pretrained(src_dir).save_pretrained(llm_dir)
    else:
        warnings.warn(
            f"{src_dir} has no tokenizer files: {llm_dir} has no tokenizer, and frozenvl.load({out_dir!r}) "
            "needs one there (save the LLaVA tokenizer into it)",
            stacklevel=2,
        )

    # --- the vision tower -----------------------------------------------------------------
    tower: PreTrainedModel = llava.model.vision_tower  # LLaVA builds it as AutoModel.from_config(vision_config)
    tower.save_pretrained(vision_dir)
    copy_preprocessor_config(src_dir, vision_dir)

    # --- the projector, as a frozenvl prefix workflow --------------------------------------
    projector = _projector_state(llava)
    model = FrozenVLModel(
        ModelConfig(llm=os.path.abspath(llm_dir), vision=os.path.abspath(vision_dir), workflows={workflow: wf}),
        causal,
        _NoTokenizer(),
        VisionTower(tower),
    )
    model.workflow(workflow).connector.load_state_dict(projector, strict=True)
    model.save_pretrained(out_dir, tasks=[workflow])
    return out_dir


# ------------------------------------------------------------------------------------------ helpers
class _NoTokenizer:
    """Stand-in for FrozenVLModel's tokenizer argument: the import only saves, it never tokenizes."""

    pad_token_id = 0


def _workflow_config(config: Any, src_dir: str, workflow: str, image_mode: str):
    layer = config.vision_feature_layer
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise NotImplementedError(
            f"{src_dir}: vision_feature_layer={layer!r}: frozenvl's connector reads one vision layer; "
            "LLaVA checkpoints that concatenate several feature layers are not supported"
        )
    vcfg = config.vision_config
    n_states = vcfg.num_hidden_layers + 1  # embeddings + one per layer
    if not -n_states <= layer < n_states:
        raise ValueError(f"{src_dir}: vision_feature_layer={layer} is out of range for {n_states} hidden states")
    act = config.projector_hidden_act
    if act != "gelu":
        raise NotImplementedError(
            f"{src_dir}: projector_hidden_act={act!r}: frozenvl's mlp2x_gelu connector uses exact (erf) gelu only"
        )
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise NotImplementedError(f"{src_dir}: vision_feature_select_strategy={strategy!r} is not 'default' or 'full'")
    vtype = vcfg.model_type
    if vtype not in _VISION_HAS_CLS:
        raise NotImplementedError(
            f"{src_dir}: vision encoder {vtype!r} is not supported (supported: {sorted(_VISION_HAS_CLS)})"
        )
    has_cls = _VISION_HAS_CLS[vtype]
    if strategy == "default" and not has_cls:
        raise NotImplementedError(
            f"{src_dir}: vision_feature_select_strategy='default' on {vtype!r}, which has no CLS token: LLaVA drops "
            "the first patch token there, which frozenvl does not reproduce"
        )
    keep_cls = strategy == "full"
    n_tokens = (vcfg.image_size // vcfg.patch_size) ** 2 + (1 if keep_cls and has_cls else 0)
    if getattr(config, "image_seq_length", n_tokens) != n_tokens:
        warnings.warn(
            f"{src_dir}: image_seq_length={config.image_seq_length} but the vision encoder gives {n_tokens} tokens "
            f"per image; frozenvl uses {n_tokens} (the number LLaVA's forward splices in)",
            stacklevel=3,
        )
    return parse_workflow(
        workflow,
        {
            "family": "prefix",
            "connector": "mlp2x_gelu",
            "select_layer": layer,
            "keep_cls": keep_cls,
            "image_mode": image_mode,
        },
    )


def _standalone_causal_lm(llava: LlavaForConditionalGeneration) -> PreTrainedModel:
    """A causal LM of the text config's class that uses LLaVA's own language-model modules.

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


def _projector_state(llava: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    proj = llava.model.multi_modal_projector
    state: dict[str, torch.Tensor] = {}
    for name in ("linear_1", "linear_2"):
        linear: nn.Linear = getattr(proj, name)
        state[f"{name}.weight"] = linear.weight.detach()
        # multimodal_projector_bias=False: a zero bias computes the same function.
        bias = linear.bias
        state[f"{name}.bias"] = (
            bias.detach() if bias is not None else torch.zeros(linear.out_features, dtype=linear.weight.dtype)
        )
    return state
