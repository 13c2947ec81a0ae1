"""Import a Hugging Face InternVL checkpoint (``InternVLForConditionalGeneration``) as a frozenvl model.

InternVL (2.5 / 3, the ``-hf`` checkpoints) is frozenvl's ``prefix`` family with the ``pixel_shuffle``
connector (each 2x2 block of patch features -> one token, LayerNorm, MLP) and ``tiling: dynamic``:
every image is cut into up to ``max_patches`` tiles of the encoder's size plus a thumbnail
(transformers' ``GotOcr2ImageProcessor`` with ``crop_to_patches``), each tile's tokens in reading
order. The import splits the checkpoint into a standalone causal LM, a standalone vision encoder and
a workflow that owns only the projector.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import InternVLConfig, InternVLForConditionalGeneration

from ..config import parse_workflow
from .checkpoint import read_checkpoint_config
from .split import load_checkpoint, processor_options, write_split


def import_internvl_hf(src: str | os.PathLike, out: str | os.PathLike, *, workflow: str = "mm") -> str:
    """Convert the local InternVL checkpoint in ``src`` into a frozenvl model directory ``out``.

    Written: ``out/llm`` (the text model as a standalone causal LM, e.g. ``Qwen2ForCausalLM``, with the
    tokenizer when ``src`` has one), ``out/vision`` (``InternVLVisionModel`` + the image processor's
    config) and ``out`` (one ``prefix`` workflow named ``workflow``: connector
    ``pixel_shuffle:factor=1/downsample_ratio`` holding ``multi_modal_projector``, ``select_layer`` =
    ``vision_feature_layer``, ``tiling: dynamic`` with the processor's ``min_patches`` / ``max_patches``).
    Each tile takes (patches / factor^2) image tokens, InternVL's ``image_seq_length``.

    Raises ``ValueError`` for a checkpoint that is not InternVL and ``NotImplementedError`` for what
    frozenvl does not reproduce exactly (several feature layers, the "full" strategy, a final vision
    LayerNorm read through the last layer, an activation other than gelu).
    """
    src_dir, out_dir = os.fspath(src), os.fspath(out)
    config = read_checkpoint_config(src_dir, "internvl", "InternVL", InternVLConfig)
    wf = parse_workflow(workflow, _workflow_options(config, src_dir))
    hf = load_checkpoint(InternVLForConditionalGeneration, src_dir)

    def fill(family: Any) -> None:
        family.connector.load_state_dict(hf.model.multi_modal_projector.state_dict(), strict=True)

    return write_split(hf, src_dir, out_dir, workflow, wf, fill)


def _workflow_options(config: InternVLConfig, src_dir: str) -> dict[str, Any]:
    layer = config.vision_feature_layer
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise NotImplementedError(f"{src_dir}: vision_feature_layer={layer!r}: frozenvl reads one vision layer")
    if config.vision_feature_select_strategy != "default":
        raise NotImplementedError(
            f"{src_dir}: vision_feature_select_strategy={config.vision_feature_select_strategy!r}: pixel shuffle "
            "needs the patch grid without the CLS token ('default')"
        )
    if layer == -1 and not config.vision_config.use_mean_pooling:
        raise NotImplementedError(
            f"{src_dir}: vision_feature_layer=-1 with use_mean_pooling=False reads the final LayerNorm's output, "
            "which frozenvl's vision tower (hidden states) does not"
        )
    if config.projector_hidden_act != "gelu":
        raise NotImplementedError(f"{src_dir}: projector_hidden_act={config.projector_hidden_act!r}: gelu only")
    factor = round(1 / config.downsample_ratio)
    if abs(factor * config.downsample_ratio - 1) > 1e-9:
        raise NotImplementedError(f"{src_dir}: downsample_ratio={config.downsample_ratio} is not 1/integer")
    proc = processor_options(src_dir)
    options: dict[str, Any] = {
        "family": "prefix",
        "connector": f"pixel_shuffle:factor={factor}",
        "select_layer": layer,
        "keep_cls": False,
        "image_mode": "resize",
    }
    if proc.get("crop_to_patches", True):
        options.update(tiling="dynamic", min_tiles=int(proc.get("min_patches", 1)),
                       max_tiles=int(proc.get("max_patches", 12)), use_thumbnail=True)
    return options
