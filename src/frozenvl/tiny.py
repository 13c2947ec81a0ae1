"""Tiny random Hugging Face base models, built entirely in code.

Tests, the README example and benchmarks need a language model, a vision
tower and a tokenizer that load through exactly the path users take with hub
ids (``from_pretrained(dir)``), without any network access.  This module
builds them from scratch in a few seconds on a CPU:

* :func:`build_tokenizer` trains a small byte-level BPE tokenizer with the
  ``tokenizers`` library and gives it a ChatML (Qwen2 style) or Llama-3 style
  chat template whose assistant turns are wrapped in
  ``{% generation %}...{% endgeneration %}`` so that
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` works.
* :func:`build_llm` builds a randomly initialised causal LM (any of
  ``LLM_ARCHS``: Llama, Qwen2/3, Mistral, Gemma, Gemma2, Gemma3 text, Phi3,
  OLMo2) sized to the tokenizer.
* :func:`build_vision` builds a randomly initialised CLIP, SigLIP, DINOv2 or
  DINOv2-with-registers vision tower plus a ``preprocessor_config.json`` like
  the real checkpoints'.
* :func:`build_tiny_bases` does all of the above into ``root/"llm"`` and
  ``root/"vision"``.

Everything is deterministic given ``seed`` and nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_TEMPLATES",
    "LLM_ARCHS",
    "SPECIAL_TOKENS",
    "VISION_ARCHS",
    "build_llm",
    "build_tiny_bases",
    "build_tokenizer",
    "build_vision",
    "default_corpus",
]

PathLike = str | os.PathLike

# --------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------

# Message content may be a plain string or a list of content parts
# (``{"type": "text", "text": ...}``); only text parts are rendered, anything
# else (images, ...) is the caller's business.
_CONTENT_MACRO = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is none -%}"
    "{%- else -%}"
    "{%- for part in content -%}"
    "{%- if part is string -%}{{- part -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

# Qwen2 style ChatML.  Unlike Qwen2.5 no default system prompt is injected.
_CHATML_TEMPLATE = _CONTENT_MACRO + (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{{- render_content(message['content']) + '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + render_content(message['content']) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Llama-3 style: bos first, header tokens around the role, content trimmed.
_LLAMA3_TEMPLATE = _CONTENT_MACRO + (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{{- render_content(message['content']) | trim + '<|eot_id|>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- render_content(message['content']) | trim + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML_TEMPLATE,
    "llama3": _LLAMA3_TEMPLATE,
}

# Per template: ordered special tokens and which of them play bos/eos/pad.
SPECIAL_TOKENS: dict[str, dict[str, Any]] = {
    "chatml": {
        "tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
    },
    "llama3": {
        "tokens": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|end_of_text|>",
    },
}

# Pre-tokenization split patterns (GPT-4 style): Qwen2 splits digits one by
# one, Llama-3 in groups of up to three.
_PRETOKENIZE_REGEX: dict[str, str] = {
    "chatml": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "llama3": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}

# --------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------

_COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey"]
_SHAPES = ["circle", "square", "triangle", "rectangle", "star", "line", "dot", "box", "cross", "ring"]
_SIZES = ["small", "large", "big", "tiny", "huge", "medium"]
_PLACES = ["left", "right", "top", "bottom", "center", "middle", "corner", "edge"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_OBJECTS = ["cat", "dog", "car", "tree", "house", "person", "bird", "cup", "ball", "book", "sky", "sun"]


def default_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """A small deterministic English corpus about images, shapes and colours."""
    rng = random.Random(seed)
    patterns = [
        "What is in the image?",
        "What colour is the {shape}?",
        "The {shape} is {colour}.",
        "There is a {size} {colour} {shape} on the {place}.",
        "How many {shape}s are there in the picture?",
        "There are {number} {shape}s in the image.",
        "I see {number} {colour} {obj}s.",
        "Describe the image in one sentence.",
        "The image shows a {colour} {obj} near a {size} {shape}.",
        "Is the {obj} {colour}? Yes, it is {colour}.",
        "Is there a {shape} at the {place}? No, there is not.",
        "A {size} {obj} is at the {place} of the picture.",
        "Count the {colour} {shape}s: {digit}.",
        "The answer is {number}.",
        "What shape is at the {place}? It is a {shape}.",
        "Where is the {colour} {shape}? It is on the {place}.",
        "This photo has {digit} objects, and {number} of them are {colour}.",
        "Please answer the question about the picture.",
        "You are a helpful assistant that can see images.",
        "The {obj} and the {shape} are both {colour}!",
    ]
    out = [p for p in patterns if "{" not in p]
    while len(out) < n:
        pattern = rng.choice(patterns)
        out.append(
            pattern.format(
                shape=rng.choice(_SHAPES),
                colour=rng.choice(_COLOURS),
                size=rng.choice(_SIZES),
                place=rng.choice(_PLACES),
                number=rng.choice(_NUMBERS),
                obj=rng.choice(_OBJECTS),
                digit=rng.randint(0, 99),
            )
        )
    return out[:n]


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def build_tokenizer(
    out_dir: PathLike,
    *,
    template: str = "chatml",
    vocab_size: int = 512,
    corpus: Iterable[str] | None = None,
):
    """Train a byte-level BPE tokenizer in code and save it to ``out_dir``.

    ``vocab_size`` counts the special tokens too; ``len(tok) == vocab_size``
    unless the corpus is too small to learn that many merges.  Returns the
    ``PreTrainedTokenizerFast`` (it was also ``save_pretrained`` to
    ``out_dir``).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; valid: {sorted(CHAT_TEMPLATES)}")
    spec = SPECIAL_TOKENS[template]
    specials: list[str] = spec["tokens"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(specials)}, got {vocab_size}")

    tk = Tokenizer(models.BPE())
    # Same pipeline as the real Qwen2 / Llama-3 tokenizer.json files.  This
    # matters: AutoTokenizer loads a dir whose config.json says "qwen2" with
    # the dedicated Qwen2Tokenizer class, which rebuilds the pipeline from the
    # vocab and merges, so the chatml tokenizer must already be exactly that.
    if template == "chatml":
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX[template]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    byte_level = processors.ByteLevel(trim_offsets=False)
    tk.post_processor = byte_level

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        min_frequency=1,
        show_progress=False,
        initial_alphabet=alphabet,
        special_tokens=[],
    )
    texts = list(corpus) if corpus is not None else default_corpus()
    tk.train_from_iterator(texts, trainer=trainer)
    # Special tokens go at the end of the vocabulary, like real checkpoints.
    tk.add_special_tokens(specials)

    if spec["bos"] is not None:
        # Like the real Llama-3 tokenizer, plain encoding prepends bos
        # (apply_chat_template tokenizes with add_special_tokens=False).
        bos = spec["bos"]
        tk.post_processor = processors.Sequence(
            [
                byte_level,
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0",
                    pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, tk.token_to_id(bos))],
                ),
            ]
        )

    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        padding_side="left",
        chat_template=CHAT_TEMPLATES[template],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok


