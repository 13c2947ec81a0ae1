"""Tiny base models for ShapesWorld, built by frozenvl itself (no hub weights exist here).

- a byte-level BPE tokenizer trained on the world's text, with a ChatML template;
- a small Llama-style LLM pretrained on text-only tasks in chat format: arithmetic, facts of a
  made-up world, word games, and questions about scenes *described in words* (so the LLM knows the
  language of shapes, colours and boxes before it ever sees a pixel — as a real LLM does);
- a small CLIP-style ViT pretrained to tell, for every patch, which (colour, kind) and size of
  shape covers it.

Each is saved with `save_pretrained` and loaded back through the same path as hub models. Builds
are cached under `root/bases-<hash of the spec>` (so `--seeds N` and reruns reuse them) and
reproducible from the seed. Each build is probed once (cached with it): per-attribute linear probes
on the ViT's patch features (:func:`probe_vit`) and the LLM's accuracy on scenes described in
words (:func:`probe_llm`), the ceiling of every frozen-LLM workflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..data.boxes import box_format, to_square_box
from ..data.dataset import ConversationDataset, ModalityLengthGroupedSampler, collate
from ..losses import label_positions, selected_lm_loss
from ..tiny import build_llm, build_tokenizer
from ..vision.images import ImagePreprocessor, expand_to_square
from . import tasks as sw_tasks
from .jobs import JOB_THREADS, Job, job_threads, run_jobs
from .probes import linear_probes
from .world import COLOURS, KINDS, SIZES, sample_scene

SCENE_PROMPT = "Scene: {}.\n{}"
#: Part of the bases' cache key: raised whenever the pretraining code changes its arithmetic, so that
#: bases cached by an earlier version are rebuilt rather than mixed with its results.
#: 2: the LLM's head is computed at answer positions only.
PRETRAIN_VERSION = 2


@dataclass(frozen=True)
class BaseSpec:
    seed: int = 0
    vocab_size: int = 768
    llm_hidden: int = 128
    llm_layers: int = 4
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 384
    # measured (docs/shapesworld.md, "The bases"): at lr 3e-3 the LLM never learns to look a shape up in
    # the description (it answers each question type's most common word); at 1e-3 it does, after ~2000 steps
    llm_steps: int = 3000
    llm_batch: int = 16
    llm_lr: float = 1e-3
    n_scene_texts: int = 9000  # ~900 distinct scenes: fewer are memorised instead of read
    text_repeat: int = 2  # the text tasks twice per pass, so the scene texts do not crowd them out
    vit_image: int = 64
    vit_patch: int = 8
    vit_hidden: int = 64
    vit_layers: int = 3
    vit_heads: int = 4
    vit_steps: int = 1500  # shape kind needs it: 1000 steps at 3e-3 probe 54%, 1500 at 6e-3 95% (measured)
    vit_batch: int = 32
    vit_lr: float = 6e-3
    vit_pool: int = 2048  # scenes rendered once and cycled through (rendering per step cost most of the time)
    vit_box_weight: float = 1.0  # box loss vs the class losses: 0 -> no box in the features, 5 -> kind learnt slower (measured)
    box_format: str = "unit"  # how boxes are written in the scene descriptions and answers
    probe_vit_scenes: int = 400
    probe_llm_scenes: int = 60

    def key(self) -> str:
        # the thread count changes float sums, so bases built on other thread counts are other bases
        blob = json.dumps({**dataclasses.asdict(self), "threads": JOB_THREADS, "version": PRETRAIN_VERSION},
                          sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def describe_scene(scene, fmt: str | None = None, boxes: bool = True) -> str:
    """The scene in words, left to right: what the text-only pretraining reads. With `boxes`,
    each shape's box follows it (in box format `fmt`), as grounding questions need; without,
    the description is a third as long (VQA and captions need only the order)."""
    f = box_format(fmt)
    return "; ".join(
        f"a {s.size} {s.colour} {s.kind}"
        + (f" at {f.render(to_square_box(s.bbox(), scene.width, scene.height))}" if boxes else "")
        for s in sw_tasks.canonical_order(scene)
    )


def scene_text_records(n: int, seed: int, fmt: str | None = None) -> list[dict]:
    """Text-only chats about described scenes (vqa, caption and grounding questions); only the
    grounding questions' descriptions carry boxes."""
    rng = random.Random(f"shapesworld:{seed}:scene-texts")
    out = []
    while len(out) < n:
        scene = sample_scene(rng)
        plain, boxed = describe_scene(scene, fmt, boxes=False), describe_scene(scene, fmt)
        for item in sw_tasks.image_items(scene, rng, fmt=fmt):
            desc = boxed if item["task"] == "grounding" else plain
            out.append({
                "id": f"scene-text-{len(out)}", "task": f"scene-{item['task']}",
                "conversations": [
                    {"from": "human", "value": SCENE_PROMPT.format(desc, item["question"])},
                    {"from": "gpt", "value": item["answer"]},
                ],
            })
    return out[:n]


