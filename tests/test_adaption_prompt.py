"""adaption_prompt (LLaMA-Adapter): identity at init, PEFT parity, a plain reference for what PEFT
cannot run, cached decoding, frozen base, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import frozenvl
from frozenvl.config import ConfigError
from frozenvl.data.prompt import position_ids_from_mask
from frozenvl.families.adaption_prompt import visual_prompt_per_row
from frozenvl.importers.peft_adaption_prompt import import_peft_adaption_prompt
from frozenvl.tiny import build_llm

from .conftest import (
    assert_gradients_only_in_workflow,
    batch_inputs,
    perturb,
)

V1 = {"family": "adaption_prompt", "adapter_len": 4, "adapter_layers": 2, "visual": "v1"}
V2 = {
    "family": "adaption_prompt", "adapter_len": 3, "adapter_layers": 3, "visual": "v2", "v2_queries": 3,
    "v2_blocks": 1, "gate": "per_head_tanh", "bias_tuning": True,
}
CONFIGS = {"v1": V1, "v2": V2}


# --------------------------------------------------------------------------- identity at init
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_init_is_the_base_bit_for_bit(bases, images, arch, kind):
    llm, vis = bases(arch)
    model = frozenvl.build(llm, vis, workflows={"mm": CONFIGS[kind]})
    prompts = ["<image>\nwhat colour is it", "<image> a red square"]
    with_images = batch_inputs(model, "mm", prompts, [[images[0]], [images[1]]])
    assert model.tokens_per_image("mm") == 0 and with_images["pixel_values"].shape[0] == 2
    text_only = batch_inputs(model, "mm", ["what colour is it", "a red square left of"], None)
    with torch.no_grad():
        for inputs in (with_images, text_only):
            ours = model(**inputs, task="mm").logits
            text = {k: v for k, v in inputs.items() if k != "pixel_values"}
            assert torch.equal(ours, model(**text, task="text").logits)
        # and the gates are what keeps it so: opening them changes the output
        perturb(model, "mm", scale=0.3)
        assert not torch.equal(model(**with_images, task="mm").logits, model(**{
            k: v for k, v in with_images.items() if k != "pixel_values"}, task="text").logits)


# --------------------------------------------------------------------------- PEFT parity
@pytest.fixture(scope="module")
def peft_llms(bases, tmp_path_factory):
    """(arch, kv_heads) -> llm dir: 4 heads with 4 (MHA) or 2 (GQA) key/value heads."""
    built = {}

    def get(arch, kv):
        if (arch, kv) not in built:
            if kv == 2:  # the shared tiny bases have 4 heads / 2 kv heads
                built[arch, kv] = bases(arch)[0]
            else:
                out = tmp_path_factory.mktemp(f"peft-{arch}-{kv}")
                built[arch, kv] = build_llm(out, arch=arch, num_kv_heads=kv, tokenizer_dir=bases(arch)[0])
        return built[arch, kv]

    return get


def _peft_adapter(llm_dir, out_dir, impl, gate_zero, seed=0, dtype=torch.float32):
    from peft import AdaptionPromptConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(llm_dir, attn_implementation=impl, dtype=dtype).eval()
    peft_model = get_peft_model(base, AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("adaption_prompt"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("adaption_gate"):
                p.copy_(torch.zeros(1) if gate_zero else torch.randn(1, generator=g))
    peft_model.save_pretrained(out_dir)
    return peft_model


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("kv", [4, 2], ids=["mha", "gqa"])
def test_peft_parity(peft_llms, tmp_path, arch, kv):
    llm_dir = peft_llms(arch, kv)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    pos = position_ids_from_mask(mask)
    for gate_zero in (True, False):
        adapter_dir = tmp_path / f"adapter-{gate_zero}"
        out = tmp_path / f"fvl-{gate_zero}"
        _peft_adapter(llm_dir, adapter_dir, "eager", gate_zero)
        import_peft_adaption_prompt(adapter_dir, llm_dir, out)
        for impl in ("eager", "sdpa"):
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(llm_dir, attn_implementation=impl).eval()
            peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
            ours = frozenvl.load(out, attn_implementation=impl)
            assert ours.vision is None  # visual: none needs no vision encoder
            with torch.no_grad():
                ref = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                got = ours(ids, mask, task="mm", position_ids=pos).logits
                base_logits = ours(ids, mask, task="text", position_ids=pos).logits
            diff = (ref - got).abs().max().item()
            assert diff <= 1e-6, f"{arch} kv={kv} {impl} gate_zero={gate_zero}: max |diff| {diff}"
            assert torch.equal(got, base_logits) == gate_zero


def test_peft_parity_bfloat16(peft_llms, tmp_path):
    llm_dir = peft_llms("llama", 2)
    peft_model = _peft_adapter(llm_dir, tmp_path / "adapter", "sdpa", gate_zero=False, dtype=torch.bfloat16)
    import_peft_adaption_prompt(tmp_path / "adapter", llm_dir, tmp_path / "fvl")
    ours = frozenvl.load(tmp_path / "fvl", dtype="bfloat16", attn_implementation="sdpa")
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        got = ours(ids, task="mm", position_ids=torch.arange(7)[None]).logits
    assert got.dtype == torch.bfloat16 and torch.equal(ref, got)


def test_peft_import_with_vision_keeps_peft_outputs(bases, images, tmp_path):
    llm_dir, vis_dir = bases("llama")
    peft_model = _peft_adapter(llm_dir, tmp_path / "adapter", "sdpa", gate_zero=False)
    import_peft_adaption_prompt(tmp_path / "adapter", llm_dir, tmp_path / "fvl", workflow="ap", vision=vis_dir)
    ours = frozenvl.load(tmp_path / "fvl")
    assert ours.workflow("ap").cfg.visual == "v1" and "connector" in ours.workflow("ap").parts()
    inputs = batch_inputs(ours, "ap", "<image>\nwhat colour is it", [images[0]])
    with torch.no_grad():
        ref = peft_model(input_ids=inputs["input_ids"]).logits
        got = ours(**inputs, task="ap").logits
    assert (ref - got).abs().max().item() <= 1e-6


def test_peft_import_checks_the_base(peft_llms, bases, tmp_path):
    _peft_adapter(peft_llms("llama", 2), tmp_path / "adapter", "sdpa", gate_zero=False)
    other = build_llm(tmp_path / "deep", num_layers=5, tokenizer_dir=bases("llama")[0])
    with pytest.raises(ValueError, match="wrong base LLM"):
        import_peft_adaption_prompt(tmp_path / "adapter", other, tmp_path / "out")


# --------------------------------------------------------------------------- plain reference
def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _reference_logits(llm, family, ids, pos, gate_mode):
    """The base HF model with a forward hook on each adapted attention adding the adapter term,
    written independently (einsum, head indexing) of the family's code."""
    cfg = llm.config
    heads = cfg.num_attention_heads

    def hook(module, args, kwargs, output, idx):
        x = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        bsz, t, _ = x.shape
        d = module.head_dim
        q = module.q_proj(x).view(bsz, t, heads, d)
        q = q * cos[:, :, None] + _rotate_half(q) * sin[:, :, None]
        prompt = family.prompt[str(idx)]
        k = module.k_proj(prompt).view(prompt.shape[0], -1, d)
        v = module.v_proj(prompt).view(prompt.shape[0], -1, d)
        group = torch.arange(heads) // (heads // k.shape[1])
        k, v = k[:, group], v[:, group]  # [L, heads, d]
        p = torch.softmax(torch.einsum("bthd,lhd->bhtl", q, k) / math.sqrt(d), dim=-1)
        gate = family.gate[str(idx)]
        gate = torch.tanh(gate) if gate_mode == "per_head_tanh" else gate
        a = torch.einsum("bhtl,lhd->bthd", p, v) * gate.view(1, 1, -1, 1)
        return (output[0] + torch.nn.functional.linear(a.reshape(bsz, t, -1), module.o_proj.weight), *output[1:])

    handles = [
        llm.model.layers[i].self_attn.register_forward_hook(
            lambda m, a, k, o, i=i: hook(m, a, k, o, i), with_kwargs=True
        )
        for i in family.adapted
    ]
    try:
        return llm(input_ids=ids, position_ids=pos).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("gate", ["scalar", "per_head", "per_head_tanh"])
