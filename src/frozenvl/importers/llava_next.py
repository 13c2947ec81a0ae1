"""Import a Hugging Face LLaVA-NeXT checkpoint (``LlavaNextForConditionalGeneration``) as a frozenvl model.

LLaVA-NeXT (1.6) is frozenvl's ``prefix`` family with LLaVA's ``mlp2x_gelu`` connector and
``tiling: anyres``: a global view, then the tiles of the best of ``image_grid_pinpoints``, joined into
one token map, unpadded to the image's aspect ratio, with the learned ``image_newline`` after each of
its rows (transformers' ``spatial_unpad`` packing). The workflow owns the projector and the newline.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from ..config import parse_workflow
from .checkpoint import read_checkpoint_config
from .llava import _projector_state, _workflow_config
from .split import load_checkpoint, processor_options, write_split


def import_llava_next_hf(src: str | os.PathLike, out: str | os.PathLike, *, workflow: str = "mm") -> str:
    """Convert the local LLaVA-NeXT checkpoint in ``src`` into a frozenvl model directory ``out``.

    Written as :func:`frozenvl.importers.import_llava_hf` writes LLaVA (``out/llm``, ``out/vision``,
    ``out``), with the workflow's tiling options taken from the checkpoint: ``tiling: anyres``,
    ``grid_pinpoints`` = ``image_grid_pinpoints``, ``unpad`` and ``image_newline`` on (the newline's
    weight is the connector's ``image_newline``). The image's number of tokens follows its size, as in
    LLaVA-NeXT: the global view's, plus the unpadded tile map's rows each with one newline.

    Raises what the LLaVA importer raises for the same unsupported variants, and ``ValueError`` when the
    processor's crop size is not the vision encoder's image size (the tile size LLaVA-NeXT assumes).
    """
    src_dir, out_dir = os.fspath(src), os.fspath(out)
    config = read_checkpoint_config(src_dir, "llava_next", "LLaVA-NeXT", LlavaNextConfig)
    base = _workflow_config(config, src_dir, workflow, "resize").to_dict()
    tile = config.vision_config.image_size
    crop = processor_options(src_dir).get("crop_size") or {"height": tile}
    if int(crop.get("height", tile)) != tile:
        raise ValueError(f"{src_dir}: crop_size {crop} differs from the vision image_size {tile} (the anyres tile)")
    base.update(tiling="anyres", grid_pinpoints=[list(p) for p in config.image_grid_pinpoints], unpad=True,
                image_newline=True)
    wf = parse_workflow(workflow, base)
    hf = load_checkpoint(LlavaNextForConditionalGeneration, src_dir)

    def fill(family: Any) -> None:
        family.connector.load_state_dict(
            {**_projector_state(hf), "image_newline": hf.model.image_newline.detach()}, strict=True
        )

    return write_split(hf, src_dir, out_dir, workflow, wf, fill)
