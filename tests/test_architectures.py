"""The architecture x family table (docs/architectures.md): every supported cell against the bare base
model loaded separately from the same directory, every unsupported cell refused at build time, and
the cache keyword read off the installed transformers' signatures."""

from __future__ import annotations

import re
import types
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import frozenvl
from frozenvl.config import ConfigError
from frozenvl.constants import IMAGE_TOKEN_ID
from frozenvl.data.prompt import position_ids_from_mask
from frozenvl.families import FAMILIES, base
from frozenvl.families.architectures import ARCHITECTURES, BLOCK_REWRITING, cache_kwarg, check_architecture

from .conftest import ALL_ARCHS, perturb

WORKFLOWS = {
    "prefix": {"family": "prefix"},
    "inner_adaptor": {"family": "inner_adaptor", "layers": [0, 2]},
    "adaption_prompt": {"family": "adaption_prompt", "adapter_len": 4, "adapter_layers": 2, "visual": "v1"},
    "bind": {"family": "bind"},
    "cross_attention": {"family": "cross_attention", "every": 1, "resampler_depth": 1, "resampler_latents": 4,
                        "resampler_heads": 2, "resampler_head_dim": 8},
    "visual_experts": {"family": "visual_experts", "connector": "monolithic:size=56", "attention_experts": True},
    "wings": {"family": "wings"},
}
assert set(WORKFLOWS) == set(FAMILIES)


def supported(arch: str, family: str) -> bool:
    return ARCHITECTURES[arch].llama_block or family not in BLOCK_REWRITING


SUPPORTED = [(a, f) for a in ALL_ARCHS for f in WORKFLOWS if supported(a, f)]
REFUSED = [(a, f) for a in ALL_ARCHS for f in WORKFLOWS if not supported(a, f)]
TEXT_PROMPTS = ["what colour is the big circle on the left", "a red square"]  # longer than the window of 4
IMAGE_PROMPTS = ["<image>\nwhat colour is it on the left", "<image> a red square"]


def _bare(llm_dir: str) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(llm_dir).eval()


