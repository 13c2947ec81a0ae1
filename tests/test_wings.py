"""wings (Wings): the prefix workflow at init, the text path untouched after training, a router that does not
depend on the sequence length and needs no attention probabilities, cached generation == recomputation with
the learners' keys/values kept out of the base cache, and training that lowers the loss on a frozen base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import frozenvl
from frozenvl.config import ConfigError
from frozenvl.constants import IMAGE_TOKEN_ID
from frozenvl.families import base
from frozenvl.families.wings import Router
from frozenvl.tiny import build_llm
from frozenvl.train import train
from frozenvl.train.trainer import base_checksum

from .conftest import (
    assert_cache_matches_recompute,
    batch_inputs,
    perturb,
    write_llava_data,
)

WINGS = {"family": "wings"}
ARCHS = ["llama", "qwen2", "mistral"]  # qwen2 and mistral: grouped-query attention (4 heads, 2 kv heads)
PROMPTS = ["<image>\nwhat colour is it", "the <image> and <image> differ how"]
TEXT_PROMPTS = ["what colour is the big circle on the left", "a red square"]
STAGES = [  # the paper's recipe: connector + visual learners, then both learners + router
    {"name": "align", "train": ["connector", "visual"], "lr": 3e-3, "steps": 3, "batch_size": 4, "warmup_ratio": 0.0},
    {"name": "tune", "train": ["visual", "textual", "router"], "lr": 3e-3, "steps": 3, "batch_size": 4,
     "warmup_ratio": 0.0, "schedule": "constant"},
]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models run many small ops, which a second thread only slows down
    when the CPUs are shared (the training test ran 15x slower with two on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _with_prefix(llm, vis, **kw):
    """A wings workflow `mm` and a prefix workflow `p` with the same connector weights."""
    model = frozenvl.build(llm, vis, workflows={"mm": WINGS, "p": {"family": "prefix"}}, **kw)
    model.workflow("p").connector.load_state_dict(model.workflow("mm").connector.state_dict())
    return model


def _mixed_inputs(model, images, task="mm"):
    """Two left-padded rows with 1 and 2 images."""
    return batch_inputs(model, task, PROMPTS, [[images[0]], [images[1], images[2]]])


def _router_outputs(model, task="mm"):
    """Context manager: every router's output [B, T, 2] per layer index, as the forward pass computes it."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        seen: dict[int, torch.Tensor] = {}
        hooks = [r.register_forward_hook(lambda m, a, out, i=int(i): seen.__setitem__(i, out.detach()))
                 for i, r in model.workflow(task).router.items()]
        try:
            yield seen
        finally:
            for h in hooks:
                h.remove()

    return ctx()