# --------------------------------------------------------------------------
# Language models
# --------------------------------------------------------------------------

def _llama(common: dict[str, Any], hd: int, custom_head_dim: bool):
    from transformers import LlamaConfig

    return LlamaConfig(**common, head_dim=hd, attention_bias=False, mlp_bias=False)


def _qwen2(common: dict[str, Any], hd: int, custom_head_dim: bool):
    from transformers import Qwen2Config

    # Qwen2 always has q/k/v biases (hard-wired in Qwen2Attention).
    cfg = Qwen2Config(**common, use_sliding_window=False, sliding_window=None)
    if custom_head_dim:
        cfg.head_dim = hd
    return cfg


def _qwen3(common: dict[str, Any], hd: int, custom_head_dim: bool):
    from transformers import Qwen3Config

    return Qwen3Config(**common, head_dim=hd, attention_bias=False, use_sliding_window=False, sliding_window=None)


def _mistral(common: dict[str, Any], hd: int, custom_head_dim: bool):
    from transformers import MistralConfig

    return MistralConfig(**common, head_dim=hd, sliding_window=None)


def _gemma(common: dict[str, Any], hd: int, custom_head_dim: bool):
    from transformers import GemmaConfig

    return GemmaConfig(**common, head_dim=hd)


# Gemma2/3 at tiny scale: a short sliding window and a low final softcap, so that both matter (at the
# real 4096 / 30.0 a 10-token prompt never leaves the window and the cap changes logits by ~1e-4).
_TINY_WINDOW, _TINY_SOFTCAP = 4, 1.0


def _alternating(n: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


def _gemma2(common: dict[str, Any], hd: int, custom_head_dim: bool):
    from transformers import Gemma2Config

    return Gemma2Config(
        **common, head_dim=hd, query_pre_attn_scalar=hd, sliding_window=_TINY_WINDOW,
        layer_types=_alternating(common["num_hidden_layers"]), final_logit_softcapping=_TINY_SOFTCAP,
        attn_logit_softcapping=5.0,
    )


def _gemma3_text(common: dict[str, Any], hd: int, custom_head_dim: bool):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **common, head_dim=hd, query_pre_attn_scalar=hd, sliding_window=_TINY_WINDOW,
        layer_types=_alternating(common["num_hidden_layers"]), final_logit_softcapping=_TINY_SOFTCAP,
    )


