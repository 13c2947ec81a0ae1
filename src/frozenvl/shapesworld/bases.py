"""Tiny base models for ShapesWorld, built by frozenvl itself (no hub weights exist here).

- a byte-level BPE tokenizer trained on the world's text, with a ChatML template;
- a small Llama-style LLM pretrained on text-only tasks in chat format: arithmetic, facts of a
  made-up world, word games, and questions about scenes *described in words* (so the LLM knows the
  language of shapes, colours and boxes before it ever sees a pixel — as a real LLM does);
- a small CLIP-style ViT pretrained to tell, for every patch, which (colour, kind) and size of
  shape covers it.

Each is saved with `save_pretrained` and loaded back through the same path as hub models. Builds
are cached under `root/<hash of the spec>` and reproducible from the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..data.boxes import format_box, to_square_box
from ..data.dataset import ConversationDataset, collate
from ..tiny import build_llm, build_tokenizer
from ..vision.images import ImagePreprocessor, expand_to_square
from . import tasks as sw_tasks
from .world import COLOURS, KINDS, SIZES, sample_scene

SCENE_PROMPT = "Scene: {}.\n{}"


@dataclass(frozen=True)
class BaseSpec:
    seed: int = 0
    vocab_size: int = 768
    llm_hidden: int = 128
    llm_layers: int = 4
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 384
    llm_steps: int = 1200
    llm_batch: int = 32
    llm_lr: float = 3e-3
    n_scene_texts: int = 3000
    vit_image: int = 64
    vit_patch: int = 8
    vit_hidden: int = 64
    vit_layers: int = 3
    vit_heads: int = 4
    vit_steps: int = 300
    vit_batch: int = 32
    vit_lr: float = 2e-3

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def describe_scene(scene) -> str:
    """The scene in words, with each shape's box: what the text-only pretraining reads."""
    return "; ".join(
        f"a {s.size} {s.colour} {s.kind} at {format_box(to_square_box(s.bbox(), scene.width, scene.height))}"
        for s in sw_tasks.canonical_order(scene)
    )


def scene_text_records(n: int, seed: int) -> list[dict]:
    """Text-only chats about described scenes (vqa, caption and grounding questions)."""
    rng = random.Random(f"shapesworld:{seed}:scene-texts")
    out = []
    while len(out) < n:
        scene = sample_scene(rng)
        desc = describe_scene(scene)
        for item in sw_tasks.image_items(scene, rng):
            out.append({
                "id": f"scene-text-{len(out)}",
                "conversations": [
                    {"from": "human", "value": SCENE_PROMPT.format(desc, item["question"])},
                    {"from": "gpt", "value": item["answer"]},
                ],
            })
    return out[:n]


