"""Tests for frozenvl.tiny: tiny random HF base models built in code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
)

from frozenvl.tiny import (
    CHAT_TEMPLATES,
    LLM_ARCHS,
    SPECIAL_TOKENS,
    VISION_ARCHS,
    build_llm,
    build_tiny_bases,
    build_tokenizer,
    build_vision,
)

TEMPLATES = ("chatml", "llama3")

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is in the image?"},
    {"role": "assistant", "content": "A red circle on the left."},
    {"role": "user", "content": "How many squares are there?"},
    {"role": "assistant", "content": "There are 12 blue squares!"},
]

END_TOKEN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """Build every tokenizer, LLM arch and vision arch once."""
    root = tmp_path_factory.mktemp("tiny")
    out = {"root": root, "tok": {}, "llm": {}, "vision": {}}
    for template in TEMPLATES:
        build_tokenizer(root / f"tok-{template}", template=template)
        out["tok"][template] = str(root / f"tok-{template}")
    for arch in LLM_ARCHS:
        template = "llama3" if arch == "llama" else "chatml"
        out["llm"][arch] = build_llm(root / f"llm-{arch}", arch=arch, tokenizer_dir=out["tok"][template])
    for arch in VISION_ARCHS:
        out["vision"][arch] = build_vision(root / f"vision-{arch}", arch=arch)
    return out


# ----------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("template", TEMPLATES)
def test_tokenizer_round_trip(built, template):
    tok = AutoTokenizer.from_pretrained(built["tok"][template])
    texts = [
        "What colour is the triangle?",
        "Hello wörld! naïve café, 日本語のテキスト 🙂🚀 — ‘quotes’",
        "  leading spaces\tand\ttabs\r\nnew lines\n\n\ntrailing  ",
        "digits 1234567890 and symbols {}[]<>@#$%^&*~`|\\",
        "zzqxj unseen wordsss",
        "",
    ]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert all(0 <= i < len(tok) for i in ids)
        with_specials = tok(text)["input_ids"]
        assert tok.decode(with_specials, skip_special_tokens=True) == text
    if template == "llama3":  # like Llama-3, plain encoding prepends bos
        assert tok("hi")["input_ids"][0] == tok.bos_token_id
    else:
        assert tok("hi")["input_ids"][0] != tok.pad_token_id


@pytest.mark.parametrize("template", TEMPLATES)
def test_tokenizer_special_tokens(built, template):
    tok = AutoTokenizer.from_pretrained(built["tok"][template])
    spec = SPECIAL_TOKENS[template]
    assert len(tok) == 512
    assert tok.padding_side == "left"
    for t in spec["tokens"]:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] == tok.convert_tokens_to_ids(t)
        assert tok.decode(ids) == t
        assert tok.decode(ids, skip_special_tokens=True) == ""
    assert tok.eos_token == spec["eos"]
    assert tok.pad_token == spec["pad"]
    assert tok.bos_token == spec["bos"]
    ids = {tok.convert_tokens_to_ids(t) for t in spec["tokens"]}
    assert len(ids) == len(spec["tokens"])
    # Special tokens sit at the end of the vocabulary.
    assert ids == set(range(len(tok) - len(ids), len(tok)))
    # Special tokens are found inside text too.
    eos = spec["eos"]
    ids = tok(f"red{eos}blue", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id in ids


def _runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@pytest.mark.parametrize("template", TEMPLATES)
def test_chat_template_assistant_masks(built, template):
    tok = AutoTokenizer.from_pretrained(built["tok"][template])
    assert tok.chat_template == CHAT_TEMPLATES[template]
    out = tok.apply_chat_template(
        MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    end = END_TOKEN[template]
    expected = [m["content"] + end for m in MESSAGES if m["role"] == "assistant"]
    runs = _runs(ids, mask)
    assert [tok.decode(r) for r in runs] == expected
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(expected)
    # The end token of each assistant turn is the last masked id of its run.
    assert all(r[-1] == tok.convert_tokens_to_ids(end) for r in runs)
    # The rendered text tokenizes to exactly the same ids.
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids) == text


def test_chat_template_rendering(built):
    chatml = AutoTokenizer.from_pretrained(built["tok"]["chatml"])
    text = chatml.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is in the image?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chatml.apply_chat_template(MESSAGES[:2], tokenize=False).endswith("<|im_end|>\n")

    llama = AutoTokenizer.from_pretrained(built["tok"]["llama3"])
    text = llama.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "You are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is in the image?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # Content given as a list of parts renders its text parts.
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert chatml.apply_chat_template(parts, tokenize=False) == "<|im_start|>user\nWhat is it?<|im_end|>\n"


def test_tokenizer_custom_corpus(tmp_path):
    corpus = ["the quick brown fox jumps over the lazy dog"] * 20
    tok = build_tokenizer(tmp_path, vocab_size=300, corpus=corpus)
    assert len(tok) <= 300
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("the lazy fox")["input_ids"] == tok("the lazy fox")["input_ids"]
    assert len(reloaded("the lazy fox")["input_ids"]) < len("the lazy fox")
    with pytest.raises(ValueError, match="chatml"):
        build_tokenizer(tmp_path / "x", template="nope")


# ----------------------------------------------------------------------- LLM


def _fresh_model(model_dir, seed=0):
    config = AutoConfig.from_pretrained(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", LLM_ARCHS)
def test_llm_builds_and_reloads(built, arch):
    model_dir = built["llm"][arch]
    tok = AutoTokenizer.from_pretrained(model_dir)  # the dir is a complete model dir
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tok) == 512
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.bos_token_id == tok.bos_token_id
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 4
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    assert model.config.intermediate_size == 128
    assert model.config.rms_norm_eps == 1e-6
    if arch == "gemma2":  # the default for softcapped attention is transformers' call (sdpa on 5.5, eager on 5.24)
        assert model.config.attn_logit_softcapping == 5.0 and model.config.final_logit_softcapping is not None
    else:
        assert model.config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32

    # Every saved tensor was loaded (nothing re-initialised on load).
    saved = load_file(str(Path(model_dir) / "model.safetensors"))
    state = model.state_dict()
    assert set(saved) <= set(state)
    for k, v in saved.items():
        assert torch.equal(state[k], v), k

    attn = model.model.layers[0].self_attn
    q_proj = attn.q_proj if arch != "phi3" else attn.qkv_proj  # phi3 fuses q/k/v
    assert (q_proj.bias is not None) == (arch == "qwen2")
    assert (attn.o_proj.bias is None)

    ids = tok("What colour is the circle?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
        fresh_logits = _fresh_model(model_dir)(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, fresh_logits)


def test_llm_options(tmp_path, built):
    d = build_llm(
        tmp_path / "m",
        arch="qwen3",
        tokenizer_dir=built["tok"]["chatml"],
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=48,
        head_dim=8,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    assert d == str(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.config.head_dim == 8 and model.config.intermediate_size == 48
    assert model.model.layers[0].self_attn.q_proj.out_features == 16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)

    # Without tokenizer_dir a default ChatML tokenizer is built into the dir.
    d2 = build_llm(tmp_path / "m2", arch="mistral", num_layers=1)
    assert AutoTokenizer.from_pretrained(d2).eos_token == "<|im_end|>"
    assert AutoModelForCausalLM.from_pretrained(d2).config.sliding_window is None

    with pytest.raises(ValueError, match="qwen3"):
        build_llm(tmp_path / "bad", arch="gpt2", tokenizer_dir=built["tok"]["chatml"])


def test_llm_determinism(tmp_path, built):
    tok_dir = built["tok"]["chatml"]
    a = load_file(str(Path(build_llm(tmp_path / "a", arch="qwen2", tokenizer_dir=tok_dir, seed=7)) / "model.safetensors"))
    b = load_file(str(Path(build_llm(tmp_path / "b", arch="qwen2", tokenizer_dir=tok_dir, seed=7)) / "model.safetensors"))
    c = load_file(str(Path(build_llm(tmp_path / "c", arch="qwen2", tokenizer_dir=tok_dir, seed=8)) / "model.safetensors"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # Building does not disturb the global RNG.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_llm(tmp_path / "d", arch="llama", tokenizer_dir=tok_dir, num_layers=1)
    assert torch.equal(torch.rand(3), expected)


# -------------------------------------------------------------------- vision


def _image_processor(vdir: str):
    """The dir's image processor: through AutoImageProcessor where it loads without torchvision
    (transformers 5.24), else the PIL class the config names (5.5's AutoImageProcessor needs torchvision)."""
    try:
        return AutoImageProcessor.from_pretrained(vdir)
    except ImportError:
        name = json.loads((Path(vdir) / "preprocessor_config.json").read_text())["image_processor_type"]
        return getattr(transformers, name.removesuffix("Fast") + "Pil").from_pretrained(vdir)


@pytest.mark.parametrize("arch", VISION_ARCHS)
def test_vision_builds_and_reloads(built, arch, tmp_path):
    from PIL import Image

    vdir = built["vision"][arch]
    model = AutoModel.from_pretrained(vdir).eval()
    assert type(model).__name__ == {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "dinov2": "Dinov2Model",
                                    "dinov2_registers": "Dinov2WithRegistersModel"}[arch]
    saved = load_file(str(Path(vdir) / "model.safetensors"))
    # transformers renames some checkpoint keys on load (DINOv2's attention): save the loaded
    # model again (names mapped back) and compare the files.
    model.save_pretrained(tmp_path / "resaved")
    resaved = load_file(str(tmp_path / "resaved" / "model.safetensors"))
    assert sorted(resaved) == sorted(saved)
    for k, v in saved.items():
        assert torch.equal(resaved[k], v), k

    processor = _image_processor(vdir)
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)

    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    n_tokens = (32 // 8) ** 2 + {"clip": 1, "siglip": 0, "dinov2": 1, "dinov2_registers": 1 + 4}[arch]
    assert out.last_hidden_state.shape == (1, n_tokens, 32)
    assert len(out.hidden_states) == 2 + 1
    assert all(h.shape == (1, n_tokens, 32) for h in out.hidden_states)


def test_vision_determinism_and_errors(tmp_path):
    for arch in VISION_ARCHS:
        a = load_file(str(Path(build_vision(tmp_path / f"{arch}a", arch=arch, seed=3)) / "model.safetensors"))
        b = load_file(str(Path(build_vision(tmp_path / f"{arch}b", arch=arch, seed=3)) / "model.safetensors"))
        c = load_file(str(Path(build_vision(tmp_path / f"{arch}c", arch=arch, seed=4)) / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)
    d = build_vision(tmp_path / "big", arch="siglip", image_size=48, patch_size=16, hidden_size=16)
    model = AutoModel.from_pretrained(d)
    with torch.no_grad():
        assert model(pixel_values=torch.zeros(1, 3, 48, 48)).last_hidden_state.shape == (1, 9, 16)
    with pytest.raises(ValueError, match="siglip"):
        build_vision(tmp_path / "bad", arch="convnext")


# --------------------------------------------------------------------- both


def test_build_tiny_bases(tmp_path):
    llm_dir, vision_dir = build_tiny_bases(
        tmp_path, arch="qwen2", vision="siglip", template="chatml", num_layers=2
    )
    assert llm_dir == str(tmp_path / "llm") and vision_dir == str(tmp_path / "vision")
    tok = AutoTokenizer.from_pretrained(llm_dir)
    model = AutoModelForCausalLM.from_pretrained(llm_dir)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 2
    assert tok.eos_token == "<|im_end|>"
    assert AutoModel.from_pretrained(vision_dir).config.model_type == "siglip_vision_model"
