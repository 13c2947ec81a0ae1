"""visual_experts (Mono-InternVL): the monolithic embedding, modality-routed experts, vision=None builds."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import frozenvl
from frozenvl.cli import app
from frozenvl.config import ConfigError
from frozenvl.constants import IMAGE_TOKEN_ID
from frozenvl.data.prompt import position_ids_from_mask
from frozenvl.families import visual_experts as ve
from frozenvl.tiny import build_llm
from frozenvl.vision.connectors import PixelShuffleConnector, build_connector
from frozenvl.vision.monolithic import MonolithicEmbedding

from .conftest import assert_cache_matches_recompute, capture_step_logits, perturb

SMALL = "monolithic:size=56"  # a 4x4 patch grid: 4 tokens per image, keeps the tests fast
MIXED_PROMPTS = ["<image> <image> two shapes", "what is <image>", "just some text here"]


def _mixed_images(images):
    return [[images[0], images[1]], [images[2]], []]  # rows with 2, 1 and no image; left padding


def _build(bases, arch="llama", **wf):
    llm_dir, _ = bases(arch)
    return frozenvl.build(llm_dir, None, workflows={"mm": {"family": "visual_experts", "connector": SMALL, **wf}})


def _logits(model, task, prompts, images, **kw):
    inputs = model.prepare_inputs(prompts, images, task=task)
    with torch.no_grad():
        return model(**inputs, task=task, **kw).logits, inputs


# --------------------------------------------------------------------------- the monolithic embedding
def test_monolithic_embedding_is_patches_positions_then_internvl_pixel_shuffle():
    emb = MonolithicEmbedding(32, width=8, dtype=torch.float32)
    assert (emb.image_size, emb.patch_size, emb.num_patches, emb.num_tokens(emb.num_patches)) == (448, 14, 1024, 256)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the init (LayerNorm at 1/0), so every tensor matters
        for p in emb.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    px = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    out = emb(px)
    assert out.shape == (2, 256, 32)
    # written out: conv patches (row-major) + positions, then the pixel-shuffle connector it reuses
    ref_conn = PixelShuffleConnector(8, 32, 2, 2, "ref")
    ref_conn.load_state_dict({k: v for k, v in emb.state_dict().items() if k.split(".")[0] in ("layer_norm", "linear_1", "linear_2")})
    patches = F.conv2d(px, emb.patch_embed.weight, emb.patch_embed.bias, stride=14).flatten(2).transpose(1, 2)
    assert torch.equal(out, ref_conn(patches + emb.pos_embed))
    # another tile size: the position table bicubically resized to that grid
    small = torch.randn(1, 3, 224, 224)
    table = F.interpolate(emb.pos_embed.reshape(1, 32, 32, 8).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic",
                          align_corners=False).permute(0, 2, 3, 1).reshape(1, 256, 8)
    patches = F.conv2d(small, emb.patch_embed.weight, emb.patch_embed.bias, stride=14).flatten(2).transpose(1, 2)
    assert torch.equal(emb(small), ref_conn(patches + table))
    assert emb(small).shape == (1, 64, 32)
    # tiles [n, tiles, 3, H, W]: each image's tiles' tokens concatenated in tile order
    tiles = torch.stack([px, px.flip(0)], 1)  # image 0: tiles (a, b); image 1: (b, a)
    both = emb(tiles)
    assert both.shape == (2, 512, 32)
    assert torch.equal(both[0], torch.cat([out[0], out[1]])) and torch.equal(both[1], torch.cat([out[1], out[0]]))


def test_monolithic_embedding_rejects_what_it_cannot_embed():
    emb = build_connector("monolithic:size=56,width=8", None, 16)
    assert isinstance(emb, MonolithicEmbedding) and emb.width == 8 and emb.num_patches == 16
    with pytest.raises(ValueError, match="square tiles whose side is a multiple of 28"):
        emb(torch.zeros(1, 3, 56, 42))
    with pytest.raises(ValueError, match=r"takes pixel tiles \[n, 3, H, W\]"):
        emb(torch.zeros(1, 16, 8))
    with pytest.raises(ValueError, match="not a whole number of 14-px patches"):
        build_connector("monolithic:size=50", None, 16)
    with pytest.raises(ValueError, match="bad option 'stride=2'.*size=<int >= 1> \\(default 448\\)"):
        build_connector("monolithic:stride=2", None, 16)
    with pytest.raises(ValueError, match="bad option 'size=4'"):  # pixel_shuffle has no size option
        build_connector("pixel_shuffle:size=4", 8, 16)


def test_monolithic_is_refused_where_the_family_pools_images(bases):
    with pytest.raises(ConfigError, match="connector 'monolithic' merges patch tokens, but bind"):
        frozenvl.build(bases()[0], None, workflows={"b": {"family": "bind", "connector": "monolithic"}})


# --------------------------------------------------------------------------- vision=None builds, info, checkpoints
def test_build_without_vision_encoder_default_448_tile(bases, images):
    llm_dir, _ = bases("llama")
    model = frozenvl.build(llm=llm_dir, vision=None, workflows={"mm": {"family": "visual_experts"}})
    assert model.vision is None and model.tokens_per_image("mm") == 256 + 2
    pre = model.preprocessor("mm")
    assert pre.size == (448, 448) and pre.mode == "resize" and pre.image_mean == (0.485, 0.456, 0.406)
    inputs = model.prepare_inputs("<image> what is it", [images[0]], task="mm")
    assert inputs["pixel_values"].shape == (1, 3, 448, 448)
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == 258
    out = model.generate(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}, task="mm",
                         max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, 3)
    # a workflow that needs vision features is refused with a message naming it
    with pytest.raises(ValueError, match="'p' \\(prefix, connector 'mlp2x_gelu'\\) takes images through a vision"):
        model.add_workflow("p", {"family": "prefix"})
    with pytest.raises(ValueError, match=r"\['p'\] take images through a vision encoder.*connector: monolithic"):
        frozenvl.build(llm_dir, None, workflows={"p": {"family": "prefix"}})


def test_info_counts_and_cli(bases, tmp_path):
    model = _build(bases, attention_experts=True)
    fam, d = model.workflow("mm"), model.llm.config.hidden_size
    layers = model.llm.model.layers
    mlp = sum(p.numel() for p in layers[0].mlp.parameters())
    proj = sum(p.numel() for n in ve.PROJECTIONS for p in getattr(layers[0].self_attn, n).parameters())
    width = d  # default width: the LLM's
    conn = (3 * 14 * 14 * width + width) + 16 * width + 2 * 4 * width + (4 * width * d + d) + (d * d + d)
    info = model.info()
    assert info["vision"] is None and info["frozen_vision_params"] == 0
    parts = info["workflows"]["mm"]["parts"]
    assert parts == {"connector": conn, "experts": 4 * mlp, "attention_experts": 4 * proj, "tokens": 2 * d}
    assert info["workflows"]["mm"]["trainable_params"] == sum(parts.values())
    assert sum(p.numel() for p in fam.parameters()) == sum(parts.values())  # nothing else is held
    model.save_pretrained(tmp_path / "m")
    result = CliRunner().invoke(app, ["info", str(tmp_path / "m")], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "visual_experts" in result.stdout and f"{sum(parts.values()):,}" in result.stdout
    assert "vision encoder" in result.stdout and "none" in result.stdout
    result = CliRunner().invoke(app, ["info", str(tmp_path / "m"), "--json"])
    assert json.loads(result.stdout)["workflows"]["mm"]["parts"] == parts


def test_save_load_is_adapter_only_and_round_trips(bases, images, tmp_path):
    model = _build(bases, attention_experts=True)
    perturb(model, "mm", scale=0.1)
    model.save_pretrained(tmp_path / "m")
    files = list((tmp_path / "m").glob("*.safetensors"))
    assert len(files) == 1
    saved = load_file(str(files[0]))
    owned = model.workflow("mm").owned_state_dict()
    assert set(saved) == set(owned)
    assert sum(v.numel() for v in saved.values()) == model.info()["workflows"]["mm"]["trainable_params"]
    assert not any(k.startswith(("lm.", "llm.", "model.")) for k in saved)
    assert json.loads((tmp_path / "m" / "frozenvl.json").read_text())["vision"] is None
    loaded = frozenvl.load(tmp_path / "m")
    assert loaded.vision is None
    a, _ = _logits(model, "mm", MIXED_PROMPTS, _mixed_images(images))
    b, _ = _logits(loaded, "mm", MIXED_PROMPTS, _mixed_images(images))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- the experts
def test_experts_start_as_copies_of_the_text_ffn_or_random(bases):
    model = _build(bases, attention_experts=True)
    fam, layers = model.workflow("mm"), model.llm.model.layers
    for i, layer in enumerate(layers):
        for name, p in layer.mlp.named_parameters():
            q = fam.ffn_experts[str(i)].get_parameter(name)
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr() and q.requires_grad and not p.requires_grad
        for proj in ve.PROJECTIONS:
            assert torch.equal(getattr(layer.self_attn, proj).weight, fam.attn_experts[str(i)][proj].weight)
    rnd = _build(bases, init="random", layers=[1, 3]).workflow("mm")
    assert sorted(rnd.ffn_experts) == ["1", "3"] and rnd.layers_replaced == {1, 3}
    assert not torch.equal(rnd.ffn_experts["1"].up_proj.weight, layers[1].mlp.up_proj.weight)
    with pytest.raises(ConfigError, match="routing 'both' is not one of"):
        _build(bases, routing="both")
    with pytest.raises(ConfigError, match="llm_train must be 'frozen'"):
        _build(bases, llm_train="lora")


def test_copied_experts_are_a_prefix_workflow_on_the_same_embedding(bases, images):
    """Experts copied from the text FFN, no attention experts: mm == prefix with the same monolithic
    embedding as its connector (delimiters off, so both put the same tokens in the sequence)."""
    llm_dir, _ = bases("llama")
    model = frozenvl.build(llm_dir, None, workflows={
        "mm": {"family": "visual_experts", "connector": SMALL, "image_delimiters": False},
        "p": {"family": "prefix", "connector": SMALL, "image_mode": "resize"},
    })
    perturb(model, "mm", scale=0.3, parts=["connector"])
    model.workflow("p").connector.load_state_dict(model.workflow("mm").connector.state_dict())
    ours, inputs = _logits(model, "mm", MIXED_PROMPTS, _mixed_images(images))
    prefix, _ = _logits(model, "p", MIXED_PROMPTS, _mixed_images(images))
    assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum() == 3 * 4
    assert torch.equal(ours, prefix)
    perturb(model, "mm", scale=0.3, parts=["experts"])  # trained experts: no longer the prefix model
    assert (_logits(model, "mm", MIXED_PROMPTS, _mixed_images(images))[0] - prefix).abs().max() > 1e-3


def test_copied_experts_with_delimiters_are_the_base_on_spliced_embeddings(bases, images):
    """With <img> / </img>: the same, against the bare HF model fed the workflow's own embeddings."""
    llm_dir, _ = bases("qwen2")
    model = frozenvl.build(llm_dir, None, workflows={"mm": {"family": "visual_experts", "connector": SMALL}})
    perturb(model, "mm", scale=0.3, parts=["connector", "tokens"])
    fam = model.workflow("mm")
    inputs = model.prepare_inputs(MIXED_PROMPTS[:2], _mixed_images(images)[:2], task="mm")
    bare = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    with torch.no_grad():
        ours = model(**inputs, task="mm").logits
        embeds = fam.embed(inputs["input_ids"], model._image_embeds("mm", inputs["pixel_values"]))
        ref = bare(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                   position_ids=position_ids_from_mask(inputs["attention_mask"])).logits
    assert torch.equal(ours, ref)