def build_bases(root: str | os.PathLike, data_dir: str | os.PathLike, spec: BaseSpec = BaseSpec(),
                progress: bool = True, jobs: int = 1) -> tuple[str, str]:
    """Build (or reuse) the tokenizer + LLM and the ViT; returns (llm_dir, vision_dir). The LLM's
    and the ViT's pretraining are two jobs (shapesworld/jobs.py): with ``jobs >= 2`` they run at
    once, each on one thread; the bases are the same either way."""
    home = os.path.join(os.fspath(root), f"bases-{spec.key()}")
    llm_dir, vision_dir = os.path.join(home, "llm"), os.path.join(home, "vision")
    marker = os.path.join(home, "done.json")
    if os.path.isfile(marker):
        return llm_dir, vision_dir
    if os.path.isdir(home):
        shutil.rmtree(home)  # a half-built earlier attempt
    os.makedirs(home)
    from .writer import corpus

    scene_texts = scene_text_records(spec.n_scene_texts, spec.seed, spec.box_format)
    texts = corpus(data_dir) + [t["value"] for r in scene_texts for t in r["conversations"]]
    tok_dir = os.path.join(home, "tokenizer")
    build_tokenizer(tok_dir, template="chatml", vocab_size=spec.vocab_size, corpus=texts)
    build_llm(llm_dir, arch="llama", tokenizer_dir=tok_dir, hidden_size=spec.llm_hidden,
              num_layers=spec.llm_layers, num_heads=spec.llm_heads, num_kv_heads=spec.llm_kv_heads,
              intermediate_size=spec.llm_intermediate, max_position_embeddings=512, seed=spec.seed)
    with open(os.path.join(data_dir, "pretrain_text.json")) as f:
        records = json.load(f) * spec.text_repeat + scene_texts
    pretrain_path = os.path.join(home, "pretrain_llm.json")
    with open(pretrain_path, "w") as f:
        json.dump(records, f)
    llm_stats, vit_stats = run_jobs([Job("pretrain LLM", pretrain_llm, (llm_dir, pretrain_path, spec, progress)),
                                     Job("pretrain ViT", pretrain_vit, (vision_dir, spec, progress))], jobs)
    with job_threads():  # the probes too: their figures must not depend on the machine's thread count
        probes = {"vit": probe_vit(vision_dir, spec, spec.probe_vit_scenes),
                  "llm": probe_llm(llm_dir, spec, spec.probe_llm_scenes)}
    with open(marker, "w") as f:
        json.dump({"spec": dataclasses.asdict(spec), "llm": llm_stats, "vit": vit_stats, "probes": probes}, f,
                  indent=1)
    return llm_dir, vision_dir