def test_heads_times_head_dim_not_hidden_and_gqa_match_a_reference(bases, tmp_path, gate):
    # hidden 64, 4 heads of 8 (q_proj gives 32 != 64), 2 kv heads: PEFT cannot run this model.
    llm_dir = build_llm(tmp_path / "llm", head_dim=8, num_kv_heads=2, tokenizer_dir=bases("llama")[0])
    model = frozenvl.build(llm_dir, workflows={"mm": {"family": "adaption_prompt", "adapter_len": 5,
                                                        "adapter_layers": 3, "gate": gate, "visual": "none"}})
    assert model.llm.model.layers[0].self_attn.q_proj.out_features != model.llm.config.hidden_size
    perturb(model, "mm", scale=1.0)
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(8).expand(2, -1)
    with torch.no_grad():
        got = model(ids, task="mm", position_ids=pos).logits
        ref = _reference_logits(model.llm, model.workflow("mm"), ids, pos, gate)
        base = model(ids, task="text", position_ids=pos).logits
    assert (got - base).abs().max() > 1e-2
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- generation
def test_batched_rows_with_one_image_each_equal_one_by_one(bases, images):
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"mm": V1})
    perturb(model, "mm", scale=1.0)
    prompts, per_prompt = ["<image>\nwhat is this", "<image> is it red"], [[images[0]], [images[2]]]
    batch = model.generate(prompt=prompts, images=per_prompt, task="mm", max_new_tokens=6, eos_token_id=[])
    for k, (p, imgs) in enumerate(zip(prompts, per_prompt)):
        single = model.generate(prompt=p, images=imgs, task="mm", max_new_tokens=6, eos_token_id=[])
        assert torch.equal(batch[k : k + 1], single)
    # uneven image counts per row: prepare_inputs names each image's row, so every row still gets its own
    prompts, per_prompt = ["<image> what", "hello there", "<image> <image> which"], [[images[0]], [], images[1:3]]
    batch = model.generate(prompt=prompts, images=per_prompt, task="mm", max_new_tokens=6, eos_token_id=[])
    for k, (p, imgs) in enumerate(zip(prompts, per_prompt)):
        single = model.generate(prompt=p, images=imgs or None, task="mm", max_new_tokens=6, eos_token_id=[])
        assert torch.equal(batch[k : k + 1], single), f"row {k}"
    inputs = model.prepare_inputs(prompts, per_prompt, task="mm")
    assert inputs["image_rows"].tolist() == [0, 2, 2]
    # images given to forward one list per row name their rows just as well
    with torch.no_grad():
        explicit = model(**inputs, task="mm").logits
        nested = model(inputs["input_ids"], inputs["attention_mask"], images=per_prompt, task="mm").logits
    assert torch.equal(explicit, nested)
    # without the rows, which image belongs to which row is unknown: a clear error, never a guess
    inputs.pop("image_rows")
    with pytest.raises(ValueError, match="pass image_rows"):
        model(**inputs, task="mm")


