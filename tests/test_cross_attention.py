"""cross_attention (Flamingo / IDEFICS): parity with transformers' IDEFICS, media masking, gates,
cached media keys/values, new tokens, the perceiver resampler, and the import."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, IdeficsForVisionText2Text

import frozenvl
from frozenvl.config import ConfigError
from frozenvl.families.base import IMAGE_TOKEN_ID
from frozenvl.families.cross_attention import GatedCrossAttentionBlock
from frozenvl.importers import import_idefics
from frozenvl.tiny import build_tiny_idefics
from frozenvl.vision.perceiver import PerceiverResampler

from .conftest import assert_gradients_only_in_workflow, perturb

SMALL = {"resampler_depth": 1, "resampler_latents": 4, "resampler_heads": 2, "resampler_head_dim": 8}
FAKE, IMAGE = 512, 513  # ids of IDEFICS' additional vocabulary in build_tiny_idefics


def _build(bases, **kw):
    llm, vis = bases("llama", "clip")
    wf = {"family": "cross_attention", "every": 1, **SMALL, **kw}
    return frozenvl.build(llm, vis, workflows={"mm": wf, "other": dict(wf)})


def _set_gates(model, task, value):
    with torch.no_grad():
        for block in model.workflow(task).blocks.values():
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


# --------------------------------------------------------------------------- IDEFICS parity
@pytest.fixture(scope="module", params=["float", "vector"])
def idefics(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"idefics-{request.param}")
    src = build_tiny_idefics(root / "src", alpha_type=request.param, qk_layer_norms=True, use_resampler=True)
    out = import_idefics(src, root / "out")
    return IdeficsForVisionText2Text.from_pretrained(src).eval(), frozenvl.load(out)


def _idefics_inputs():
    """Two left-padded rows, two images each, IDEFICS' <fake><image><fake> framing, text before the first image."""
    ids = torch.tensor([
        [5, 6, 7, FAKE, IMAGE, FAKE, 20, 21, 22, FAKE, IMAGE, FAKE, 30, 31],
        [0, 0, 9, 10, FAKE, IMAGE, FAKE, 40, 41, FAKE, IMAGE, FAKE, 50, 51],
    ])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    latest = torch.cumsum((ids == IMAGE).long(), 1) - 1
    image_mask = torch.nn.functional.one_hot(latest.clamp(min=0), 2) * (latest >= 0).unsqueeze(-1)
    pixels = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return ids, mask, pixels, image_mask


def test_idefics_import_matches_transformers(idefics):
    ref, model = idefics
    family = model.workflow("mm")
    assert family.cfg.style == "idefics" and family.cfg.qk_norm and family.resampler is not None
    assert all(float(b.attn_gate.detach().abs().max()) > 0 for b in family.blocks.values())  # the blocks really act
    ids, mask, pixels, image_mask = _idefics_inputs()
    ours_ids = ids.masked_fill(ids == IMAGE, IMAGE_TOKEN_ID)
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_attention_mask=image_mask).logits
        ours = model(ours_ids, mask, pixel_values=pixels.flatten(0, 1), task="mm").logits
        other = model(ours_ids, mask, pixel_values=pixels.flatten(0, 1).flip(0), task="mm").logits
    real = mask.bool()
    assert ours.shape == theirs.shape == (2, ids.shape[1], 514)
    assert (ours - theirs)[real].abs().max() <= 1e-5
    assert (other - theirs)[real].abs().max() > 1e-3  # the images matter, so the match is not vacuous

    theirs_tokens = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                 image_attention_mask=image_mask, max_new_tokens=12, min_new_tokens=12,
                                 do_sample=False)[:, ids.shape[1]:]
    ours_tokens = model.generate(ours_ids, mask, pixel_values=pixels.flatten(0, 1), task="mm",
                                 max_new_tokens=12, eos_token_id=[])
    assert torch.equal(ours_tokens, theirs_tokens)