# --------------------------------------------------------------------------- init and the text path
@pytest.mark.parametrize("arch", ARCHS)
def test_init_is_the_prefix_workflow_with_the_same_connector(bases, images, arch):
    llm, vis = bases(arch)
    model = _with_prefix(llm, vis)
    with_images = _mixed_inputs(model, images)
    text_only = batch_inputs(model, "mm", TEXT_PROMPTS, None)
    with torch.no_grad():
        ours, prefix = model(**with_images, task="mm").logits, model(**with_images, task="p").logits
        # The image-mass channel rides along in the main attention kernel: equal up to its rounding.
        assert (ours - prefix).abs().max() <= 1e-6
        assert torch.equal(model(**text_only, task="mm").logits, model(**text_only, task="p").logits)
        perturb(model, "mm", scale=0.05, parts=["visual", "textual", "router"])
        assert (model(**with_images, task="mm").logits - prefix).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_text_is_the_bare_base_after_training(bases, arch, tmp_path):
    llm, vis = bases(arch)
    data = write_llava_data(tmp_path / "data", n=8)
    model = frozenvl.build(llm, vis, workflows={})
    cfg = {"llm": llm, "vision": vis, "output_dir": str(tmp_path / "run"), "workflow": {"name": "mm", **WINGS},
           "data": {"train": data, "max_length": 256}, "stages": STAGES, "log_every": 1, "save_every": 0}
    res = train(cfg, model=model, show_progress=False)
    assert res.base_unchanged
    family = model.workflow("mm")
    assert any(p.abs().sum() > 0 for lr in family.textual.values() for p in lr.o.B.parameters())  # B moved off 0
    bare = AutoModelForCausalLM.from_pretrained(llm).eval()
    ids = model.tokenizer(TEXT_PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = model(ids.input_ids, ids.attention_mask, task="text").logits
        assert torch.equal(ours, bare(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits)
        assert not torch.equal(model(ids.input_ids, ids.attention_mask, task="mm").logits, ours)
    one = ids.input_ids[:1, ids.attention_mask[0].bool()]
    expected = one
    with torch.no_grad():
        for _ in range(8):
            expected = torch.cat([expected, bare(input_ids=expected).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(model.generate(one, task="text", max_new_tokens=8, eos_token_id=[]), expected[:, -8:])


def test_rows_without_images_skip_the_visual_learner(bases, images):
    """A text-only row next to rows with images gets no visual term: the visual learners' weights do not
    change it, and it equals the row run alone (where the visual learner is not run at all)."""
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"mm": WINGS})
    perturb(model, "mm", scale=0.1)
    prompts = ["<image>\nwhat colour is it", "a red square on the left of it"]
    mixed = batch_inputs(model, "mm", prompts, [[images[0]], []])
    alone = batch_inputs(model, "mm", prompts[1:], None)
    with torch.no_grad():
        before = model(**mixed, task="mm").logits
        n = int(alone["attention_mask"].sum())
        torch.testing.assert_close(before[1, -n:], model(**alone, task="mm").logits[0], atol=1e-5, rtol=1e-5)
        perturb(model, "mm", seed=2, scale=0.3, parts=["visual"])
        after = model(**mixed, task="mm").logits
    assert torch.equal(after[1], before[1]) and not torch.allclose(after[0], before[0], atol=1e-3)


# --------------------------------------------------------------------------- the router
def test_router_does_not_depend_on_the_padded_length(bases, images):
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"mm": WINGS})
    perturb(model, "mm", scale=0.5, parts=["router"])
    perturb(model, "mm", seed=3, scale=0.05, parts=["visual", "textual"])
    inputs = model.prepare_inputs("<image> and <image>: which one is red", [images[0], images[1]], task="mm")
    ids = inputs["input_ids"]
    n = ids.shape[1]
    pad = model.tokenizer.pad_token_id
    weights = []
    for length in (20 + n, 2000):
        padded = torch.cat([torch.full((1, length - n), pad), ids], 1)
        mask = torch.cat([torch.zeros(1, length - n, dtype=torch.long), torch.ones_like(ids)], 1)
        with torch.no_grad(), _router_outputs(model) as seen:
            model(padded, mask, pixel_values=inputs["pixel_values"], task="mm")
        weights.append({i: w[0, -n:] for i, w in seen.items()})
    short, long = weights
    assert sorted(short) == list(range(model.llm.config.num_hidden_layers))
    for i in short:
        torch.testing.assert_close(short[i], long[i], atol=1e-6, rtol=0, msg=lambda m, i=i: f"layer {i}: {m}")
    # not a constant: the weights follow each token's attention to the images
    assert max(float(w[:, 0].max() - w[:, 0].min()) for w in short.values()) > 1e-2