def test_visual_prompt_rows():
    per_image = torch.arange(12.0).view(4, 1, 3)
    # one row: the mean of all its images; equal counts: consecutive images per row
    assert torch.equal(visual_prompt_per_row(per_image, 1), per_image.mean(0, keepdim=True))
    assert torch.equal(visual_prompt_per_row(per_image, 2), torch.stack([per_image[:2].mean(0), per_image[2:].mean(0)]))
    # with explicit rows: row 1 has no image -> zeros
    rows = visual_prompt_per_row(per_image, 3, torch.tensor([0, 0, 2, 2]))
    assert torch.equal(rows[1], torch.zeros(1, 3)) and torch.equal(rows[2], per_image[2:].mean(0))
    with pytest.raises(ValueError):
        visual_prompt_per_row(per_image, 3)


# --------------------------------------------------------------------------- training & checkpoints
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_gradients_reach_only_the_workflow(bases, images, kind):
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"mm": CONFIGS[kind], "other": V1})
    perturb(model, "mm", scale=0.3)  # open the gates, so that every part has a gradient
    family = model.workflow("mm")
    expected = {"connector", "prompt", "gate"} | ({"bias"} if CONFIGS[kind].get("bias_tuning") else set())
    assert set(family.parts()) == expected
    assert sum(p.numel() for p in model.trainable_parameters("mm")) == sum(p.numel() for p in family.parameters())
    assert_gradients_only_in_workflow(model, "mm", "other", images)


def test_save_load_round_trip(bases, images, tmp_path):
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"v1": V1, "v2": V2})
    perturb(model, "v1", scale=0.3)
    perturb(model, "v2", seed=2, scale=0.3)
    model.save_pretrained(tmp_path)
    loaded = frozenvl.load(tmp_path)
    for task in ("v1", "v2"):
        inputs = model.prepare_inputs("<image> what is it", [images[1]], task=task)
        with torch.no_grad():
            assert torch.equal(model(**inputs, task=task).logits, loaded(**inputs, task=task).logits)


def test_config_errors(bases):
    llm, vis = bases()
    bad = [
        ({"gate": "vector"}, "gate"),
        ({"visual": "v3"}, "visual"),
        ({"visual": "v2", "v2_queries": 3, "adapter_len": 4}, "v2_queries"),
        ({"llm_train": "lora"}, "frozen"),
        ({"adapter_layers": 99}, "adapter_layers"),
    ]
    for extra, word in bad:
        with pytest.raises(ConfigError, match=word):
            frozenvl.build(llm, vis, workflows={"mm": {"family": "adaption_prompt", **extra}})
    with pytest.raises(ConfigError, match="vision encoder"):
        frozenvl.build(llm, None, workflows={"mm": {**V1, "visual": "v1"}})
    text_only = frozenvl.build(llm, vis, workflows={"mm": {**V1, "visual": "none"}})
    with pytest.raises(ValueError, match="takes no images"):
        text_only(torch.tensor([[5, 6, 7]]), pixel_values=torch.zeros(1, 3, 8, 8), task="mm")


def test_text_only_adapter_has_no_text_fallback(bases):
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"txt": {"family": "adaption_prompt", "visual": "none", "adapter_layers": 2},
                                                "mm": V1})
    assert model.workflows["txt"].cfg.text_fallback is False  # it exists to change text answers
    assert model.workflows["mm"].cfg.text_fallback is True  # image-free requests go to the base
    ids = model.tokenizer("hello", return_tensors="pt").input_ids
    assert model.route("txt", ids, None) == "txt" and model.route("mm", ids, None) == "text"