def test_idefics_text_path_is_the_imported_llama(idefics):
    _, model = idefics
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    bare = AutoModelForCausalLM.from_pretrained(model.config.llm).eval()
    with torch.no_grad():
        assert torch.equal(model(ids, task="text").logits, bare(input_ids=ids).logits)
    assert model.tokenizer.convert_ids_to_tokens([FAKE, IMAGE]) == ["<fake_token_around_image>", "<image>"]
    assert model.workflow("mm").cfg.extra_tokens == ["<fake_token_around_image>", "<image>"]


def test_import_rejects_what_it_cannot_read(tmp_path, bases):
    llm_dir, _ = bases("llama", "clip")
    with pytest.raises(ValueError, match="not an IDEFICS"):
        import_idefics(llm_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="not a directory"):
        import_idefics(tmp_path / "nope", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------- gates and masking
def test_zero_gates_give_the_base_llm(bases, images):
    model = _build(bases)
    perturb(model, "mm")
    _set_gates(model, "mm", 0.0)
    family = model.workflow("mm")
    bare = AutoModelForCausalLM.from_pretrained(model.config.llm).eval()
    inputs = model.prepare_inputs(["<image> a red <image> circle", "what is this"], [images[:2], []], task="mm")
    base_vocab = bare.config.vocab_size
    with torch.no_grad():
        ours = model(**inputs, task="mm").logits
        embeds = family.embed(inputs["input_ids"], None)  # the <image> token's own embedding, base elsewhere
        pos = frozenvl.data.prompt.position_ids_from_mask(inputs["attention_mask"])
        ref = bare(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], position_ids=pos).logits
    assert torch.equal(ours[..., :base_vocab], ref[..., :base_vocab])