def test_routing_marks_the_image_tokens_and_not_the_delimiters(bases, images):
    model = _build(bases)
    fam = model.workflow("mm")
    inputs = model.prepare_inputs(MIXED_PROMPTS, _mixed_images(images), task="mm")
    seen = {}
    real = fam._routing

    def spy(ctx):
        seen["r"] = real(ctx)
        return seen["r"]

    fam._routing = spy
    with torch.no_grad():
        model(**inputs, task="mm")
    r, ids = seen["r"], inputs["input_ids"]
    expected = torch.zeros_like(ids, dtype=torch.bool)
    for row in range(ids.shape[0]):
        slots = (ids[row] == IMAGE_TOKEN_ID).nonzero().squeeze(1).tolist()
        for start in range(0, len(slots), 6):  # <img>, 4 image tokens, </img> per image
            expected[row, slots[start + 1 : start + 5]] = True
    assert int(expected.sum()) == 3 * 4
    assert torch.equal(r.mask, expected)
    assert torch.equal(torch.sort(torch.cat([r.visual, r.text])).values, torch.arange(ids.numel()))


def test_gather_scatter_equals_the_dense_formula(bases, images):
    """Rows with 2, 1 and 0 images and left padding; trained (perturbed) FFN and attention experts."""
    model = _build(bases, "qwen2", attention_experts=True)
    perturb(model, "mm", scale=0.2)
    fam = model.workflow("mm")
    gathered, inputs = _logits(model, "mm", MIXED_PROMPTS, _mixed_images(images))
    assert (inputs["attention_mask"] == 0).any()
    fam.cfg.routing = "dense"
    dense, _ = _logits(model, "mm", MIXED_PROMPTS, _mixed_images(images))
    torch.testing.assert_close(gathered, dense, atol=1e-6, rtol=0)
    # the function itself, on random tokens, against h = FFN_t(x)(1 - m) + FFN_v(x) m
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 64, generator=g)
    m = torch.rand(3, 7, generator=g) < 0.4
    r = ve.Routing(m, m.reshape(-1).nonzero().squeeze(1), (~m).reshape(-1).nonzero().squeeze(1))
    t, v = model.llm.model.layers[0].mlp, fam.ffn_experts["0"]
    with torch.no_grad():
        mf = m.unsqueeze(-1).float()
        # 1e-5: the gathered rows go through matmuls of other shapes than all 21 rows at once, which
        # round differently in fp32 (up to 3e-6 measured on outputs of about 1); a token sent to the
        # wrong expert is off by more than 1e-3 (the last line)
        torch.testing.assert_close(ve.route(r, t, v, x), t(x) * (1 - mf) + v(x) * mf, atol=1e-5, rtol=0)
        assert not torch.allclose(t(x), v(x), atol=1e-3)  # the experts differ: the routing matters


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_text_is_the_bare_base_after_training(bases, images, arch):
    model = _build(bases, arch, attention_experts=True)
    llm_dir, _ = bases(arch)
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    fam = model.workflow("mm")
    params = model.trainable_parameters("mm")
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    inputs = model.prepare_inputs(MIXED_PROMPTS, _mixed_images(images), task="mm")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    start = {n: p.detach().clone() for n, p in fam.named_parameters()}
    for step in range(3):
        opt.zero_grad()
        model(**inputs, labels=labels, task="mm").loss.backward()
        assert all(p.grad is None for p in model.llm.parameters())
        if step == 0:  # every expert tensor is on the loss's path, but the last layer's image-token
            # outputs (its FFN expert, q and o) reach no labelled position: only its k/v experts do
            last = str(fam.lm.num_layers - 1)
            off_path = (f"ffn_experts.{last}.", f"attn_experts.{last}.q_proj", f"attn_experts.{last}.o_proj")
            no_grad = sorted(n for n, p in fam.named_parameters() if p.grad is None or not p.grad.abs().sum())
            assert no_grad == sorted(n for n, _ in fam.named_parameters() if n.startswith(off_path))
        opt.step()
    model.eval()
    for part, ps in fam.parts().items():  # every part trained
        names = {id(p): n for n, p in fam.named_parameters()}
        assert any(not torch.equal(p, start[names[id(p)]]) for p in ps), part
    after = model.llm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # FFN (and every base weight) untouched
    bare = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    ids = model.tokenizer(["what colour is the big circle", "a red square"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = model(ids.input_ids, ids.attention_mask, task="text").logits
        assert torch.equal(ours, bare(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits)
    one = ids.input_ids[:1]
    kw = dict(max_new_tokens=6, eos_token_id=[])
    # an image-free request to mm is answered by the base (text_fallback)
    assert torch.equal(model.generate(one, task="mm", **kw), model.generate(one, task="text", **kw))


@pytest.fixture(scope="module")
def sharp_llama(bases, tmp_path_factory):
    """The tiny Llama re-initialised with std 0.2 (as test_cache_equivalence): attention that is not
    almost uniform, so a decode step that saw the wrong keys would move the logits well past the tolerance."""
    llm_dir, vis = bases("llama")
    return build_llm(tmp_path_factory.mktemp("sharp-llama"), arch="llama", tokenizer_dir=llm_dir,
                     initializer_range=0.2), vis


@pytest.mark.parametrize("attention_experts", [False, True])
def test_cached_generation_equals_recompute(sharp_llama, images, attention_experts):
    llm_dir, _ = sharp_llama
    model = frozenvl.build(llm_dir, None, workflows={"mm": {"family": "visual_experts", "connector": SMALL,
                                                            "attention_experts": attention_experts}})
    perturb(model, "mm", scale=0.1)
    model.workflow("mm").cfg.text_fallback = False
    assert_cache_matches_recompute(model, "mm", images, min_distinct=4)


def test_decode_steps_run_only_the_base_layers(bases, images):
    """Prefill runs the routed blocks (the experts see only image tokens); each cached decode step
    runs the base's own layers: no expert, no written-out block."""
    model = _build(bases, attention_experts=True)
    perturb(model, "mm", scale=0.3)
    fam = model.workflow("mm")
    calls: list[int] = []  # tokens each expert call saw
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
             for m in (*fam.ffn_experts.values(), *(e["q_proj"] for e in fam.attn_experts.values()))]
    blocks = []
    real = ve.decoder_block
    ve.decoder_block = lambda *a, **k: (blocks.append(1), real(*a, **k))[1]
    try:
        with capture_step_logits(model) as steps:
            model.generate(prompt="<image> what is this", images=[images[0]], task="mm", max_new_tokens=5,
                           eos_token_id=[])
    finally:
        ve.decoder_block = real
        for h in hooks:
            h.remove()
    assert len(steps) == 5
    assert calls == [4] * 8  # prefill only: 4 layers x (FFN expert, q expert), each on the 4 image tokens
    assert len(blocks) == 4  # the written-out block in prefill only


def test_with_a_vision_encoder_and_a_standard_connector(sharp_llama, images):
    llm_dir, vis = sharp_llama
    model = frozenvl.build(llm_dir, vis, workflows={"mm": {"family": "visual_experts", "connector": "mlp2x_gelu",
                                                           "attention_experts": True}})
    assert model.pixel_embedding("mm") is None
    assert model.tokens_per_image("mm") == model.vision.num_tokens() + 2
    perturb(model, "mm", scale=0.1)
    assert_cache_matches_recompute(model, "mm", images, min_distinct=4)


def test_the_example_recipe_trains_without_a_vision_encoder(bases, tmp_path):
    """examples/train_visual_experts.yaml's workflow and stage parts, on the tiny base with vision: null,
    through the trainer (datasets get the monolithic embedding's preprocessing): the loss falls, the base
    stays, and the run dir reloads without a vision encoder."""
    import yaml

    from frozenvl.train import train

    from .conftest import write_llava_data

    example = yaml.safe_load(open(__file__.rsplit("/tests/", 1)[0] + "/examples/train_visual_experts.yaml"))
    assert example["vision"] is None and example["workflow"]["family"] == "visual_experts"
    data = write_llava_data(tmp_path / "data", n=8)
    stage = {"lr": 3e-3, "steps": 3, "batch_size": 2, "warmup_ratio": 0.0, "schedule": "constant"}
    cfg = {
        "llm": bases()[0], "vision": None, "output_dir": str(tmp_path / "run"), "seed": 0, "log_every": 1,
        "workflow": {**example["workflow"], "connector": SMALL},
        "data": {"train": data, "max_length": 256},
        "stages": [{"name": s["name"], "train": s["train"], **stage} for s in example["stages"]],
    }
    res = train(cfg, show_progress=False)
    assert res.base_unchanged and res.steps == 6 and not any(res.skipped.values())  # the images were read
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[-1]["loss"] < rows[0]["loss"]
    loaded = frozenvl.load(tmp_path / "run")
    assert loaded.vision is None and loaded.tokens_per_image("mm") == 4 + 2
