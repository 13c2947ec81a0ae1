"""frozenvl.importers.llava: a tiny random LLaVA checkpoint imported as a prefix workflow computes
exactly what transformers' LlavaForConditionalGeneration computes (CPU, fp32, eager attention)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import frozenvl
from frozenvl.families.base import IMAGE_TOKEN_ID
from frozenvl.importers import import_llava_hf

ATTN = "eager"
PATCHES = 16  # (32 / 8) ** 2
TEXT = "a small picture of a red cat on a mat. describe the image in a few words please"


def _json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _tokenizer(directory: str):
    """A small trained BPE tokenizer with eos/pad tokens, saved to `directory`."""
    try:
        from frozenvl.tiny import build_tokenizer
    except ImportError:  # pragma: no cover - frozenvl.tiny ships alongside; keep a fallback
        return _own_tokenizer(directory)
    return build_tokenizer(directory, template="chatml", vocab_size=300)


def _own_tokenizer(directory: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator([TEXT, "the cat sat on the mat", "what is in the picture?"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<pad>")
    tok.save_pretrained(directory)
    return tok


def _make_llava(
    src: str,
    *,
    strategy: str = "default",
    projector_bias: bool = True,
    with_tokenizer: bool = True,
    seed: int = 0,
) -> LlavaConfig:
    """Save a tiny random LLaVA checkpoint (Llama text + CLIP vision) with a non-trivial projector."""
    os.makedirs(src, exist_ok=True)
    n_text = len(_tokenizer(src)) if with_tokenizer else 300
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=n_text + 1,  # + the reserved image token
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        eos_token_id=0,
        pad_token_id=0,
    )
    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=n_text,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        image_seq_length=PATCHES + (strategy == "full"),
        multimodal_projector_bias=projector_bias,
    )
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # the default init gives zero biases and tiny weights: make the image count
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(src)
    return config


def _ids(config: LlavaConfig, n_text: int, before: int, seed: int) -> torch.Tensor:
    """Text ids with one image (image_seq_length image tokens) after `before` text tokens."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(1, config.image_token_index, (n_text,), generator=g)
    image = torch.full((config.image_seq_length,), config.image_token_index)
    return torch.cat([words[:before], image, words[before:]])


def _ours(ids: torch.Tensor, config: LlavaConfig) -> torch.Tensor:
    return ids.masked_fill(ids == config.image_token_index, IMAGE_TOKEN_ID)


def _pair(tmp_path, **kwargs):
    src, out = str(tmp_path / "llava"), str(tmp_path / "imported")
    config = _make_llava(src, **kwargs)
    assert import_llava_hf(src, out) == out
    hf = LlavaForConditionalGeneration.from_pretrained(src, attn_implementation=ATTN).eval()
    ours = frozenvl.load(out, attn_implementation=ATTN).eval()
    return config, hf, ours, out


@pytest.fixture(scope="module")
def default_pair(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("default"))


def _max_diff_single(config, hf, ours, seed=1):
    ids = _ids(config, 20, 5, seed)[None]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
        got = ours(
            input_ids=_ours(ids, config), attention_mask=torch.ones_like(ids), pixel_values=pixels, task="mm"
        ).logits
    assert ref.shape == got.shape
    return (ref - got).abs().max().item(), ids, pixels, got


def test_logits_match_default_strategy(default_pair):
    config, hf, ours, _ = default_pair
    assert ours.tokens_per_image("mm") == config.image_seq_length == PATCHES
    diff, ids, _, got = _max_diff_single(config, hf, ours)
    assert diff <= 1e-5, diff
    # the image really reaches the text positions after it
    other = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        moved = ours(input_ids=_ours(ids, config), pixel_values=other, task="mm").logits
    assert (moved[0, -1] - got[0, -1]).abs().max() > 1e-3


def test_greedy_generation_matches(default_pair):
    config, hf, ours, _ = default_pair
    ids = _ids(config, 12, 3, seed=2)[None]
    mask = torch.ones_like(ids)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels,
            do_sample=False,
            max_new_tokens=10,
            min_new_tokens=10,
        )[:, ids.shape[1] :]
    got = ours.generate(_ours(ids, config), mask, pixel_values=pixels, task="mm", max_new_tokens=10, eos_token_id=[])
    assert got.shape == (1, 10)
    assert got.tolist() == ref.tolist()