def test_changing_the_second_image_changes_only_what_follows_it(bases, images):
    model = _build(bases)
    perturb(model, "mm", scale=0.3)
    prompt = "a <image> red circle and <image> a blue square"
    with torch.no_grad():
        a = model(**model.prepare_inputs(prompt, images[:2], task="mm"), task="mm").logits[0]
        b = model(**model.prepare_inputs(prompt, [images[0], images[2]], task="mm"), task="mm").logits[0]
        c = model(**model.prepare_inputs(prompt, [images[2], images[1]], task="mm"), task="mm").logits[0]
    ids = model.prepare_inputs(prompt, images[:2], task="mm")["input_ids"][0]
    first, second = (ids == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
    assert torch.equal(a[:second], b[:second])
    assert (a[second:] - b[second:]).abs().amax(-1).min() > 1e-4  # every position from the <image> on
    # the first image reaches the tokens between the images, and (through the residual stream) later ones
    assert torch.equal(a[:first], c[:first]) and (a[first:second] - c[first:second]).abs().amax(-1).min() > 1e-4


def test_all_previous_media_attention(bases, images):
    """With `all_previous`, tokens after the second image still attend to the first one directly."""
    model = _build(bases, media_attention="all_previous", layers=[0])
    latest = _build(bases, layers=[0])
    latest.workflows["mm"].load_state_dict(model.workflows["mm"].state_dict())
    for m in (model, latest):
        perturb(m, "mm", scale=0.3)
    prompt = "x <image> y <image> z"
    # one block before layer 0: the hidden states entering it are plain embeddings, so with `latest` a
    # token after the second image cannot depend on the first image at that block; with all_previous it does
    with torch.no_grad():
        outs = {}
        for name, m in (("all", model), ("latest", latest)):
            fam = m.workflow("mm")
            seen = {}
            fam.blocks["0"].register_forward_hook(lambda mod, args, out, seen=seen: seen.setdefault("h", out))
            for key, imgs in (("a", images[:2]), ("b", [images[2], images[1]])):
                seen.clear()
                m(**m.prepare_inputs(prompt, imgs, task="mm"), task="mm")
                outs[name, key] = seen["h"][0]
    ids = model.prepare_inputs(prompt, images[:2], task="mm")["input_ids"][0]
    second = (ids == IMAGE_TOKEN_ID).nonzero().flatten().tolist()[1]
    assert torch.equal(outs["latest", "a"][second:], outs["latest", "b"][second:])
    assert (outs["all", "a"][second:] - outs["all", "b"][second:]).abs().amax(-1).min() > 1e-5


def test_infimm_rows_without_images_are_the_base(bases, images):
    model = _build(bases, skip_rows_without_images=True)
    perturb(model, "mm", scale=0.3)
    bare = AutoModelForCausalLM.from_pretrained(model.config.llm).eval()
    inputs = model.prepare_inputs(["<image> a red circle", "what is the colour"], [[images[0]], []], task="mm")
    base_vocab = bare.config.vocab_size
    with torch.no_grad():
        ours = model(**inputs, task="mm").logits
        pos = frozenvl.data.prompt.position_ids_from_mask(inputs["attention_mask"])
        ref = bare(input_ids=inputs["input_ids"][1:], attention_mask=inputs["attention_mask"][1:],
                   position_ids=pos[1:]).logits
        plain = _build(bases)
        plain.workflows["mm"].load_state_dict(model.workflows["mm"].state_dict())
        ff_on = plain(**inputs, task="mm").logits
    torch.testing.assert_close(ours[1, :, :base_vocab], ref[0], atol=1e-5, rtol=1e-5)
    assert (ff_on[1, :, :base_vocab] - ref[0]).abs().max() > 1e-4  # without the option the FF branch acts


# --------------------------------------------------------------------------- cache
@pytest.mark.parametrize("style", ["openflamingo", "idefics"])
def test_cached_generation_equals_recomputation(bases, images, style):
    model = _build(bases, style=style, gate_type="vector" if style == "idefics" else "float", qk_norm=True)
    perturb(model, "mm", scale=0.2)
    # (per-step logits through the loop, both styles: tests/test_cache_equivalence.py)
    # a batch with 2, 1 and 0 images per row (mixed rows route per group; check the workflow itself)
    inputs = model.prepare_inputs(["<image> and <image> what", "<image> say", "no image here"],
                                  [images[:2], [images[2]], []], task="mm")
    model.workflow("mm").cfg.text_fallback = False
    cached = model.generate(**inputs, task="mm", max_new_tokens=6, eos_token_id=[])
    full = model.generate(**inputs, task="mm", max_new_tokens=6, eos_token_id=[], use_cache=False)
    assert torch.equal(cached, full)


def test_media_keys_values_are_computed_once_per_generate(bases, images, monkeypatch):
    model = _build(bases)
    perturb(model, "mm")
    calls = []
    original = GatedCrossAttentionBlock.media_kv
    monkeypatch.setattr(GatedCrossAttentionBlock, "media_kv",
                        lambda self, media: calls.append(media.shape[0]) or original(self, media))
    encodes = []
    model.vision.register_forward_hook(lambda mod, args, out: encodes.append(args[0].shape[0]))
    # two rows sharing one image: the vision tower sees each distinct image once, and each block
    # projects the media to keys/values once for the whole generate call
    model.generate(prompt=["<image> what", "<image> and <image> why"], images=[[images[0]], [images[1], images[0]]],
                   task="mm", max_new_tokens=10, eos_token_id=[])
    n_blocks = len(model.workflow("mm").blocks)
    assert len(calls) == n_blocks and encodes == [2]
    # a second chat turn re-sends the first image: only the new one is encoded
    encodes.clear()
    turn1 = [{"role": "user", "content": "<image> what is this"}]
    model.chat(turn1, images=[images[0]], task="mm", max_new_tokens=3)
    assert encodes == []  # encoded in the generate call above, same pixels, same weights
    turn2 = turn1 + [{"role": "assistant", "content": "a circle"}, {"role": "user", "content": "<image> and this"}]
    model.chat(turn2, images=[images[0], images[2]], task="mm", max_new_tokens=3)
    assert encodes == [1]
    # changing a weight invalidates the cached encodings
    with torch.no_grad():
        model.workflow("mm").resampler.latents.add_(0.1)
    encodes.clear()
    model.chat(turn1, images=[images[0]], task="mm", max_new_tokens=3)
    assert encodes == [1]


# --------------------------------------------------------------------------- tokens, training, checkpoints
def test_new_tokens_belong_to_the_workflow(bases, images):
    model = _build(bases)
    perturb(model, "mm")
    _set_gates(model, "mm", 0.0)
    family = model.workflow("mm")
    tok = model.tokenizer
    eoc = tok.convert_tokens_to_ids("<|endofchunk|>")
    assert tok("a<|endofchunk|>")["input_ids"][-1] == eoc and family.token_ids.tolist()[1] == eoc
    inputs = model.prepare_inputs("<image> a red circle<|endofchunk|> b", [images[0]], task="mm")
    assert (inputs["input_ids"] == eoc).sum() == 1
    with torch.no_grad():
        logits = model(**inputs, task="mm").logits
        # zero gates: the hidden states are the base's on the workflow's embeddings
        hidden = model.llm.model(inputs_embeds=family.embed(inputs["input_ids"], None)).last_hidden_state
    torch.testing.assert_close(logits[0, :, eoc], hidden[0] @ family.token_head[1], atol=1e-5, rtol=1e-5)
    # the embedding of <|endofchunk|> is the workflow's row, not the base table's
    eoc_at = (inputs["input_ids"][0] == eoc).nonzero().item()
    assert torch.equal(family.embed(inputs["input_ids"], None)[0, eoc_at], family.token_embed[1])
    with pytest.raises(ValueError, match="belong to that workflow"):
        model(torch.tensor([[5, 6, max(eoc, model.llm.config.vocab_size)]]), task="text")


def test_new_token_logits_with_ids_inside_or_past_the_base_vocabulary(bases):
    model = _build(bases)
    family = model.workflow("mm")
    perturb(model, "mm")
    h = torch.randn(1, 3, model.llm.config.hidden_size)
    base = family.lm.lm_head(h)
    extra = h @ family.token_head.T
    family.set_token_ids([3, 7])  # a tokenizer shorter than the embedding table: ids inside it
    out = family.lm_head(h)
    assert out.shape == base.shape
    assert torch.equal(out[..., [3, 7]], extra) and torch.equal(out[..., :3], base[..., :3])
    vocab = base.shape[-1]
    family.set_token_ids([vocab + 2, vocab])  # past it, with a gap
    out = family.lm_head(h)
    assert out.shape[-1] == vocab + 3
    assert torch.equal(out[..., :vocab], base) and torch.equal(out[..., [vocab + 2, vocab]], extra)
    assert bool((out[..., vocab + 1] == torch.finfo(out.dtype).min).all())


def test_gradients_only_in_the_workflow(bases, images):
    model = _build(bases)
    perturb(model, "mm")
    assert set(model.workflow("mm").parts()) == {"resampler", "xattn", "tokens"}
    assert_gradients_only_in_workflow(model, "mm", "other", images)


def test_save_and_load_round_trip(bases, images, tmp_path):
    model = _build(bases, style="idefics", gate_type="vector", qk_norm=True)
    perturb(model, "mm")
    model.save_pretrained(tmp_path / "m")
    again = frozenvl.load(tmp_path / "m")
    inputs = model.prepare_inputs("<image> a red circle<|endofchunk|>", [images[0]], task="mm")
    with torch.no_grad():
        assert torch.equal(model(**inputs, task="mm").logits, again(**inputs, task="mm").logits)


def test_config_errors(bases):
    for bad, match in [
        ({"style": "nope"}, "style"),
        ({"media_attention": "first"}, "media_attention"),
        ({"gate_type": "matrix"}, "gate_type"),
        ({"image_token": "<img>"}, "image_token"),
        ({"every": 8, "style": "openflamingo"}, "places no block"),
        ({"layers": [0, 9]}, "layers"),
        ({"llm_train": "full"}, "frozen"),
    ]:
        with pytest.raises(ConfigError, match=match):
            _build(bases, **bad)


def test_image_count_mismatch_is_an_error(bases, images):
    model = _build(bases)
    inputs = model.prepare_inputs("<image> a <image> b", images[:2], task="mm")
    with pytest.raises(ValueError, match="<image> positions"):
        model(inputs["input_ids"], inputs["attention_mask"], pixel_values=inputs["pixel_values"][:1], task="mm")


# --------------------------------------------------------------------------- perceiver
def test_perceiver_shapes_frames_and_errors():
    torch.manual_seed(0)
    p = PerceiverResampler(16, depth=2, heads=2, head_dim=8, num_latents=5, activation="relu", qk_norm=True,
                           max_frames=3)
    x = torch.randn(2, 7, 16)
    assert p(x).shape == (2, 5, 16)
    frames = torch.randn(2, 3, 7, 16)
    out = p(frames)
    assert out.shape == (2, 5, 16)
    # frame embeddings tell frames apart: swapping two frames changes the result
    assert (out - p(frames[:, [1, 0, 2]])).abs().max() > 1e-5
    with pytest.raises(ValueError, match="4 frames"):
        p(torch.randn(1, 4, 7, 16))
    with pytest.raises(ValueError, match="activation"):
        PerceiverResampler(16, activation="tanh")


def test_cli_import_idefics(tmp_path, bases):
    from typer.testing import CliRunner

    from frozenvl.cli import app

    src = build_tiny_idefics(tmp_path / "src", num_layers=2, cross_layer_interval=1, use_resampler=False,
                             qk_layer_norms=False)
    runner = CliRunner()
    result = runner.invoke(app, ["import", "idefics", str(src), str(tmp_path / "out"), "--workflow", "vqa"])
    assert result.exit_code == 0, result.output
    model = frozenvl.load(tmp_path / "out")
    family = model.workflow("vqa")
    assert family.resampler is None and sorted(family.blocks) == ["0", "1"]
    ref = IdeficsForVisionText2Text.from_pretrained(src).eval()
    ids, mask, pixels, image_mask = _idefics_inputs()
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_attention_mask=image_mask).logits
        ours = model(ids.masked_fill(ids == IMAGE, IMAGE_TOKEN_ID), mask, pixel_values=pixels.flatten(0, 1),
                     task="vqa").logits
    assert (ours - theirs)[mask.bool()].abs().max() <= 1e-5  # raw vision features as media, no resampler

    llm_dir, _ = bases("llama", "clip")
    bad = runner.invoke(app, ["import", "idefics", llm_dir, str(tmp_path / "out2")])
    assert bad.exit_code == 2 and "not an IDEFICS" in bad.output