def test_router_input_is_the_attention_mass_on_image_keys(bases, images):
    """The extra value channel (prompt) and the one-query road of decode steps give what eager attention's
    probabilities summed over image keys give."""
    import contextlib

    import transformers.models.llama.modeling_llama as llama

    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"mm": WINGS}, attn_implementation="eager")
    perturb(model, "mm", scale=0.1)
    model.workflow("mm").cfg.text_fallback = False
    inputs = _mixed_inputs(model, images)
    family = model.workflow("mm")

    @contextlib.contextmanager
    def recorded():
        probs, masses = {}, {}
        hooks = [family.router[str(i)].register_forward_pre_hook(lambda m, a, i=i: masses.__setitem__(i, a[0]))
                 for i in range(len(model.llm.model.layers))]
        original = llama.eager_attention_forward

        def recording(module, *args, **kwargs):
            out, weights = original(module, *args, **kwargs)
            probs[module.layer_idx] = weights
            return out, weights

        llama.eager_attention_forward = recording  # self_attention looks it up at call time
        try:
            yield probs, masses
        finally:
            llama.eager_attention_forward = original
            for h in hooks:
                h.remove()

    def check(probs, masses, is_image):
        assert len(masses) == len(model.llm.model.layers)
        for i in masses:
            expected = (probs[i] * is_image[:, None, None, :]).sum(-1).transpose(1, 2)  # [B, T, heads]
            torch.testing.assert_close(masses[i], expected, atol=1e-6, rtol=0)
            assert expected.max() > 0.1

    is_image = inputs["input_ids"] == IMAGE_TOKEN_ID
    with torch.no_grad(), recorded() as (probs, masses):
        model(**inputs, task="mm")
    check(probs, masses, is_image)
    # a decode step: one query per row, its mass from the scores row (no wider value tensor)
    with torch.no_grad():
        out = model(**inputs, task="mm", use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        with recorded() as (probs, masses):
            model._step(token, mask, "mm", past_key_values=out.past_key_values,
                        position_ids=inputs["position_ids"][:, -1:] + 1, use_cache=True)
    assert all(p.shape[2] == 1 for p in probs.values())
    check(probs, masses, torch.cat([is_image, torch.zeros_like(token, dtype=torch.bool)], 1))


def _reference_run_layer(self, idx, h, ctx):
    """Wings' layer as the definition reads: each learner on its own (LoRRA.forward), weighted and summed."""
    from frozenvl.families.wings import STATE_KEY

    st, key = ctx.state[STATE_KEY], str(idx)

    def learners(h1, attended):
        w = self.router[key](attended[..., 0] if attended is not None
                             else h1.new_zeros(*h1.shape[:2], self.router[key].heads))
        out = h1
        if st.visual is not None:
            k, v = self._keys_values(idx, self.visual[key], st.visual, st.visual_new, st.cached)
            out = out + w[..., :1] * self.visual[key](h1, k, v, st.visual_visible)
        k, v = self._keys_values(idx, self.textual[key], st.text, st.text_new, st.cached)
        return out + w[..., 1:] * self.textual[key](h1, k, v, st.text_visible)

    return base.decoder_block(self.lm.layers[idx], h, ctx, self.lm.layer_types[idx],
                              extra_values=st.image_keys, after_attention=learners)


@pytest.mark.parametrize("layers", ["all", [1, 3]])
def test_both_learners_at_once_equal_each_on_its_own(bases, images, monkeypatch, layers):
    """run_layer joins the two learners' maps into batched matmuls and keeps the joined weights between
    calls, and without autograd every layer's text keys are computed at once: it equals the learners
    run one by one, layer by layer, with and without images in the row, before and after an in-place
    weight update (the kept weights follow it), and under autograd."""
    from frozenvl.families.wings import WingsFamily

    llm, vis = bases("qwen2")
    model = frozenvl.build(llm, vis, workflows={"mm": {**WINGS, "layers": layers}})
    perturb(model, "mm", scale=0.1)
    family = model.workflow("mm")
    family.cfg.text_fallback = False
    inputs = batch_inputs(model, "mm", [PROMPTS[0], TEXT_PROMPTS[0]], [[images[0]], []])
    real = inputs["attention_mask"].bool()

    def both():
        with torch.no_grad():
            fused = model(**inputs, task="mm").logits[real]
        with monkeypatch.context() as m:
            m.setattr(WingsFamily, "run_layer", _reference_run_layer)
            with torch.no_grad():
                ref = model(**inputs, task="mm").logits[real]
        return fused, ref

    fused, ref = both()
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=0)
    with torch.no_grad():  # as an optimizer step would: in place
        family.textual["1"].o.B.weight.add_(0.5)
        family.textual["3"].k.B.weight.add_(0.5)
        family.visual["1"].q.A.weight.mul_(-1.0)
    fused2, ref2 = both()
    torch.testing.assert_close(fused2, ref2, atol=1e-5, rtol=0)
    assert (fused2 - fused).abs().max() > 1e-3  # the update reached the kept weights
    out = model(**inputs, task="mm").logits[real]  # autograd: joined afresh, gradients to each part
    torch.testing.assert_close(out.detach(), ref2, atol=1e-5, rtol=0)
    out.square().mean().backward()
    assert family.visual["1"].q.B.weight.grad.abs().sum() > 0 and family.textual["1"].o.A.weight.grad.abs().sum() > 0
    # the text keys of every chosen layer at once, each in its layer's row
    f = torch.randn(2, 5, model.llm.config.hidden_size)
    with torch.no_grad():
        every = family._text_keys_values(f)
        assert every.shape[0] == len(family.chosen)
        for pos, idx in enumerate(family.chosen):
            torch.testing.assert_close(every[pos], family.textual[str(idx)].keys_values(f), atol=1e-6, rtol=0)