@torch.no_grad()
def _bare_greedy(bare, ids: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens of the bare model, the whole sequence recomputed each step (HF's generate would
    suppress eos under min_new_tokens, and the tiny models do pick it)."""
    for _ in range(n):
        ids = torch.cat([ids, bare(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    return ids[:, -n:]


def _image_inputs(model, images):
    inputs = model.prepare_inputs(IMAGE_PROMPTS, [[images[0]], [images[1]]], task="mm")
    inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"])
    return inputs


def _bare_logits(bare, inputs, embeds=None) -> torch.Tensor:
    kw = dict(attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"])
    return (bare(inputs_embeds=embeds, **kw) if embeds is not None else bare(input_ids=inputs["input_ids"], **kw)).logits


# --------------------------------------------------------------------------- text == the bare base
@pytest.mark.parametrize("arch,family", SUPPORTED)
def test_text_is_the_bare_base_with_the_workflow_attached(bases, arch, family):
    llm_dir, vis = bases(arch)
    model = frozenvl.build(llm_dir, vis, workflows={"mm": WORKFLOWS[family]})
    perturb(model, "mm", scale=0.3)
    bare = _bare(llm_dir)
    ids = model.tokenizer(TEXT_PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = model(ids.input_ids, ids.attention_mask, task="text").logits
        ref = bare(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
    assert torch.equal(ours, ref)
    one = model.tokenizer(TEXT_PROMPTS[0], return_tensors="pt").input_ids
    assert torch.equal(model.generate(one, task="text", max_new_tokens=8, eos_token_id=[]), _bare_greedy(bare, one, 8))


# --------------------------------------------------------------------------- each family == the bare base
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_prefix_is_the_base_on_spliced_embeddings(bases, images, arch):
    llm_dir, vis = bases(arch)
    model = frozenvl.build(llm_dir, vis, workflows={"mm": WORKFLOWS["prefix"]})
    perturb(model, "mm", scale=0.3)
    family, bare = model.workflow("mm"), _bare(llm_dir)
    inputs = _image_inputs(model, images)
    with torch.no_grad():
        ours = model(**inputs, task="mm").logits
        embeds = family.embed(inputs["input_ids"], model._image_embeds("mm", inputs["pixel_values"]))
        assert torch.equal(ours, _bare_logits(bare, inputs, embeds))
        text = model.prepare_inputs(TEXT_PROMPTS, task="mm")
        text["position_ids"] = position_ids_from_mask(text["attention_mask"])
        assert torch.equal(model(**text, task="mm").logits, _bare_logits(bare, text))


def _with_inserted_layers(bare: nn.Module, family) -> nn.Module:
    """The bare HF model with the workflow's adaptor layers inserted after their frozen layers, and its
    embedding, final norm and head copies in place: the HF model's own forward runs the workflow."""
    inner, layers, kinds = bare.model, [], []
    for i, layer in enumerate(inner.layers):
        layers.append(layer), kinds.append(family.lm.layer_types[i])
        if str(i) in family.adaptors:
            layers.append(family.adaptors[str(i)]), kinds.append(family.lm.layer_types[i])
    inner.layers = nn.ModuleList(layers)
    bare.config.num_hidden_layers = len(layers)
    if getattr(bare.config, "layer_types", None) is not None:
        bare.config.layer_types = kinds
    inner.embed_tokens, inner.norm, bare.lm_head = family.embed_copy, family.norm_copy, family.head_copy
    return bare


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_inner_adaptor_is_the_base_with_its_layers_inserted(bases, images, arch):
    llm_dir, vis = bases(arch)
    model = frozenvl.build(llm_dir, vis, workflows={"mm": WORKFLOWS["inner_adaptor"]})
    perturb(model, "mm", scale=0.3)
    family = model.workflow("mm")
    reference = _with_inserted_layers(_bare(llm_dir), family)
    inputs = _image_inputs(model, images)
    with torch.no_grad():
        ours = model(**inputs, task="mm").logits
        embeds = family.embed(inputs["input_ids"], model._image_embeds("mm", inputs["pixel_values"]))
        assert torch.equal(ours, _bare_logits(reference, inputs, embeds))
        assert not torch.equal(ours, _bare_logits(_bare(llm_dir), inputs, embeds))  # the layers act


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_cross_attention_with_zero_gates_is_the_base(bases, images, arch):
    llm_dir, vis = bases(arch)
    model = frozenvl.build(llm_dir, vis, workflows={"mm": WORKFLOWS["cross_attention"]})
    perturb(model, "mm", scale=0.3)
    family, bare = model.workflow("mm"), _bare(llm_dir)
    inputs = _image_inputs(model, images)
    vocab = bare.config.vocab_size
    with torch.no_grad():
        ref = _bare_logits(bare, inputs, family.embed(inputs["input_ids"], None))  # <image>: its own embedding
        assert not torch.equal(model(**inputs, task="mm").logits[..., :vocab], ref)
        for block in family.blocks.values():
            block.attn_gate.zero_(), block.ff_gate.zero_()
        assert torch.equal(model(**inputs, task="mm").logits[..., :vocab], ref)


@pytest.mark.parametrize("arch,family", [(a, f) for a, f in SUPPORTED if f in ("adaption_prompt", "bind")])
def test_block_rewriting_families_at_init_are_the_base(bases, images, arch, family):
    llm_dir, vis = bases(arch)
    model = frozenvl.build(llm_dir, vis, workflows={"mm": WORKFLOWS[family]})
    bare = _bare(llm_dir)
    inputs = _image_inputs(model, images)  # adaption_prompt, bind: images stay out of the sequence

    def reference():  # wings: images in the sequence as in prefix, so the base on the spliced embeddings
        if not (inputs["input_ids"] == IMAGE_TOKEN_ID).any():
            return _bare_logits(bare, inputs)
        embeds = model.workflow("mm").embed(inputs["input_ids"], model._image_embeds("mm", inputs["pixel_values"]))
        return _bare_logits(bare, inputs, embeds)

    with torch.no_grad():
        ours, ref = model(**inputs, task="mm").logits, reference()
        # wings' image-mass value channel rides in the attention kernel: equal up to its rounding
        assert torch.equal(ours, ref) if family != "wings" else (ours - ref).abs().max() <= 1e-6
        perturb(model, "mm", scale=0.3)
        assert not torch.allclose(model(**inputs, task="mm").logits, reference(), atol=1e-4)


@pytest.mark.parametrize("arch", [a for a in ALL_ARCHS if supported(a, "visual_experts")])
def test_visual_experts_copied_from_the_text_ffn_are_the_base_on_spliced_embeddings(bases, images, arch):
    """Experts (FFN and attention) copied from the frozen ones: routing changes nothing until they train."""
    llm_dir, vis = bases(arch)
    model = frozenvl.build(llm_dir, vis, workflows={"mm": WORKFLOWS["visual_experts"]})
    perturb(model, "mm", scale=0.3, parts=["connector", "tokens"])
    family, bare = model.workflow("mm"), _bare(llm_dir)
    inputs = _image_inputs(model, images)
    with torch.no_grad():
        embeds = family.embed(inputs["input_ids"], model._image_embeds("mm", inputs["pixel_values"]))
        ref = _bare_logits(bare, inputs, embeds)
        assert torch.equal(model(**inputs, task="mm").logits, ref)
        perturb(model, "mm", scale=0.3, parts=["experts", "attention_experts"])
        assert (model(**inputs, task="mm").logits - ref).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_written_out_decoder_block_is_the_layer_exactly_where_supported(bases, arch):
    """base.decoder_block (what adaption_prompt and bind run) == the HF layer on Llama-block archs;
    elsewhere it is not, which is why those cells are refused."""
    llm_dir, vis = bases(arch)
    outs = []
    for attn in ("sdpa", "eager") if arch != "gemma2" else ("eager",):
        model = frozenvl.build(llm_dir, vis, workflows={"mm": WORKFLOWS["prefix"]}, attn_implementation=attn)
        fam = model.workflow("mm")
        inputs = model.prepare_inputs(TEXT_PROMPTS, task="text")
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        with torch.no_grad():
            h0 = fam.embed(ids, None)
            outs = []
            for written_out in (False, True):
                ctx = base.DecodeContext(attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                         cache=fam.new_cache())
                if written_out:
                    fam.layers_replaced = frozenset(range(fam.lm.num_layers))
                    fam.run_layer = lambda i, h, c: base.decoder_block(fam.lm.layers[i], h, c, fam.lm.layer_types[i])
                try:
                    outs.append(fam.decode(h0.clone(), ctx))
                except AttributeError:  # e.g. phi3's fused qkv_proj: no q_proj to call
                    outs.append(None)
        if ARCHITECTURES[arch].llama_block:
            assert torch.equal(outs[0], outs[1]), attn
        else:
            assert outs[1] is None or not torch.allclose(outs[0], outs[1], atol=1e-3), attn


# --------------------------------------------------------------------------- refused cells
@pytest.mark.parametrize("arch,family", REFUSED)
def test_unsupported_cells_are_refused_at_build_time(bases, arch, family):
    llm_dir, vis = bases(arch)
    with pytest.raises(ConfigError, match=rf"family '{family}' rewrites the Llama decoder block .* on '{arch}'"):
        frozenvl.build(llm_dir, vis, workflows={"mm": WORKFLOWS[family]})
    model = frozenvl.build(llm_dir, vis, workflows={"ok": WORKFLOWS["prefix"]})
    with pytest.raises(ConfigError, match=re.escape(ARCHITECTURES[arch].why_not)):
        model.add_workflow("mm", WORKFLOWS[family])
    assert model.tasks == ["text", "ok"]


def test_unlisted_architectures_are_refused():
    for model_type in ("cohere", None):
        with pytest.raises(ConfigError, match=rf"base architecture {model_type!r} is not supported.*'llama'"):
            check_architecture(types.SimpleNamespace(model_type=model_type), "prefix", False)
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        check_architecture(types.SimpleNamespace(model_type="gemma3_text", use_bidirectional_attention=True),
                           "prefix", False)


# --------------------------------------------------------------------------- the cache keyword
class _Recorder(nn.Module):
    """A decoder layer stand-in that records the keywords it gets (and, like HF layers, takes **kwargs)."""

    seen: dict

    def __init__(self):
        super().__init__()
        self.seen = {}


class _OldLayer(_Recorder):  # transformers < 5.24
    def forward(self, h, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        self.seen = dict(past_key_values=past_key_values, **kwargs)
        return h


class _NewLayer(_Recorder):  # transformers >= 5.24 (after 5.40 without the deprecation shim)
    def forward(self, h, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        self.seen = dict(cache=cache, **kwargs)
        return h


class _ShimmedLayer(_Recorder):  # transformers 5.24-5.39: the old name accepted with a FutureWarning
    from transformers.utils.deprecation import deprecate_kwarg

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, h, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        self.seen = dict(cache=cache, **kwargs)
        return h


class _OpaqueLayer(_Recorder):
    def forward(self, h, **kwargs):
        return h


@pytest.mark.parametrize("layer_cls,name", [(_OldLayer, "past_key_values"), (_NewLayer, "cache"),
                                            (_ShimmedLayer, "cache")])
def test_the_cache_goes_under_the_name_the_layer_takes(layer_cls, name):
    layer, cache = layer_cls(), object()
    ctx = base.DecodeContext(attention_mask=torch.ones(1, 2), position_ids=torch.arange(2)[None], cache=cache,
                             masks={"full_attention": None}, position_embeddings={"full_attention": None})
    assert cache_kwarg(type(layer).forward) == name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shimmed layer warns if it gets the old name
        base.call_layer(layer, torch.zeros(1, 2, 4), ctx, "full_attention")
    assert layer.seen == {name: cache}  # nothing swallowed by **kwargs under another name


def test_a_layer_without_a_cache_parameter_is_an_error():
    with pytest.raises(TypeError, match="takes none of \\['cache', 'past_key_values'\\]"):
        cache_kwarg(_OpaqueLayer.forward)


def test_masks_get_the_cache_under_their_own_name(bases, images, monkeypatch):
    """Simulate mask functions taking the cache under the other name than the installed transformers
    (past_key_values on 5.24, cache on older): cached generation stays right, and the mask got the cache."""
    from transformers import masking_utils

    llm_dir, vis = bases("llama")
    model = frozenvl.build(llm_dir, vis, workflows={"mm": WORKFLOWS["prefix"]})
    perturb(model, "mm", scale=0.2)
    expected = model.generate(prompt="<image> what is this", images=[images[0]], task="mm", max_new_tokens=6,
                              eos_token_id=[], use_cache=False)
    got = []
    real = masking_utils.create_causal_mask
    real_name = cache_kwarg(real)

    # a mask function taking the cache under the name the installed transformers does not use
    if real_name == "cache":
        def other_mask(config, inputs_embeds, attention_mask, past_key_values, position_ids=None):
            got.append(past_key_values)
            return real(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        position_ids=position_ids, cache=past_key_values)
    else:
        def other_mask(config, inputs_embeds, attention_mask, cache, position_ids=None):
            got.append(cache)
            return real(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        position_ids=position_ids, past_key_values=cache)

    monkeypatch.setattr(base, "create_causal_mask", other_mask)
    cached = model.generate(prompt="<image> what is this", images=[images[0]], task="mm", max_new_tokens=6,
                            eos_token_id=[])
    assert torch.equal(cached, expected)
    assert got and all(c is not None for c in got)