def build_bases(root: str | os.PathLike, data_dir: str | os.PathLike, spec: BaseSpec = BaseSpec(),
                progress: bool = True) -> tuple[str, str]:
    """Build (or reuse) the tokenizer + LLM and the ViT; returns (llm_dir, vision_dir)."""
    home = os.path.join(os.fspath(root), f"bases-{spec.key()}")
    llm_dir, vision_dir = os.path.join(home, "llm"), os.path.join(home, "vision")
    marker = os.path.join(home, "done.json")
    if os.path.isfile(marker):
        return llm_dir, vision_dir
    if os.path.isdir(home):
        shutil.rmtree(home)  # a half-built earlier attempt
    os.makedirs(home)
    from .writer import corpus

    scene_texts = scene_text_records(spec.n_scene_texts, spec.seed)
    texts = corpus(data_dir) + [t["value"] for r in scene_texts for t in r["conversations"]]
    tok_dir = os.path.join(home, "tokenizer")
    build_tokenizer(tok_dir, template="chatml", vocab_size=spec.vocab_size, corpus=texts)
    build_llm(llm_dir, arch="llama", tokenizer_dir=tok_dir, hidden_size=spec.llm_hidden,
              num_layers=spec.llm_layers, num_heads=spec.llm_heads, num_kv_heads=spec.llm_kv_heads,
              intermediate_size=spec.llm_intermediate, max_position_embeddings=512, seed=spec.seed)
    with open(os.path.join(data_dir, "pretrain_text.json")) as f:
        records = json.load(f) + scene_texts
    pretrain_path = os.path.join(home, "pretrain_llm.json")
    with open(pretrain_path, "w") as f:
        json.dump(records, f)
    llm_stats = pretrain_llm(llm_dir, pretrain_path, spec, progress)
    vit_stats = pretrain_vit(vision_dir, spec, progress)
    with open(marker, "w") as f:
        json.dump({"spec": dataclasses.asdict(spec), "llm": llm_stats, "vit": vit_stats}, f, indent=1)
    return llm_dir, vision_dir


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_llm(llm_dir: str, data_path: str, spec: BaseSpec, progress: bool = True) -> dict:
    """Plain causal-LM pretraining on chat data, loss on assistant tokens only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(spec.seed)
    tok = AutoTokenizer.from_pretrained(llm_dir)
    model = AutoModelForCausalLM.from_pretrained(llm_dir)
    ds = ConversationDataset(data_path, tokenizer=tok, tokens_per_image=0, preprocessor=None, max_length=256)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.llm_lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(spec.seed)
    order: list[int] = []
    model.train()
    losses = []
    bar = tqdm(range(spec.llm_steps), desc="pretrain LLM", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if len(order) < spec.llm_batch:
            order += torch.randperm(len(ds), generator=g).tolist()
        idx, order = order[: spec.llm_batch], order[spec.llm_batch :]
        batch = collate([ds[i] for i in idx], tok.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = spec.llm_lr * _cosine(step, spec.llm_steps, spec.llm_steps // 20)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.save_pretrained(llm_dir)
    return {"steps": spec.llm_steps, "first_loss": losses[0], "final_loss": sum(losses[-20:]) / len(losses[-20:])}


# ------------------------------------------------------------------------------------ the ViT
CLASSES = [(c, k) for c in COLOURS for k in KINDS]  # patch label = 1 + index; 0 = background


def _label_maps(scene, side: int) -> tuple[Image.Image, Image.Image]:
    """Per-pixel class and size maps drawn with the same geometry as the image, padded to square."""
    cls = Image.new("L", (scene.width, scene.height), 0)
    size = Image.new("L", (scene.width, scene.height), 0)
    dc, ds = ImageDraw.Draw(cls), ImageDraw.Draw(size)
    for s in scene.shapes:
        x1, y1, x2, y2 = s.bbox()
        for draw, value in ((dc, 1 + CLASSES.index((s.colour, s.kind))), (ds, 1 + SIZES.index(s.size))):
            if s.kind == "square":
                draw.rectangle([x1, y1, x2, y2], fill=value)
            elif s.kind == "circle":
                draw.ellipse([x1, y1, x2, y2], fill=value)
            else:
                draw.polygon([(s.cx, y1), (x1, y2), (x2, y2)], fill=value)
    out = []
    for m in (cls, size):
        m = expand_to_square(m.convert("RGB"), (0, 0, 0)).convert("L")
        out.append(m.resize((side, side), Image.NEAREST))
    return out[0], out[1]


class _PatchHeads(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.cls = torch.nn.Linear(hidden, 1 + len(CLASSES))
        self.size = torch.nn.Linear(hidden, 1 + len(SIZES))


def pretrain_vit(vision_dir: str, spec: BaseSpec, progress: bool = True) -> dict:
    """Train a tiny CLIP vision tower to label every patch with the (colour, kind) and size under it."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(spec.seed)
    cfg = CLIPVisionConfig(image_size=spec.vit_image, patch_size=spec.vit_patch, hidden_size=spec.vit_hidden,
                           intermediate_size=2 * spec.vit_hidden, num_hidden_layers=spec.vit_layers,
                           num_attention_heads=spec.vit_heads)
    vit = CLIPVisionModel(cfg)
    heads = _PatchHeads(spec.vit_hidden)
    pre = ImagePreprocessor(size=(spec.vit_image, spec.vit_image), image_mean=(0.5, 0.5, 0.5),
                            image_std=(0.5, 0.5, 0.5), mode="pad")
    grid = spec.vit_image // spec.vit_patch
    centres = [spec.vit_patch // 2 + spec.vit_patch * i for i in range(grid)]
    rng = random.Random(f"shapesworld:{spec.seed}:vit")
    params = list(vit.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=spec.vit_lr, weight_decay=0.01)
    vit.train()
    accs = []
    bar = tqdm(range(spec.vit_steps), desc="pretrain ViT", disable=not progress, dynamic_ncols=True)
    for step in bar:
        scenes = [sample_scene(rng) for _ in range(spec.vit_batch)]
        pixels = pre([s.render() for s in scenes])
        cls_t, size_t = [], []
        for s in scenes:
            cm, sm = _label_maps(s, spec.vit_image)
            cls_t.append([cm.getpixel((x, y)) for y in centres for x in centres])
            size_t.append([sm.getpixel((x, y)) for y in centres for x in centres])
        cls_t, size_t = torch.tensor(cls_t), torch.tensor(size_t)
        for group in opt.param_groups:
            group["lr"] = spec.vit_lr * _cosine(step, spec.vit_steps, spec.vit_steps // 20)
        feats = vit(pixel_values=pixels).last_hidden_state[:, 1:]
        lc, ls = heads.cls(feats), heads.size(feats)
        loss = F.cross_entropy(lc.reshape(-1, lc.shape[-1]), cls_t.reshape(-1)) + F.cross_entropy(
            ls.reshape(-1, ls.shape[-1]), size_t.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        fg = cls_t > 0
        accs.append(float((lc.argmax(-1)[fg] == cls_t[fg]).float().mean()) if fg.any() else 0.0)
        bar.set_postfix(loss=f"{loss.item():.3f}", fg_acc=f"{accs[-1]:.2f}")
    vit.eval()
    vit.save_pretrained(vision_dir)
    with open(os.path.join(vision_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"size": {"height": spec.vit_image, "width": spec.vit_image}, "image_mean": [0.5] * 3,
                   "image_std": [0.5] * 3, "resample": 3, "rescale_factor": 1 / 255,
                   "image_processor_type": "CLIPImageProcessor"}, f, indent=1)
    return {"steps": spec.vit_steps, "foreground_patch_acc": sum(accs[-20:]) / len(accs[-20:])}