def test_models_loaded_in_inference_mode_skip_the_image_cache(bases, images):
    llm, vis = bases("llama", "clip")
    with torch.inference_mode():
        model = frozenvl.build(llm, vis, workflows={"mm": {"family": "cross_attention", "every": 1, **SMALL}})
        a = model.generate(prompt="<image> what", images=[images[0]], task="mm", max_new_tokens=3, eos_token_id=[])
        b = model.generate(prompt="<image> what", images=[images[0]], task="mm", max_new_tokens=3, eos_token_id=[])
    assert torch.equal(a, b) and len(model.encoded_images._store) == 0


def test_training_on_interleaved_documents(bases, tmp_path):
    """frozenvl.train on a file mixing documents (several images each) and conversations: the loss
    falls, gates leave zero, the base is untouched and the run dir loads with the new tokens."""
    import json

    from PIL import Image

    from frozenvl.train import train

    llm, vis = bases("llama", "clip")
    (tmp_path / "images").mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}
    for name, rgb in colours.items():
        Image.new("RGB", (32, 32), rgb).save(tmp_path / "images" / f"{name}.png")
    records = []
    for i in range(8):
        a, b = list(colours)[i % 3], list(colours)[(i + 1) % 3]
        records.append({"id": f"d{i}", "document": [
            "look: ", {"image": f"images/{a}.png"}, f" a {a} square.<|endofchunk|>",
            {"image": f"images/{b}.png"}, f" a {b} square.<|endofchunk|>"]})
        records.append({"id": f"c{i}", "image": f"images/{a}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour"}, {"from": "gpt", "value": a}]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    cfg = {
        "llm": llm, "vision": vis, "output_dir": str(tmp_path / "run"),
        "workflow": {"name": "mm", "family": "cross_attention", "every": 1, **SMALL},
        "data": {"train": str(tmp_path / "train.json"), "max_length": 128},
        "stages": [{"name": "s", "train": ["resampler", "xattn", "tokens"], "lr": 3e-3, "steps": 10,
                    "batch_size": 4, "warmup_ratio": 0.0, "schedule": "constant"}],
        "log_every": 1, "seed": 0,
    }
    res = train(cfg, show_progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert res.base_unchanged and rows[-1]["loss"] < rows[0]["loss"]
    model = frozenvl.load(tmp_path / "run")
    assert all(float(b.attn_gate.detach().abs().max()) > 0 for b in model.workflow("mm").blocks.values())
    out = model.generate(prompt="look: <image> a", images=[str(tmp_path / "images" / "red.png")], task="mm",
                         max_new_tokens=4)
    assert out.shape[0] == 1


def test_gradient_checkpointing_gives_the_same_gradients(bases, images):
    model = _build(bases)
    perturb(model, "mm", scale=0.2)
    family = model.workflow("mm")
    inputs = model.prepare_inputs(["<image> a red <image> circle"], [images[:2]], task="mm")
    grads = []
    for gc in (False, True):
        family.gradient_checkpointing = gc
        model.train()
        model.zero_grad()
        loss = model(**inputs, labels=inputs["input_ids"].clamp(min=0), task="mm").loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in family.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_videos_as_multi_frame_media(bases, images):
    model = _build(bases, resampler_max_frames=3)
    perturb(model, "mm", scale=0.2)
    still = model.pixel_values(images, "mm")  # [3, 3, H, W]
    video = torch.stack([still, still.flip(0)])  # two media of 3 frames each
    ids = model.prepare_inputs("clip one <image> and clip two <image> what happens",
                               [images[0], images[1]], task="mm")["input_ids"]
    with torch.no_grad():
        a = model(ids, task="mm", pixel_values=video).logits
        b = model(ids, task="mm", pixel_values=video[:, [1, 0, 2]]).logits  # frame order matters
        out = model.generate(ids, pixel_values=video, task="mm", max_new_tokens=4, eos_token_id=[])
        full = model.generate(ids, pixel_values=video, task="mm", max_new_tokens=4, eos_token_id=[], use_cache=False)
    assert (a - b).abs().max() > 1e-4 and torch.equal(out, full)
    with pytest.raises(ValueError, match="at most 3"):
        model(ids, task="mm", pixel_values=torch.cat([video, video[:, :1]], 1))
    plain = _build(bases)
    with pytest.raises(ValueError, match="resampler_max_frames"):
        plain(ids, task="mm", pixel_values=video)


def test_new_token_gradients_are_deterministic(bases):
    """The new tokens' embedding gradient is summed in a fixed order (advanced indexing's backward on
    CPU adds with atomics: runs, and resumed trainings, would drift apart in the last bits)."""
    model = _build(bases)
    family = model.workflow("mm")
    eoc = model.tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    ids = torch.full((16, 256), eoc)
    ids[:, ::3] = IMAGE_TOKEN_ID
    g = torch.randn(16, 256, model.llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    grads = set()
    for _ in range(10):
        family.token_embed.grad = None
        (family.embed(ids, None) * g).sum().backward()
        grads.add(family.token_embed.grad.numpy().tobytes())
    assert len(grads) == 1
