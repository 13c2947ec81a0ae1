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
from transformers import LlavaConfig, LlavaForConditionalGeneration

from ..config import parse_workflow
from .checkpoint import read_checkpoint_config
from .split import load_checkpoint, write_split

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

    llava = load_checkpoint(LlavaForConditionalGeneration, src_dir)
    projector = _projector_state(llava)

    def fill(family) -> None:  # the projector, as the prefix workflow's connector
        family.connector.load_state_dict(projector, strict=True)

    return write_split(llava, src_dir, out_dir, workflow, wf, fill)


# ------------------------------------------------------------------------------------------ helpers
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