def base_info(llm_dir: str) -> dict:
    """What build_bases recorded for these bases: spec, pretraining stats and the probes."""
    with open(os.path.join(os.path.dirname(llm_dir), "done.json")) as f:
        return json.load(f)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_llm(llm_dir: str, data_path: str, spec: BaseSpec, progress: bool = True) -> dict:
    """Plain causal-LM pretraining on chat data, loss on assistant tokens only, averaged per
    sample (each answer weighs alike: a box answer's many tokens do not drown one-word answers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(spec.seed)
    tok = AutoTokenizer.from_pretrained(llm_dir)
    model = AutoModelForCausalLM.from_pretrained(llm_dir)
    ds = ConversationDataset(data_path, tokenizer=tok, tokens_per_image=0, preprocessor=None, max_length=256)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.llm_lr, weight_decay=0.01)
    # batches of similar length (short text tasks beside long scene descriptions): ~2x less padding
    sampler = ModalityLengthGroupedSampler(ds.lengths, [False] * len(ds), spec.llm_batch, seed=spec.seed)
    pending: list[list[int]] = []
    model.train()
    losses = []
    bar = tqdm(range(spec.llm_steps), desc="pretrain LLM", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if not pending:
            sampler.set_epoch(sampler.epoch + 1)
            pending = [b for b in sampler.batches() if len(b) == spec.llm_batch]
        batch = collate([ds[i] for i in pending.pop(0)], tok.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = spec.llm_lr * _cosine(step, spec.llm_steps, spec.llm_steps // 20)
        # the head only where an answer token is predicted (most tokens are the prompt)
        keep, targets = label_positions(batch["labels"])
        h = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ce = selected_lm_loss(model.lm_head(h[keep]), targets, reduction="none")
        per_row = keep.sum(1)
        loss = (ce / per_row.repeat_interleave(per_row)).sum() / len(per_row)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.save_pretrained(llm_dir)
    return {"steps": spec.llm_steps, "first_loss": losses[0], "final_loss": sum(losses[-20:]) / len(losses[-20:])}


_NUMBER_WORDS = {"1": "one", "2": "two", "3": "three", "4": "four"}


def names_only_the_answer(text: str, answer: str, candidates: set[str]) -> float:
    """1.0 when `text` names `answer` (as whole words; a count also as a number word) and no other
    of the question type's `candidates`, else 0.0: how a sentence answer ("The circle is red.")
    is scored, where an exact match would score every sentence 0."""
    def named(a: str) -> bool:
        forms = [a] + ([_NUMBER_WORDS[a]] if a in _NUMBER_WORDS else [])
        return any(re.search(rf"\b{re.escape(f)}\b", text.lower()) for f in forms)

    return float(named(answer) and not any(named(c) for c in candidates - {answer}))


@torch.no_grad()
def probe_llm(llm_dir: str, spec: BaseSpec, n_scenes: int = 60, batch: int = 64,
              sentences: bool = False) -> dict[str, float]:
    """The LLM's VQA accuracy per question type, and its grounding Acc@0.5 (``box``: copying the
    box out of the description, in the spec's box format), on fresh scenes *described in words*
    (greedy answers): the ceiling of any workflow that keeps this LLM frozen. `sentences`: score a
    VQA answer by :func:`names_only_the_answer` instead of an exact match (a chat model that was not
    trained on the answer format answers in sentences)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..eval import grounding_scores, vqa_accuracy

    tok = AutoTokenizer.from_pretrained(llm_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    rng = random.Random(f"shapesworld:{spec.seed}:llm-probe")
    items = []
    for _ in range(n_scenes):
        scene = sample_scene(rng)
        plain, boxed = describe_scene(scene, spec.box_format, boxes=False), describe_scene(scene, spec.box_format)
        items += [(it["qtype"], SCENE_PROMPT.format(plain, it["question"]), it["answer"])
                  for it in sw_tasks.vqa_items(scene, rng)]
        items += [(it["qtype"], SCENE_PROMPT.format(boxed, it["question"]), it["answer"])
                  for it in sw_tasks.grounding_items(scene, spec.box_format)]
    candidates: dict[str, set[str]] = {}
    for qtype, _, answer in items:
        candidates.setdefault(qtype, set()).add(answer)
    scores: dict[str, list[float]] = {}
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                   for _, q, _ in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        for (qtype, _, answer), ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(ids, skip_special_tokens=True)
            if qtype == "box":
                score = grounding_scores(text, answer, box_format=spec.box_format)[1]
            elif sentences:
                score = names_only_the_answer(text, answer, candidates[qtype])
            else:
                score = vqa_accuracy(text, answer)
            scores.setdefault(qtype, []).append(score)
    result = {q: sum(v) / len(v) for q, v in sorted(scores.items())}
    vqa = [v for q, vs in scores.items() if q != "box" for v in vs]
    result["overall"] = sum(vqa) / len(vqa)  # VQA only; "box" is grounding
    return result


# ------------------------------------------------------------------------------------ the ViT
CLASSES = [(c, k) for c in COLOURS for k in KINDS]  # patch label = 1 + index; 0 = background
#: a patch is labelled with the shape covering most of it, if that shape covers this share of it
MIN_COVER = 0.15


def _index_map(scene, side: int) -> np.ndarray:
    """(side, side) map of 1 + the index of the shape under each pixel (0: background), drawn
    with the image's own geometry, padded to the square and resized like the image."""
    m = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(m)
    for i, s in enumerate(scene.shapes):
        x1, y1, x2, y2 = s.bbox()
        if s.kind == "square":
            draw.rectangle([x1, y1, x2, y2], fill=i + 1)
        elif s.kind == "circle":
            draw.ellipse([x1, y1, x2, y2], fill=i + 1)
        else:
            draw.polygon([(s.cx, y1), (x1, y2), (x2, y2)], fill=i + 1)
    m = expand_to_square(m.convert("RGB"), (0, 0, 0)).convert("L")
    return np.asarray(m.resize((side, side), Image.NEAREST))


def patch_targets(scene, image: int, patch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patch: (colour, kind) class (0 = background), size class (0 = background) and the
    covering shape's box on the padded square in 0-1 (zeros on background patches)."""
    grid = image // patch
    idx = _index_map(scene, image).reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    cls = np.zeros(grid * grid, np.int64)
    size = np.zeros(grid * grid, np.int64)
    box = np.zeros((grid * grid, 4), np.float32)
    for i, s in enumerate(scene.shapes):
        cover = (idx == i + 1).mean(1)
        others = np.stack([(idx == j + 1).mean(1) for j in range(len(scene.shapes))], 1).max(1)
        mine = (cover >= MIN_COVER) & (cover >= others)
        cls[mine] = 1 + CLASSES.index((s.colour, s.kind))
        size[mine] = 1 + SIZES.index(s.size)
        box[mine] = to_square_box(s.bbox(), scene.width, scene.height)
    return cls, size, box


class _PatchHeads(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.cls = torch.nn.Linear(hidden, 1 + len(CLASSES))
        self.size = torch.nn.Linear(hidden, 1 + len(SIZES))
        self.box = torch.nn.Linear(hidden, 4)


def _vit_preprocessor(spec: BaseSpec) -> ImagePreprocessor:
    return ImagePreprocessor(size=(spec.vit_image, spec.vit_image), image_mean=(0.5, 0.5, 0.5),
                             image_std=(0.5, 0.5, 0.5), mode="pad")


def _scene_pool(n: int, rng: random.Random, spec: BaseSpec) -> tuple[list, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` scenes rendered once: (scenes, pixels, class, size and box targets per patch)."""
    pre = _vit_preprocessor(spec)
    scenes = [sample_scene(rng) for _ in range(n)]
    pixels = torch.cat([pre([s.render() for s in scenes[i : i + 256]]) for i in range(0, n, 256)])
    targets = [patch_targets(s, spec.vit_image, spec.vit_patch) for s in scenes]
    cls, size, box = (torch.from_numpy(np.stack([t[k] for t in targets])) for k in range(3))
    return scenes, pixels, cls, size, box


def pretrain_vit(vision_dir: str, spec: BaseSpec, progress: bool = True) -> dict:
    """Train a tiny CLIP vision tower to tell, for every patch, the (colour, kind) and size of the
    shape covering it and that shape's box: so its patch features say what and where each shape is."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(spec.seed)
    cfg = CLIPVisionConfig(image_size=spec.vit_image, patch_size=spec.vit_patch, hidden_size=spec.vit_hidden,
                           intermediate_size=2 * spec.vit_hidden, num_hidden_layers=spec.vit_layers,
                           num_attention_heads=spec.vit_heads)
    vit = CLIPVisionModel(cfg)
    heads = _PatchHeads(spec.vit_hidden)
    rng = random.Random(f"shapesworld:{spec.seed}:vit")
    _, pixels, cls_all, size_all, box_all = _scene_pool(spec.vit_pool, rng, spec)
    params = list(vit.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=spec.vit_lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(spec.seed)
    order: list[int] = []
    vit.train()
    accs = []
    bar = tqdm(range(spec.vit_steps), desc="pretrain ViT", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if len(order) < spec.vit_batch:
            order += torch.randperm(len(pixels), generator=g).tolist()
        idx, order = order[: spec.vit_batch], order[spec.vit_batch :]
        cls_t, size_t, box_t = cls_all[idx], size_all[idx], box_all[idx]
        for group in opt.param_groups:
            group["lr"] = spec.vit_lr * _cosine(step, spec.vit_steps, spec.vit_steps // 20)
        feats = vit(pixel_values=pixels[idx]).last_hidden_state[:, 1:]
        lc, ls = heads.cls(feats), heads.size(feats)
        fg = cls_t > 0
        loss = F.cross_entropy(lc.reshape(-1, lc.shape[-1]), cls_t.reshape(-1)) + F.cross_entropy(
            ls.reshape(-1, ls.shape[-1]), size_t.reshape(-1))
        if fg.any():
            loss = loss + spec.vit_box_weight * F.smooth_l1_loss(heads.box(feats)[fg], box_t[fg], beta=0.02)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        accs.append(float((lc.argmax(-1)[fg] == cls_t[fg]).float().mean()) if fg.any() else 0.0)
        bar.set_postfix(loss=f"{loss.item():.3f}", fg_acc=f"{accs[-1]:.2f}")
    vit.eval()
    vit.save_pretrained(vision_dir)
    with open(os.path.join(vision_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"size": {"height": spec.vit_image, "width": spec.vit_image}, "image_mean": [0.5] * 3,
                   "image_std": [0.5] * 3, "resample": 3, "rescale_factor": 1 / 255,
                   "image_processor_type": "CLIPImageProcessor"}, f, indent=1)
    return {"steps": spec.vit_steps, "foreground_patch_acc": sum(accs[-20:]) / len(accs[-20:])}


# ------------------------------------------------------------------------------------ probes


@torch.no_grad()
def probe_vit(vision_dir: str, spec: BaseSpec, n_scenes: int = 400, layer: int = -1) -> dict[str, float]:
    """The tiny ViT's :func:`frozenvl.shapesworld.probes.linear_probes` on fresh scenes: per shape,
    from the patch under its centre, colour, kind, size and box; per image, the count."""
    from transformers import CLIPVisionModel

    vit = CLIPVisionModel.from_pretrained(vision_dir).eval()
    scenes, pixels, *_ = _scene_pool(n_scenes, random.Random(f"shapesworld:{spec.seed}:vit-probe"), spec)
    feats = torch.cat([vit(pixel_values=pixels[i : i + 128], output_hidden_states=True).hidden_states[layer][:, 1:]
                       for i in range(0, len(pixels), 128)])
    return linear_probes(scenes, feats, spec.vit_image // spec.vit_patch)