def test_sdpa_and_eager_give_the_same_outputs(bases, images):
    llm, vis = bases()
    outs, tokens = [], []
    for attn in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = frozenvl.build(llm, vis, workflows={"mm": WINGS}, attn_implementation=attn)
        perturb(model, "mm", scale=0.1)
        model.workflow("mm").cfg.text_fallback = False
        inputs = _mixed_inputs(model, images)
        with torch.no_grad():  # at real positions (padding queries see no key: each kernel fills them its way)
            outs.append(model(**inputs, task="mm").logits[inputs["attention_mask"].bool()])
        tokens.append(model.generate(prompt=PROMPTS, images=[[images[0]], [images[1], images[2]]], task="mm",
                                     max_new_tokens=6, eos_token_id=[]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    assert torch.equal(tokens[0], tokens[1])


def test_kernels_that_need_equal_head_sizes_get_zero_padded_queries_and_keys(bases, images, monkeypatch):
    """Flash kernels take no values wider than the queries: queries and keys get zero channels instead
    (exercised here on sdpa, with the padded path forced), the outputs are the same."""
    llm, vis = bases("qwen3")  # head_dim 32 with hidden 64: the learners' head size is not the LLM's
    model = frozenvl.build(llm, vis, workflows={"mm": WINGS})
    perturb(model, "mm", scale=0.1)
    inputs = _mixed_inputs(model, images)
    with torch.no_grad():
        plain = model(**inputs, task="mm").logits
        monkeypatch.setattr(base, "UNEQUAL_VALUE_DIM_OK", ())
        torch.testing.assert_close(model(**inputs, task="mm").logits, plain, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- the KV cache
@pytest.fixture(scope="module")
def sharp_llm(bases, tmp_path_factory):
    """The tiny Llama at std 0.2 (as tests/test_cache_equivalence.py): attention that is not near-uniform."""
    llm_dir, vis = bases()
    return build_llm(tmp_path_factory.mktemp("sharp"), tokenizer_dir=llm_dir, initializer_range=0.2), vis


@pytest.mark.parametrize("layers", ["all", [1, 3]])
def test_cached_generation_equals_recomputation(sharp_llm, images, layers):
    """Some layers only: the text keys of every chosen layer, computed at once, land in the right layer."""
    llm, vis = sharp_llm
    model = frozenvl.build(llm, vis, workflows={"mm": {**WINGS, "layers": layers}})
    perturb(model, "mm", scale=0.1)
    model.workflow("mm").cfg.text_fallback = False  # every row through the workflow's own cache
    assert_cache_matches_recompute(model, "mm", images, min_distinct=4)


def test_the_base_cache_holds_only_the_base_keys_values(bases, images, monkeypatch):
    llm, vis = bases("qwen2")
    model = _with_prefix(llm, vis)
    perturb(model, "mm", scale=0.1, parts=["visual", "textual", "router"])
    inputs = _mixed_inputs(model, images)
    conf = model.llm.config
    head_dim = conf.hidden_size // conf.num_attention_heads
    with torch.no_grad():
        ours = model(**inputs, task="mm", use_cache=True).past_key_values
        prefix = model(**inputs, task="p", use_cache=True).past_key_values
    assert len(ours.layers) == len(prefix.layers) == conf.num_hidden_layers
    batch, length = inputs["input_ids"].shape
    for layer in ours.layers:
        assert layer.keys.shape == layer.values.shape == (batch, conf.num_key_value_heads, length, head_dim)
    # layer 0's keys/values come from the input embeddings alone: the prefix workflow's exactly
    assert torch.equal(ours.layers[0].keys, prefix.layers[0].keys)
    assert torch.equal(ours.layers[0].values, prefix.layers[0].values)
    assert not torch.allclose(ours.layers[1].keys, prefix.layers[1].keys, atol=1e-4)  # the learners act
    # the learners' keys/values live in the family's state on the cache, from this call: the visual
    # learners' per layer, the textual learners' of every layer in one buffer (computed at once)
    state = base.cache_state(ours)["wings"]
    assert set(state["visual"].kv) == set(range(conf.num_hidden_layers)) and not state["text"].kv
    n_images = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1)
    assert state["visual"].kv[0].get().shape == (2, batch, conf.num_attention_heads, int(n_images.max()), head_dim)
    n_text = int((inputs["attention_mask"].bool() & (inputs["input_ids"] != IMAGE_TOKEN_ID)).sum(1).max())
    assert state["text"].every_layer.get().shape == (conf.num_hidden_layers, 2, batch, conf.num_attention_heads,
                                                     n_text, head_dim)
    assert torch.equal(state["image_cols"], inputs["input_ids"] == IMAGE_TOKEN_ID)

    # one generate call computes the image tokens' keys/values once per layer and each text token's once
    # (for every layer at once)
    family = model.workflow("mm")
    sources = {"visual": [], "textual": []}
    for learner in family.visual.values():
        monkeypatch.setattr(learner, "keys_values",
                            lambda f, o=learner.keys_values: (sources["visual"].append(f.shape[1]), o(f))[1])
    monkeypatch.setattr(family, "_text_keys_values",
                        lambda f, o=family._text_keys_values: (sources["textual"].append(f.shape[1]), o(f))[1])
    family.cfg.text_fallback = False
    new = 5
    model.generate(prompt=PROMPTS, images=[[images[0]], [images[1], images[2]]], task="mm", max_new_tokens=new,
                   eos_token_id=[])
    layers = conf.num_hidden_layers
    text_in_prompt = int((inputs["attention_mask"].bool() & (inputs["input_ids"] != IMAGE_TOKEN_ID)).sum(1).max())
    assert sources["visual"] == [int(n_images.max())] * layers
    assert sources["textual"] == [text_in_prompt] + [1] * (new - 1)


# --------------------------------------------------------------------------- training
def test_gradients_reach_only_the_workflow(bases, images):
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"mm": WINGS, "other": WINGS})
    family = model.workflow("mm")
    assert set(family.parts()) == {"connector", "visual", "textual", "router"}
    assert sum(p.numel() for p in model.trainable_parameters("mm")) == sum(p.numel() for p in family.parameters())
    info = model.info()["workflows"]["mm"]  # what `frozenvl info` prints
    assert info["family"] == "wings" and info["trainable_params"] == sum(info["parts"].values())
    assert info["parts"]["router"] == sum(p.numel() for p in family.router.parameters()) > 0
    perturb(model, "mm", scale=0.1)
    model.train()
    inputs = model.prepare_inputs(["<image>\na red circle"], [[images[0]]], task="mm")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    model(**inputs, labels=labels, task="mm").loss.backward()
    assert all(p.grad is None for p in (*model.llm.parameters(), *model.vision.parameters()))
    assert all(p.grad is None for p in model.workflow("other").parameters())
    for part, params in family.parts().items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), part