def test_left_padded_batch_matches(default_pair):
    config, hf, ours, _ = default_pair
    long, short = _ids(config, 14, 4, seed=3), _ids(config, 8, 2, seed=4)
    width = long.shape[0]
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    ids[0], mask[0] = long, 1
    pad = width - short.shape[0]
    ids[1, pad:], mask[1, pad:] = short, 1
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = ours(input_ids=_ours(ids, config), attention_mask=mask, pixel_values=pixels, task="mm").logits
        real = mask.bool()
        assert (ref[real] - got[real]).abs().max().item() <= 1e-5
        ref_gen = hf.generate(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False, max_new_tokens=6, min_new_tokens=6
        )[:, width:]
    got_gen = ours.generate(_ours(ids, config), mask, pixel_values=pixels, task="mm", max_new_tokens=6, eos_token_id=[])
    assert got_gen.tolist() == ref_gen.tolist()


def test_full_strategy_keeps_cls(tmp_path):
    config, hf, ours, out = _pair(tmp_path, strategy="full", seed=7)
    assert _json(os.path.join(out, "frozenvl.json"))["workflows"]["mm"]["keep_cls"] is True
    assert ours.tokens_per_image("mm") == config.image_seq_length == PATCHES + 1
    diff, *_ = _max_diff_single(config, hf, ours, seed=8)
    assert diff <= 1e-5, diff


def test_projector_without_bias(tmp_path):
    config, hf, ours, _ = _pair(tmp_path, projector_bias=False, seed=9)
    assert hf.model.multi_modal_projector.linear_1.bias is None
    assert ours.workflow("mm").connector.linear_1.bias.abs().max() == 0
    diff, *_ = _max_diff_single(config, hf, ours, seed=10)
    assert diff <= 1e-5, diff


def test_output_layout(default_pair):
    config, hf, ours, out = default_pair
    assert sorted(os.listdir(out)) == ["frozenvl.json", "llm", "vision", "workflow-mm.safetensors"]
    with safe_open(os.path.join(out, "workflow-mm.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert keys == [
        "connector.linear_1.bias",
        "connector.linear_1.weight",
        "connector.linear_2.bias",
        "connector.linear_2.weight",
    ]
    saved = _json(os.path.join(out, "frozenvl.json"))
    wf = saved["workflows"]["mm"]
    assert (wf["family"], wf["connector"], wf["select_layer"], wf["keep_cls"]) == ("prefix", "mlp2x_gelu", -2, False)
    assert saved["llm"] == "llm" and saved["vision"] == "vision"  # inside the dir: recorded relative to it
    assert type(ours.llm).__name__ == "LlamaForCausalLM"
    assert type(ours.vision.model).__name__ == "CLIPVisionModel"
    # the text workflow is the untouched language model
    src_tok = AutoTokenizer.from_pretrained(os.path.join(out, "..", "llava"))
    assert ours.tokenizer(TEXT)["input_ids"] == src_tok(TEXT)["input_ids"]
    ids = _ids(config, 10, 0, seed=11)[None]
    ids = ids[ids != config.image_token_index][None]
    with torch.no_grad():
        ref = hf.model.language_model(input_ids=ids).last_hidden_state
        ref = hf.lm_head(ref)
        got = ours(input_ids=ids, task="text").logits
    assert (ref - got).abs().max().item() <= 1e-5


def test_not_llava_raises(tmp_path):
    LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'llama'") as err:
        import_llava_hf(tmp_path, tmp_path / "out")
    assert str(tmp_path) in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        import_llava_hf(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ValueError, match="not a directory"):
        import_llava_hf(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_variants_raise(tmp_path):
    base = dict(
        text_config=LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
        vision_config=CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2
        ),
    )
    LlavaConfig(**base, vision_feature_layer=[-2, -1]).save_pretrained(tmp_path / "multi")
    with pytest.raises(NotImplementedError, match=r"\[-2, -1\]"):
        import_llava_hf(tmp_path / "multi", tmp_path / "out")
    LlavaConfig(**base, projector_hidden_act="relu").save_pretrained(tmp_path / "relu")
    with pytest.raises(NotImplementedError, match="relu"):
        import_llava_hf(tmp_path / "relu", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_tokenizer_warns(tmp_path):
    src, out = tmp_path / "llava", tmp_path / "imported"
    _make_llava(str(src), with_tokenizer=False)
    with pytest.warns(UserWarning, match="no tokenizer"):
        import_llava_hf(src, out)
    assert os.path.isfile(out / "frozenvl.json") and os.path.isfile(out / "workflow-mm.safetensors")
    assert not os.path.exists(out / "llm" / "tokenizer_config.json")