def _phi3(common: dict[str, Any], hd: int, custom_head_dim: bool):
    from transformers import Phi3Config

    return Phi3Config(**common, sliding_window=None)


def _olmo2(common: dict[str, Any], hd: int, custom_head_dim: bool):
    from transformers import Olmo2Config

    return Olmo2Config(**common)


# One config builder per `arch` (= the HF model_type); eager attention where HF has no sdpa path.
_LLM_CONFIGS = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral, "gemma": _gemma,
    "gemma2": _gemma2, "gemma3_text": _gemma3_text, "phi3": _phi3, "olmo2": _olmo2,
}
_EAGER_ONLY = {"gemma2"}  # softcapped attention logits: transformers has no sdpa path for them
LLM_ARCHS: tuple[str, ...] = tuple(_LLM_CONFIGS)


def _llm_config(arch: str, common: dict[str, Any], head_dim: int | None):
    if arch not in _LLM_CONFIGS:
        raise ValueError(f"unknown LLM arch {arch!r}; valid: {list(LLM_ARCHS)}")
    hd = head_dim if head_dim is not None else common["hidden_size"] // common["num_attention_heads"]
    return _LLM_CONFIGS[arch](common, hd, head_dim is not None)


def build_llm(
    out_dir: PathLike,
    *,
    arch: str = "llama",
    tokenizer_dir: PathLike | None = None,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    head_dim: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    initializer_range: float = 0.02,
) -> str:
    """Build a tiny randomly initialised causal LM and save it to ``out_dir``.

    The tokenizer from ``tokenizer_dir`` (or, if None, a fresh default
    ChatML tokenizer) is saved into ``out_dir`` too, so ``out_dir`` is a
    complete model directory for ``AutoModelForCausalLM`` and
    ``AutoTokenizer``.  A larger ``initializer_range`` than HF's 0.02 gives
    sharper attention (positions matter more, greedy output repeats less).
    Returns ``str(out_dir)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if arch not in LLM_ARCHS:
        raise ValueError(f"unknown LLM arch {arch!r}; valid: {list(LLM_ARCHS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if tokenizer_dir is None:
        tok = build_tokenizer(out_dir)
    else:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if Path(tokenizer_dir).resolve() != out_dir.resolve():
            tok.save_pretrained(out_dir)

    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size if intermediate_size is not None else 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=initializer_range,
    )
    config = _llm_config(arch, common, head_dim)
    if arch in _EAGER_ONLY:
        attn_implementation = "eager"
    config._attn_implementation = attn_implementation

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    model.eval()
    model.save_pretrained(out_dir)
    return str(out_dir)


# --------------------------------------------------------------------------
# Vision towers
# --------------------------------------------------------------------------

VISION_ARCHS: tuple[str, ...] = ("clip", "siglip", "dinov2", "dinov2_registers")


def _preprocessor_config(arch: str, image_size: int) -> dict[str, Any]:
    """preprocessor_config.json as the real checkpoints of `arch` ship it, at `image_size`."""
    common = {"do_normalize": True, "do_rescale": True, "do_resize": True, "resample": 3, "rescale_factor": 1 / 255}
    crop = {"crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True, "do_convert_rgb": True}
    if arch.startswith("dinov2"):
        # BitImageProcessor, as facebook/dinov2-*: resize the shortest edge to 8/7 of the crop
        # (256 for 224), then centre-crop; ImageNet mean/std.
        return {**common, **crop, "image_processor_type": "BitImageProcessor", "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225], "size": {"shortest_edge": image_size * 8 // 7}}
    if arch == "clip":
        return {**common, **crop, "image_processor_type": "CLIPImageProcessor",
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "size": {"shortest_edge": image_size}}
    return {**common, "image_processor_type": "SiglipImageProcessor", "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "size": {"height": image_size, "width": image_size}}


def build_vision(
    out_dir: PathLike,
    *,
    arch: str = "clip",
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
    num_register_tokens: int = 4,
) -> str:
    """Build a tiny randomly initialised vision tower (one of ``VISION_ARCHS``) in ``out_dir``.

    Also writes a ``preprocessor_config.json`` shaped like the real
    checkpoints'.  ``image_size`` is what the preprocessing produces; the DINOv2
    configs, like facebook/dinov2-* (518 vs 224), hold a position grid twice as
    large, so their position embeddings are interpolated.  ``num_register_tokens``
    is for ``dinov2_registers`` only.  Returns ``str(out_dir)``.
    """
    import torch

    if arch not in VISION_ARCHS:
        raise ValueError(f"unknown vision arch {arch!r}; valid: {list(VISION_ARCHS)}")
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_channels=3,
        image_size=image_size,
        patch_size=patch_size,
    )
    if arch == "clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config, cls = CLIPVisionConfig(**common), CLIPVisionModel
    elif arch == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        common.update(image_size=2 * image_size, mlp_ratio=2, layerscale_value=1.0)
        del common["intermediate_size"]
        config, cls = Dinov2Config(**common), Dinov2Model
    elif arch == "dinov2_registers":
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        common.update(image_size=2 * image_size, mlp_ratio=2, layerscale_value=1.0,
                      num_register_tokens=num_register_tokens)
        del common["intermediate_size"]
        config, cls = Dinov2WithRegistersConfig(**common), Dinov2WithRegistersModel
    else:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        config, cls = SiglipVisionConfig(**common), SiglipVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    with open(out_dir / "preprocessor_config.json", "w", encoding="utf-8") as f:
        json.dump(_preprocessor_config(arch, image_size), f, indent=2, sort_keys=True)
        f.write("\n")
    return str(out_dir)


# --------------------------------------------------------------------------
# Both
# --------------------------------------------------------------------------


def build_tiny_bases(
    root: PathLike,
    *,
    arch: str = "llama",
    vision: str = "clip",
    template: str = "chatml",
    vision_kwargs: dict[str, Any] | None = None,
    **llm_kwargs: Any,
) -> tuple[str, str]:
    """Build tokenizer + LLM into ``root/"llm"`` and a vision tower into ``root/"vision"``.

    ``llm_kwargs`` go to :func:`build_llm`, ``vision_kwargs`` to
    :func:`build_vision`.  Returns ``(llm_dir, vision_dir)``.
    """
    root = Path(root)
    llm_dir = root / "llm"
    build_tokenizer(llm_dir, template=template)
    build_llm(llm_dir, arch=arch, tokenizer_dir=llm_dir, **llm_kwargs)
    vision_dir = build_vision(root / "vision", arch=vision, **(vision_kwargs or {}))
    return str(llm_dir), vision_dir


def build_tiny_idefics(
    out_dir: PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    cross_layer_interval: int = 2,
    alpha_type: str = "float",
    qk_layer_norms: bool = True,
    use_resampler: bool = True,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    latents: int = 8,
    resampler_depth: int = 2,
    gate_std: float = 0.5,
    initializer_range: float = 0.1,
    seed: int = 0,
) -> str:
    """A tiny random transformers ``IdeficsForVisionText2Text`` (with its tokenizer) saved in ``out_dir``.

    The tokenizer is trained as in :func:`build_tokenizer` (512 tokens) and gets IDEFICS' additional
    vocabulary ``<fake_token_around_image>``, ``<image>`` at ids 512, 513. The gates of the gated
    cross-attention blocks are drawn from N(0, ``gate_std``) (transformers initialises them to 0,
    which would hide the blocks). Returns ``str(out_dir)``.
    """
    import torch
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir)
    vocab = len(tok)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<fake_token_around_image>", "<image>"]}, replace_extra_special_tokens=False
    )
    tok.save_pretrained(out_dir)
    config = IdeficsConfig(
        vocab_size=vocab,
        additional_vocab_size=2,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        cross_layer_interval=cross_layer_interval,
        alpha_type=alpha_type,
        qk_layer_norms=qk_layer_norms,
        use_resampler=use_resampler,
        max_position_embeddings=512,
        initializer_range=initializer_range,  # above the default 0.02, so that images visibly matter
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        vision_config=dict(
            embed_dim=vision_hidden, image_size=image_size, patch_size=patch_size, intermediate_size=2 * vision_hidden,
            num_hidden_layers=vision_layers, num_attention_heads=2,
        ),
        perceiver_config=dict(
            use_resampler=use_resampler, resampler_n_latents=latents, resampler_depth=resampler_depth,
            resampler_n_heads=2, resampler_head_dim=16, qk_layer_norms_perceiver=qk_layer_norms,
        ),
    )
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha_" in name:
                p.normal_(0.0, gate_std)
            elif p.dim() == 1 and ("norm" in name or "layernorm" in name):
                p.normal_(1.0, 0.1)  # non-trivial norm weights, so a wrong mapping shows
    model.save_pretrained(out_dir)
    return str(out_dir)