def test_training_on_shapesworld_lowers_the_loss_and_keeps_the_base(sharp_llm, tmp_path):
    """Both stages of the recipe on ShapesWorld captions, 300 steps in all (the std-0.2 base: at 0.02 the
    tiny head's logits are too flat for any adapter to lower the loss much)."""
    from frozenvl.shapesworld.writer import generate

    llm, vis = sharp_llm
    generate(tmp_path / "sw", seed=0, n_train_images=64, n_eval_images=0, n_text_train=0, tasks=("caption",))
    model = frozenvl.build(llm, vis, workflows={})
    before = base_checksum(model)
    stages = [{**stage, "steps": 150, "lr": 3e-3, "schedule": "constant"} for stage in STAGES]
    cfg = {"llm": llm, "vision": vis, "output_dir": str(tmp_path / "run"), "workflow": {"name": "mm", **WINGS},
           "data": {"train": str(tmp_path / "sw" / "train_mm.json"), "max_length": 256}, "stages": stages,
           "log_every": 1, "save_every": 0}
    res = train(cfg, model=model, show_progress=False)
    assert res.base_unchanged and base_checksum(model) == before
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 300
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.4 * first, (first, last)  # measured: 6.94 -> 1.11
    # the saved workflow holds only its own weights, and loads back to the same outputs
    saved = load_file(str(tmp_path / "run" / "workflow-mm.safetensors"))
    assert {k.split(".")[0] for k in saved} == {"connector", "visual", "textual", "router"}
    loaded = frozenvl.load(tmp_path / "run")
    inputs = model.prepare_inputs("<image>\ndescribe the image", [str(tmp_path / "sw" / "images/train/00000.png")],
                                  task="mm")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, task="mm").logits, model(**inputs, task="mm").logits)


