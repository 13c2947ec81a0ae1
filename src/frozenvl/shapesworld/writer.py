"""Write a ShapesWorld dataset: PNG images, LLaVA-format training JSON and evaluation JSONL.

Layout of ``out_dir``::

    images/train/00000.png ...      images/eval/00000.png ...
    train_mm.json          caption + vqa       (LLaVA list: {"id", "image", "conversations"})
    train_grounding.json   grounding
    train_mixed.json       caption + vqa + grounding
    pretrain_text.json     text tasks for pretraining the LLM (no "image", no "<image>")
    eval_caption.jsonl     {"id", "task", "qtype", "image", "question", "answer"} per line
    eval_vqa.jsonl
    eval_grounding.jsonl
    eval_text.jsonl        held-out text tasks (no "image")
    meta.json              seed, counts, vocabulary, prompts, version

Only the files of the requested ``tasks`` are written (``eval_text.jsonl`` and
``pretrain_text.json`` always are). Same arguments -> byte-identical files: every random choice
comes from ``random.Random`` streams seeded from ``seed``, JSON is written with sorted keys and
nothing depends on time, paths or the environment.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from ..data import boxes as B
from . import tasks as T
from .world import BACKGROUND, COLOURS, KINDS, LARGE_R, MIN_GAP, SIZES, SMALL_R, sample_scene

__all__ = ["FORMAT_VERSION", "corpus", "generate"]

FORMAT_VERSION = 1
IMAGE_TASKS = ("caption", "vqa", "grounding")
_OWNED = (
    "train_mm.json",
    "train_grounding.json",
    "train_mixed.json",
    "pretrain_text.json",
    "eval_caption.jsonl",
    "eval_vqa.jsonl",
    "eval_grounding.jsonl",
    "eval_text.jsonl",
    "meta.json",
)


def _dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=1) + "\n", encoding="utf-8")


def _dump_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")


def _conversation(sample_id: str, question: str, answer: str, image: str | None, task: str | None = None) -> dict:
    rec = {
        "id": sample_id,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}" if image else question},
            {"from": "gpt", "value": answer},
        ],
    }
    if image:
        rec["image"] = image
    if task:  # what the trainer's task_weights / loss weighting group samples by
        rec["task"] = task
    return rec


def _item_id(prefix: str, index: int, item: dict, seen: dict) -> str:
    base = f"{prefix}{index:05d}-{item['task']}-{item['qtype']}"
    k = seen.get(base, 0)
    seen[base] = k + 1
    return f"{base}-{k}"


def _image_split(out: Path, split: str, n: int, seed: int, image_size, tasks, fmt) -> list[tuple[str, int, dict]]:
    """Render ``n`` scenes of ``split`` -> ``[(image_rel_path, image_index, item)]``."""
    scene_rng = random.Random(f"shapesworld:{seed}:{split}:scenes")
    q_rng = random.Random(f"shapesworld:{seed}:{split}:questions")
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        scene = sample_scene(scene_rng, sizes=image_size)
        rel = f"images/{split}/{i:05d}.png"
        scene.render().save(out / rel, format="PNG", compress_level=1)
        for item in T.image_items(scene, q_rng, tasks, fmt):
            rows.append((rel, i, item))
    return rows


def _repeat_shuffled(items: list[dict], n: int, rng: random.Random) -> list[dict]:
    """``n`` items: seeded shuffled passes over ``items`` (each item once per pass), truncated."""
    out: list[dict] = []
    while len(out) < n and items:
        order = list(items)
        rng.shuffle(order)
        out += order
    return out[:n]


def _balanced_sample(items: list[dict], n: int | None, rng: random.Random) -> list[dict]:
    """Up to ``n`` items, round-robin over qtypes (seeded); all of them when ``n`` is None."""
    if n is None or n >= len(items):
        return list(items)
    by_type: dict[str, list[dict]] = {}
    for it in items:
        by_type.setdefault(it["qtype"], []).append(it)
    for group in by_type.values():
        rng.shuffle(group)
    picked: list[dict] = []
    while len(picked) < n:
        for qtype in sorted(by_type):
            if by_type[qtype] and len(picked) < n:
                picked.append(by_type[qtype].pop())
    order = {id(it): k for k, it in enumerate(items)}
    return sorted(picked, key=lambda it: order[id(it)])


def generate(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_train_images: int = 2000,
    n_eval_images: int = 200,
    n_text_train: int = 2000,
    n_text_eval: int | None = None,
    image_size: tuple[int, int] = (64, 128),
    tasks=IMAGE_TASKS,
    overwrite: bool = False,
    box_format: str = "unit",
) -> dict:
    """Write a dataset to ``out_dir`` (see the module docstring); returns paths and counts.

    * ``n_text_train``: items in ``pretrain_text.json``: seeded shuffled passes over every
      training text item (so with ``n_text_train`` >= the ``text_train_pool`` count in the result,
      every fact statement is seen at least once).
    * ``n_text_eval``: held-out text items in ``eval_text.jsonl``, a qtype-balanced seeded sample;
      None = all of them.
    * ``image_size``: (min, max) image side; width and height are drawn independently.
    * ``box_format``: how grounding answers write boxes (:func:`frozenvl.data.boxes.box_format`:
      ``unit`` = ``[0.12,0.30,0.25,0.43]``, ``int1000``, ``bins<N>``); other than ``unit``, each
      grounding eval row says it in a ``box_format`` key, so scoring reads the model's boxes in it.
    * ``overwrite``: an ``out_dir`` that already holds a dataset (``meta.json`` or ``images/``) raises
      FileExistsError unless True; then this module's files and ``images/`` are removed first.
    """
    if isinstance(tasks, str):
        tasks = (tasks,)
    unknown = {t for t in tasks if t not in IMAGE_TASKS}
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; valid: {IMAGE_TASKS}")
    tasks = tuple(t for t in IMAGE_TASKS if t in set(tasks))
    for name, v in (("n_train_images", n_train_images), ("n_eval_images", n_eval_images), ("n_text_train", n_text_train)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if n_text_eval is not None and int(n_text_eval) < 0:
        raise ValueError(f"n_text_eval must be >= 0 or None, got {n_text_eval}")
    image_size = (int(image_size[0]), int(image_size[1]))
    fmt = B.box_format(box_format)

    out = Path(out_dir)
    if (out / "meta.json").exists() or (out / "images").exists():
        if not overwrite:
            raise FileExistsError(f"{out}: already holds a ShapesWorld dataset (pass overwrite=True)")
        shutil.rmtree(out / "images", ignore_errors=True)
        for name in _OWNED:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    files: dict[str, str] = {}
    counts: dict[str, int] = {"train_images": int(n_train_images), "eval_images": int(n_eval_images)}

    # ---- images + multimodal training data
    train_rows = _image_split(out, "train", int(n_train_images), seed, image_size, tasks, fmt)
    seen: dict[str, int] = {}
    mm, grounding, mixed = [], [], []
    for rel, i, item in train_rows:
        rec = _conversation(_item_id("train", i, item, seen), item["question"], item["answer"], rel, item["task"])
        (grounding if item["task"] == "grounding" else mm).append(rec)
        mixed.append(rec)
    outputs = []
    if "caption" in tasks or "vqa" in tasks:
        outputs.append(("train_mm", mm))
    if "grounding" in tasks:
        outputs.append(("train_grounding", grounding))
    outputs.append(("train_mixed", mixed))
    for name, recs in outputs:
        _dump_json(out / f"{name}.json", recs)
        files[name] = str(out / f"{name}.json")
        counts[name] = len(recs)

    # ---- evaluation data
    eval_rows = _image_split(out, "eval", int(n_eval_images), seed, image_size, tasks, fmt)
    seen = {}
    by_task: dict[str, list[dict]] = {t: [] for t in tasks}
    for rel, i, item in eval_rows:
        row = dict(item, id=_item_id("eval", i, item, seen), image=rel)
        if item["task"] == "grounding" and fmt.name != "unit":
            row["box_format"] = fmt.name
        by_task[item["task"]].append(row)
    for task in tasks:
        name = f"eval_{task}"
        _dump_jsonl(out / f"{name}.jsonl", by_task[task])
        files[name] = str(out / f"{name}.jsonl")
        counts[name] = len(by_task[task])

    # ---- text tasks
    text_train, text_held = T.text_tasks(seed)
    pretrain = _repeat_shuffled(text_train, int(n_text_train), random.Random(f"shapesworld:{seed}:text-train"))
    recs = [_conversation(f"text{k:05d}-{it['qtype']}", it["question"], it["answer"], None) for k, it in enumerate(pretrain)]
    _dump_json(out / "pretrain_text.json", recs)
    files["pretrain_text"] = str(out / "pretrain_text.json")
    counts["pretrain_text"] = len(recs)
    counts["text_train_pool"] = len(text_train)
    counts["text_heldout_pool"] = len(text_held)

    held = _balanced_sample(text_held, n_text_eval, random.Random(f"shapesworld:{seed}:text-eval"))
    rows = [dict(it, id=f"textheld{k:05d}-{it['qtype']}") for k, it in enumerate(held)]
    _dump_jsonl(out / "eval_text.jsonl", rows)
    files["eval_text"] = str(out / "eval_text.jsonl")
    counts["eval_text"] = len(rows)

    # ---- meta
    meta = {
        "name": "shapesworld",
        "version": FORMAT_VERSION,
        "seed": seed,
        "image_size": list(image_size),
        "tasks": list(tasks),
        "counts": counts,
        "files": {k: os.path.relpath(v, out) for k, v in files.items()},
        "background": list(BACKGROUND),
        "small_r": list(SMALL_R),
        "large_r": list(LARGE_R),
        "min_gap": MIN_GAP,
        "left_margin": T.LEFT_MARGIN,
        "box_format": fmt.name,
        "box_format_note": "[x1,y1,x2,y2] of the shape's first/last pixel, on LLaVA's padded square "
        "(side=max(w,h), image centred), divided by side, written in box_format (frozenvl.data.boxes)",
        "prompts": {"caption": T.CAPTION_PROMPT, "grounding": T.GROUNDING_PROMPT},
        "vocabulary": {
            "colours": {k: list(v) for k, v in COLOURS.items()},
            "kinds": list(KINDS),
            "sizes": list(SIZES),
            "names": list(T.NAMES),
            "cities": list(T.CITIES),
            "pets": list(T.PETS),
            "words": list(T.WORDS),
            "days": list(T.DAYS),
            "months": list(T.MONTHS),
        },
        "facts": T.fact_world(),
    }
    _dump_json(out / "meta.json", meta)
    files["meta"] = str(out / "meta.json")
    return {"out_dir": str(out), "files": files, "counts": counts}


def corpus(out_dir: str | os.PathLike[str]) -> list[str]:
    """Every training text of a generated dataset, for training a tokenizer.

    Questions (without ``<image>``) and answers of ``pretrain_text.json``, ``train_mm.json`` and
    ``train_grounding.json`` (``train_mixed.json`` repeats them), in file order with repeats,
    then the vocabulary of ``meta.json``, the prompts, the letters and the digits, so every word
    and character of the world is covered. Evaluation files are not read.
    """
    out = Path(out_dir)
    texts: list[str] = []
    for name in ("pretrain_text.json", "train_mm.json", "train_grounding.json"):
        path = out / name
        if not path.exists():
            continue
        for rec in json.loads(path.read_text(encoding="utf-8")):
            for turn in rec["conversations"]:
                texts.append(turn["value"].replace("<image>\n", "").replace("<image>", ""))
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    vocab = meta["vocabulary"]
    for key in sorted(vocab):
        values = vocab[key]
        texts.append(" ".join(values if isinstance(values, list) else list(values)))
    texts += list(meta["prompts"].values())
    texts.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 [ ] , . ? ' -")
    return texts
