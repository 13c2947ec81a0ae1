"""The core promises: text == base bit for bit, cache == recompute, batch == one by one,
frozen base, independent workflows, checkpoints of trainable weights only."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

import frozenvl
from frozenvl.config import ConfigError
from frozenvl.constants import IMAGE_TOKEN_ID
from frozenvl.families.inner_adaptor import IAA14_LAYERS_32, default_insertion_layers

from .conftest import perturb

FAMILY_WORKFLOWS = {
    "prefix": {"family": "prefix"},
    "inner_adaptor": {"family": "inner_adaptor", "layers": [0, 2]},
    "cross_attention": {"family": "cross_attention", "every": 1, "resampler_depth": 1, "resampler_latents": 4,
                        "resampler_heads": 2, "resampler_head_dim": 8},
}


def _build(bases, arch="llama", vision="clip", **workflows):
    llm, vis = bases(arch, vision)
    wfs = workflows or {"mm": FAMILY_WORKFLOWS["prefix"], "g": FAMILY_WORKFLOWS["inner_adaptor"]}
    return frozenvl.build(llm, vis, workflows=wfs)


def _checksum(module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- text == base
# --------------------------------------------------------------------------- cache & batching
@pytest.mark.parametrize("family", sorted(FAMILY_WORKFLOWS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cached_generation_equals_recomputation(bases, images, family, arch):
    model = _build(bases, arch, mm=FAMILY_WORKFLOWS[family])
    perturb(model, "mm")
    for prompt, imgs in [("<image>\nwhat is this", [images[0]]), ("<image> and <image> differ how", images[:2])]:
        cached = model.generate(prompt=prompt, images=imgs, task="mm", max_new_tokens=10, eos_token_id=[])
        full = model.generate(
            prompt=prompt, images=imgs, task="mm", max_new_tokens=10, eos_token_id=[], use_cache=False
        )
        assert torch.equal(cached, full)


@pytest.mark.parametrize("family", sorted(FAMILY_WORKFLOWS))
def test_batched_generation_equals_one_by_one(bases, images, family):
    model = _build(bases, mm=FAMILY_WORKFLOWS[family])
    perturb(model, "mm")
    prompts = ["<image>\nwhat is this", "a red circle", "<image> left of <image> is what shape"]
    per_prompt = [[images[0]], [], [images[1], images[2]]]  # mixed image counts, one text-only
    batch = model.generate(prompt=prompts, images=per_prompt, task="mm", max_new_tokens=8, eos_token_id=[])
    for k, (p, imgs) in enumerate(zip(prompts, per_prompt)):
        single = model.generate(prompt=p, images=imgs or None, task="mm", max_new_tokens=8, eos_token_id=[])
        assert torch.equal(batch[k : k + 1], single), f"row {k}"

    # the logits agree within float tolerance too (left padding only changes summation order)
    inputs = model.prepare_inputs(prompts, per_prompt, task="mm")
    with torch.no_grad():
        logits = model(**inputs, task="mm").logits[:, -1]
        for k, (p, imgs) in enumerate(zip(prompts, per_prompt)):
            one = model.prepare_inputs(p, imgs or None, task="mm")
            torch.testing.assert_close(logits[k], model(**one, task="mm").logits[0, -1], atol=1e-5, rtol=1e-4)


def test_text_batched_generation_equals_one_by_one(bases):
    model = _build(bases)
    prompts = ["hello", "what colour is the big square"]
    batch = model.generate(prompt=prompts, task="text", max_new_tokens=8, eos_token_id=[])
    for k, p in enumerate(prompts):
        assert torch.equal(batch[k : k + 1], model.generate(prompt=p, task="text", max_new_tokens=8, eos_token_id=[]))


def test_sampling_is_seeded_and_respects_top_p(bases, images):
    model = _build(bases)
    kw = dict(prompt="<image> what", images=[images[0]], task="g", max_new_tokens=6, eos_token_id=[], do_sample=True)
    a = model.generate(**kw, temperature=0.8, top_p=0.9, seed=3)
    b = model.generate(**kw, temperature=0.8, top_p=0.9, seed=3)
    assert torch.equal(a, b)
    # top_p -> 0 keeps only the most likely token: sampling becomes greedy
    greedy = model.generate(prompt=kw["prompt"], images=kw["images"], task="g", max_new_tokens=6, eos_token_id=[])
    assert torch.equal(model.generate(**kw, top_p=1e-6, seed=5), greedy)


def test_eos_and_stop_strings(bases):
    model = _build(bases)
    free = model.generate(prompt="hello", task="text", max_new_tokens=8, eos_token_id=[])[0].tolist()
    # make the 3rd generated token the eos: generation stops right after it
    stopped = model.generate(prompt="hello", task="text", max_new_tokens=8, eos_token_id=free[2])[0].tolist()
    assert stopped == free[: free.index(free[2]) + 1]
    text = "".join(model.stream("hello", task="text", max_new_tokens=8, eos_token_id=[]))
    assert text == model.tokenizer.decode(free, skip_special_tokens=True)
    # a stop string whose start ends the text but that never completes: the held-back tail is flushed
    never = text[-1] + "\x00never"
    assert "".join(model.stream("hello", task="text", max_new_tokens=8, eos_token_id=[], stop=[never])) == text
    if len(text) > 3:
        stop = text[2:4]
        cut = "".join(model.stream("hello", task="text", max_new_tokens=8, eos_token_id=[], stop=[stop]))
        assert cut == text[: text.find(stop)]


def test_chat_uses_the_chat_template(bases, images):
    model = _build(bases)
    messages = [{"role": "user", "content": "<image>\nwhat is this"}]
    rendered = model.render_chat(messages)
    assert rendered == model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    answer = model.chat(messages, images=[images[0]], task="mm", max_new_tokens=5)
    pieces = list(model.chat(messages, images=[images[0]], task="mm", max_new_tokens=5, stream=True))
    assert isinstance(answer, str) and "".join(pieces) == answer


# --------------------------------------------------------------------------- frozen base
@pytest.mark.parametrize("family", sorted(FAMILY_WORKFLOWS))
def test_training_step_touches_only_the_workflow(bases, images, family):
    model = _build(bases, mm=FAMILY_WORKFLOWS[family], other=FAMILY_WORKFLOWS[family])
    base_sum, vis_sum, other_sum = _checksum(model.llm), _checksum(model.vision), _checksum(model.workflows["other"])
    params = model.trainable_parameters("mm")
    opt = torch.optim.AdamW(params, lr=1e-2)
    owned = {id(p) for p in model.workflows["mm"].parameters()}
    assert all(id(p) in owned for g in opt.param_groups for p in g["params"])
    assert sum(p.numel() for p in params) == sum(p.numel() for p in model.workflows["mm"].parameters())

    model.train()
    inputs = model.prepare_inputs(["<image>\na red circle"], [[images[0]]], task="mm")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    before = [p.detach().clone() for p in params]
    out = model(**inputs, labels=labels, task="mm")
    out.loss.backward()
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is None for p in model.vision.parameters())
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    assert _checksum(model.llm) == base_sum
    assert _checksum(model.vision) == vis_sum
    assert _checksum(model.workflows["other"]) == other_sum
    assert not model.llm.training


def test_llm_train_full_trains_a_copy_and_text_stays_base(bases, images):
    model = _build(bases, full={"family": "prefix", "llm_train": "full"})
    base_sum = _checksum(model.llm)
    assert "llm" in model.workflows["full"].parts()
    opt = torch.optim.SGD(model.trainable_parameters("full"), lr=0.1)
    inputs = model.prepare_inputs("<image> red", [images[0]], task="full")
    model(**inputs, labels=inputs["input_ids"].clamp(min=-100).masked_fill(inputs["input_ids"] < 0, -100),
          task="full").loss.backward()
    opt.step()
    assert _checksum(model.llm) == base_sum
    assert not torch.equal(
        model.workflows["full"].own_llm.lm_head.weight, model.llm.lm_head.weight
    )


def test_two_inner_adaptor_workflows_are_independent(bases, images):
    model = _build(bases, mm=FAMILY_WORKFLOWS["inner_adaptor"], g=FAMILY_WORKFLOWS["inner_adaptor"])
    inputs = model.prepare_inputs("<image> where is it", [images[0]], task="g")
    with torch.no_grad():
        mm_before = model(**inputs, task="mm").logits
        perturb(model, "g")
        assert torch.equal(model(**inputs, task="mm").logits, mm_before)
        assert not torch.equal(model(**inputs, task="g").logits, mm_before)
    assert not set(map(id, model.trainable_parameters("mm"))) & set(map(id, model.trainable_parameters("g")))


# --------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip(bases, images, tmp_path):
    model = _build(bases)
    perturb(model, "mm")
    perturb(model, "g", seed=2)
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert files == ["frozenvl.json", "workflow-g.safetensors", "workflow-mm.safetensors"]
    for task in ("mm", "g"):
        n_bytes = sum(p.numel() * p.element_size() for p in model.trainable_parameters(task))
        size = os.path.getsize(tmp_path / f"workflow-{task}.safetensors")
        assert n_bytes <= size < n_bytes + 64 * 1024  # trainable weights plus a small header, no base
    loaded = frozenvl.load(tmp_path)
    for task in ("text", "mm", "g"):
        imgs = None if task == "text" else [images[1]]
        prompt = "what is it" if task == "text" else "<image> what is it"
        inputs = model.prepare_inputs(prompt, imgs, task=task)
        with torch.no_grad():
            assert torch.equal(model(**inputs, task=task).logits, loaded(**inputs, task=task).logits)


def test_load_workflow_into_running_model(bases, images, tmp_path):
    src = _build(bases)
    perturb(src, "g")
    src.save_pretrained(tmp_path, tasks=["g"])
    running = _build(bases, mm=FAMILY_WORKFLOWS["prefix"])
    running.load_workflow(tmp_path, "g", as_name="ground")
    assert running.tasks == ["text", "mm", "ground"]
    inputs = src.prepare_inputs("<image> box", [images[0]], task="g")
    with torch.no_grad():
        assert torch.equal(src(**inputs, task="g").logits, running(**inputs, task="ground").logits)


def test_siglip_vision_and_no_cls(bases, images):
    model = _build(bases, "llama", "siglip", mm=FAMILY_WORKFLOWS["prefix"])
    assert model.tokens_per_image("mm") == model.vision.num_patches
    clip = _build(bases, mm=FAMILY_WORKFLOWS["prefix"], cls={"family": "prefix", "keep_cls": True})
    assert clip.tokens_per_image("cls") == clip.tokens_per_image("mm") + 1
    out = model.generate(prompt="<image> hi", images=[images[0]], task="mm", max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, 3)


# --------------------------------------------------------------------------- configs and errors
def test_insertion_rule_scales_iaa14():
    assert default_insertion_layers(32) == list(IAA14_LAYERS_32)
    # pairs evenly spaced from the first to the last layer, keeping ~7 pairs per 32 layers
    assert default_insertion_layers(16) == [0, 1, 5, 6, 9, 10, 14, 15]
    assert default_insertion_layers(8) == [0, 1, 6, 7]
    assert default_insertion_layers(4) == [0, 1]


def test_config_errors_list_what_exists(bases):
    llm, vis = bases()
    with pytest.raises(ConfigError, match="available families: .*inner_adaptor.*prefix"):
        frozenvl.build(llm, vis, workflows={"mm": {"family": "nope"}})
    with pytest.raises(ConfigError, match="unknown key.*'layrs'"):
        frozenvl.build(llm, vis, workflows={"mm": {"family": "inner_adaptor", "layrs": [0]}})
    with pytest.raises(ConfigError, match="reserved"):
        frozenvl.build(llm, vis, workflows={"text": {"family": "prefix"}})
    with pytest.raises(ValueError, match="unknown connector"):
        frozenvl.build(llm, vis, workflows={"mm": {"family": "prefix", "connector": "mlp2x_relu"}})
    with pytest.raises(ConfigError, match=r"need distinct indices in \[0, 3\]"):
        frozenvl.build(llm, vis, workflows={"mm": {"family": "inner_adaptor", "layers": [7]}})


def test_bad_inputs_get_clear_errors(bases, images, tmp_path):
    from frozenvl.vision.images import ImageError

    model = _build(bases)
    png = tmp_path / "ok.png"
    images[0].save(png)
    raw = png.read_bytes()
    (tmp_path / "trunc.png").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all")
    for name in ("trunc.png", "empty.png", "text.jpg"):
        with pytest.raises(ImageError, match=name):
            model.generate(prompt="<image> hi", images=[str(tmp_path / name)], task="mm", max_new_tokens=2)
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) but 1 image"):
        model.generate(prompt="<image> and <image>", images=[images[0]], task="mm", max_new_tokens=2)
    with pytest.raises(ValueError, match=r"unknown task 'nope'; available tasks: \['text', 'mm', 'g'\]"):
        model.generate(prompt="hi", task="nope", max_new_tokens=2)
    with pytest.raises(ValueError, match="takes no images"):
        model.generate(prompt="<image> hi", images=[images[0]], task="text", max_new_tokens=2)
    ids = model.tokenizer("hi", return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="takes no images"):
        model.generate(ids, images=[images[0]], task="text", max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the LLM's max_position_embeddings"):
        model.generate(prompt="red " * 5000, task="mm", max_new_tokens=2)


def test_model_dir_with_bases_inside_can_move(tmp_path, images):
    from frozenvl.tiny import build_tiny_bases

    llm, vis = build_tiny_bases(tmp_path / "model")
    model = frozenvl.build(llm, vis, workflows={"mm": FAMILY_WORKFLOWS["prefix"]})
    model.save_pretrained(tmp_path / "model")
    cfg = frozenvl.ModelConfig.load(tmp_path / "model")
    assert (cfg.llm, cfg.vision) == ("llm", "vision")
    (tmp_path / "model").rename(tmp_path / "moved")
    moved = frozenvl.load(tmp_path / "moved")
    inputs = model.prepare_inputs("<image> hi", [images[0]], task="mm")
    with torch.no_grad():
        assert torch.equal(moved(**inputs, task="mm").logits, model(**inputs, task="mm").logits)


def test_image_free_requests_fall_back_to_the_base(bases, images):
    model = _build(bases)
    perturb(model, "g")
    kw = dict(max_new_tokens=6, eos_token_id=[])
    text = model.generate(prompt="what is 3 plus 4", task="text", **kw)
    # inner_adaptor with text_fallback (the default for frozen-LLM workflows): exactly the base
    assert torch.equal(model.generate(prompt="what is 3 plus 4", task="g", **kw), text)
    assert model.chat([{"role": "user", "content": "hi"}], task="g", max_new_tokens=4) == model.chat(
        [{"role": "user", "content": "hi"}], task="text", max_new_tokens=4)
    # switched off, the adapted path answers (and differs, its weights being perturbed)
    model.workflows["g"].cfg.text_fallback = False
    assert not torch.equal(model.generate(prompt="what is 3 plus 4", task="g", **kw), text)
    # the LLaVA full fine-tune baseline has no fallback by default: one model for everything
    full = _build(bases, full={"family": "prefix", "llm_train": "full"})
    assert full.workflows["full"].cfg.text_fallback is False


# --------------------------------------------------------------------------- structure
def test_light_modules_import_without_transformers_or_families():
    """frozenvl.data.prompt and frozenvl.constants load neither transformers nor any family module."""
    import subprocess
    import sys

    code = ("import sys, frozenvl.data.prompt, frozenvl.constants; "
            "heavy = sorted(m for m in sys.modules if m.startswith(('frozenvl.families', 'frozenvl.model', "
            "'transformers'))); print(heavy); sys.exit(1 if heavy else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert frozenvl.constants.IMAGE_TOKEN_ID == IMAGE_TOKEN_ID == -200


def test_the_one_loss_mean_and_sum():
    from frozenvl.losses import causal_lm_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :3] = -100
    n = int((labels[:, 1:] != -100).sum())
    mean, total = causal_lm_loss(logits, labels), causal_lm_loss(logits, labels, reduction="sum")
    torch.testing.assert_close(total / n, mean)
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
    assert torch.equal(mean, manual) and mean > 0
    nothing = causal_lm_loss(logits, torch.full_like(labels, -100))
    assert nothing.item() == 0.0 and nothing.requires_grad  # no NaN, the graph is kept