def test_llm_train_full_trains_the_workflow_copy(bases, images):
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"mm": {**WINGS, "llm_train": "full"}, "p": {"family": "prefix"}})
    family = model.workflow("mm")
    assert set(family.parts()) == {"connector", "visual", "textual", "router", "llm"}
    assert family.lm.causal_lm is family.own_llm and family.own_llm is not model.llm
    model.workflow("p").connector.load_state_dict(family.connector.state_dict())
    inputs = _mixed_inputs(model, images)
    with torch.no_grad():
        assert (model(**inputs, task="mm").logits - model(**inputs, task="p").logits).abs().max() <= 1e-6


# --------------------------------------------------------------------------- configuration
def test_config_errors_and_refused_architectures(bases):
    llm, vis = bases()
    for extra, word in [({"layers": [0, 9]}, "layers"), ({"layers": "some"}, "layers"), ({"rank": 0}, "rank"),
                        ({"router_hidden": -1}, "router_hidden")]:
        with pytest.raises(ConfigError, match=word):
            frozenvl.build(llm, vis, workflows={"mm": {**WINGS, **extra}})
    with pytest.raises(ValueError, match="vision encoder"):
        frozenvl.build(llm, None, workflows={"mm": WINGS})
    model = frozenvl.build(llm, vis, workflows={"mm": {**WINGS, "layers": [1, 3], "router_hidden": 0}})
    assert set(model.workflow("mm").visual) == {"1", "3"} and isinstance(model.workflow("mm").router["1"], Router)
    gemma2, _ = bases("gemma2")
    with pytest.raises(ConfigError, match="family 'wings' rewrites the Llama decoder block .* on 'gemma2'"):
        frozenvl.build(gemma2, vis, workflows={"mm": WINGS})


def test_the_example_config_trains_existing_parts(bases):
    """examples/train_wings.yaml parses, and its stages name parts a wings workflow has."""
    import os

    from frozenvl.train import TrainConfig
    from frozenvl.train.trainer import select_parameters

    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_wings.yaml")
    cfg = TrainConfig.from_yaml(path)
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"mm": cfg.workflow_config()})
    assert [s.train for s in cfg.stages] == [["connector", "visual"], ["visual", "textual", "router"]]
    for stage in cfg.stages:
        assert set(select_parameters(model.workflow("mm"), stage.train)) == set(stage.train)
