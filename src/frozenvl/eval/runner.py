"""Run a workflow over an evaluation set and score it.

An evaluation file is JSON Lines, one item a line::

    {"id": "q1", "task": "vqa", "qtype": "colour", "image": "img/1.png",
     "question": "what colour is the car?", "answer": ["red", "red", ...]}

``task`` is the kind of item ("vqa", "grounding", "caption" or "text"), which decides the metric;
it is unrelated to the workflow (:func:`evaluate`'s ``task``) that answers it. ``image`` is a path
relative to the file's folder (or to ``image_root``). ``answer`` is a string or a list of strings
(VQA: the human answers; caption: the references); for grounding it is a ``[x1,y1,x2,y2]`` box,
as a string or 4 numbers.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..data.prompt import IMAGE_PLACEHOLDER, count_placeholders
from ..generation import eos_token_ids
from ..vision.images import ImageError, load_image
from .metrics import _gt_box, bleu, cider_d_scores, exact_match, grounding_scores, vqa_accuracy

if TYPE_CHECKING:
    from ..model import FrozenVLModel

__all__ = ["ITEM_KINDS", "EvalReport", "evaluate", "read_eval_file", "text_preservation"]

ITEM_KINDS = ("vqa", "grounding", "caption", "text")

# Reasons an item is not run, as they appear in EvalReport.skipped.
SKIP_NEEDS_IMAGE = "needs_image"
SKIP_MISSING_IMAGE = "missing_image"
SKIP_BAD_IMAGE = "bad_image"
_SKIP_EXPLAINED = {
    SKIP_NEEDS_IMAGE: "items with an image, skipped: the {task!r} workflow cannot see images",
    SKIP_MISSING_IMAGE: "items whose image file is missing",
    SKIP_BAD_IMAGE: "items whose image file cannot be decoded",
}


# ----------------------------------------------------------------------------- items


def _validate_item(raw: Any, where: str, base_dir: str | None) -> dict[str, Any]:
    """Check one item and return a normalised copy (absolute image path, str id)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: an item must be a JSON object, got {type(raw).__name__}")
    for key in ("id", "task", "question", "answer"):
        if key not in raw:
            raise ValueError(f"{where}: missing field {key!r}")
    item = dict(raw)
    if not isinstance(item["id"], (str, int)) or isinstance(item["id"], bool):
        raise ValueError(f"{where}: 'id' must be a string or an integer, got {item['id']!r}")
    item["id"] = str(item["id"])
    if item["task"] not in ITEM_KINDS:
        raise ValueError(f"{where}: 'task' must be one of {list(ITEM_KINDS)}, got {item['task']!r}")
    if not isinstance(item["question"], str):
        raise ValueError(f"{where}: 'question' must be a string")
    if item.get("qtype") is not None and not isinstance(item["qtype"], str):
        raise ValueError(f"{where}: 'qtype' must be a string")
    answer = item["answer"]
    if item["task"] == "grounding":
        try:
            _gt_box(answer, item.get("box_format"))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: grounding 'answer' must be a [x1,y1,x2,y2] box ({exc})") from None
    elif isinstance(answer, list):
        if not answer or not all(isinstance(a, str) for a in answer):
            raise ValueError(f"{where}: 'answer' must be a string or a non-empty list of strings")
    elif not isinstance(answer, str):
        raise ValueError(f"{where}: 'answer' must be a string or a non-empty list of strings")
    image = item.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: 'image' must be a path (string)")
        if not os.path.isabs(image):
            image = os.path.join(base_dir if base_dir is not None else os.getcwd(), image)
        item["image"] = os.path.normpath(image)
    else:
        item.pop("image", None)
    n_ph = count_placeholders(item["question"])
    if n_ph > (1 if image is not None else 0):
        raise ValueError(
            f"{where}: the question has {n_ph} {IMAGE_PLACEHOLDER} placeholder(s) for "
            f"{1 if image is not None else 0} image(s)"
        )
    return item


def _check_unique(items: Sequence[dict[str, Any]], source: str) -> None:
    seen: set[str] = set()
    for it in items:
        if it["id"] in seen:
            raise ValueError(f"{source}: duplicate item id {it['id']!r}")
        seen.add(it["id"])


def read_eval_file(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Read a JSONL evaluation file (blank lines allowed) into validated items.

    Image paths become absolute, relative to the file's folder (or `image_root`). A malformed line
    raises ValueError naming the file and the line. Missing image files are not an error here:
    :func:`evaluate` skips (or, strict, refuses) those items.
    """
    path = os.fspath(path)
    base = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            item = _validate_item(raw, where, base)
            item["_line"] = lineno
            items.append(item)
    seen: dict[str, int] = {}
    for it in items:
        if it["id"] in seen:
            raise ValueError(f"{path}, line {it['_line']}: duplicate item id {it['id']!r} (first on line {seen[it['id']]})")
        seen[it["id"]] = it["_line"]
    for it in items:
        del it["_line"]
    return items


def _load_items(
    items_or_path: str | os.PathLike | Iterable[dict[str, Any]], image_root: str | os.PathLike | None
) -> list[dict[str, Any]]:
    if isinstance(items_or_path, (str, os.PathLike)):
        return read_eval_file(items_or_path, image_root=image_root)
    base = os.fspath(image_root) if image_root is not None else None
    items = [_validate_item(raw, f"item {i}", base) for i, raw in enumerate(items_or_path)]
    _check_unique(items, "items")
    return items


# ----------------------------------------------------------------------------- report


@dataclass
class EvalReport:
    """What :func:`evaluate` found.

    `metrics`: "vqa_acc", "grounding_acc50", "grounding_miou", "caption_cider", "caption_bleu4",
    "text_acc" for the item kinds present, plus per question type "<metric>/<qtype>".
    `predictions`: one dict per evaluated item (id, task, qtype, question, answer, prediction,
    score; grounding adds iou). `skipped`: reason -> number of items not run. `counts`: item
    kind -> number evaluated.
    """

    metrics: dict[str, float]
    predictions: list[dict[str, Any]]
    skipped: dict[str, int]
    seconds: float
    task: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")

    def summary(self) -> str:
        n = len(self.predictions)
        lines = [f"workflow {self.task!r}: {n} item(s) evaluated in {self.seconds:.1f}s"]
        if self.counts:
            lines.append("  items: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())))
        width = max((len(k) for k in self.metrics), default=0)
        for key in sorted(self.metrics):
            lines.append(f"  {key:<{width}}  {self.metrics[key]:.4f}")
        for reason, count in sorted(self.skipped.items()):
            text = _SKIP_EXPLAINED.get(reason, reason).format(task=self.task)
            lines.append(f"  skipped {count}: {text}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ----------------------------------------------------------------------------- evaluation


def _sees_images(model: FrozenVLModel, task: str) -> bool:
    if task == "text":
        return False
    return bool(getattr(model.workflow(task), "uses_images", True))


def _prompt(model: FrozenVLModel, item: dict[str, Any], chat: bool) -> str:
    question = item["question"]
    content = question
    if "image" in item and IMAGE_PLACEHOLDER not in question:
        content = IMAGE_PLACEHOLDER + "\n" + question
    if chat:
        return model.render_chat([{"role": "user", "content": content}])
    return content


def _cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[:i]
    return row


def _eos_ids(model: FrozenVLModel) -> set[int]:
    return set(eos_token_ids(model))


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _score(preds: list[dict[str, Any]]) -> dict[str, float]:
    """Fill in per-item scores and return the aggregate metrics."""
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in preds:
        by_kind[p["task"]].append(p)
    metrics: dict[str, float] = {}

    def per_qtype(kind_preds: list[dict[str, Any]], key: str, value: str = "score") -> None:
        groups: dict[str, list[float]] = defaultdict(list)
        for p in kind_preds:
            if p.get("qtype"):
                groups[p["qtype"]].append(p[value])
        for qtype, vals in groups.items():
            metrics[f"{key}/{qtype}"] = _mean(vals)

    if "vqa" in by_kind:
        ps = by_kind["vqa"]
        for p in ps:
            p["score"] = vqa_accuracy(p["prediction"], p["answer"])
        metrics["vqa_acc"] = _mean([p["score"] for p in ps])
        per_qtype(ps, "vqa_acc")
    if "grounding" in by_kind:
        ps = by_kind["grounding"]
        for p in ps:
            p["iou"], p["score"] = grounding_scores(p["prediction"], p["answer"], box_format=p.get("box_format"))
        metrics["grounding_acc50"] = _mean([p["score"] for p in ps])
        metrics["grounding_miou"] = _mean([p["iou"] for p in ps])
        per_qtype(ps, "grounding_acc50")
        per_qtype(ps, "grounding_miou", "iou")
    if "caption" in by_kind:
        ps = by_kind["caption"]
        cands = {p["id"]: p["prediction"] for p in ps}
        refs = {p["id"]: p["answer"] for p in ps}
        scores = cider_d_scores(cands, refs)
        for p in ps:
            p["score"] = scores[p["id"]]
        metrics["caption_cider"] = _mean([p["score"] for p in ps])
        metrics["caption_bleu4"] = bleu(cands, refs, n=4)
        per_qtype(ps, "caption_cider")
    if "text" in by_kind:
        ps = by_kind["text"]
        for p in ps:
            p["score"] = exact_match(p["prediction"], p["answer"])
        metrics["text_acc"] = _mean([p["score"] for p in ps])
        per_qtype(ps, "text_acc")
    return metrics


def evaluate(
    model: FrozenVLModel,
    items_or_path: str | os.PathLike | Iterable[dict[str, Any]],
    *,
    task: str,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    use_chat: bool = True,
    image_root: str | os.PathLike | None = None,
    progress: bool = True,
    strict: bool = False,
    text_fallback: bool | None = None,
) -> EvalReport:
    """Answer every item with workflow `task` (greedy decoding) and score the answers.

    Each item becomes one user message (``"<image>\\n" + question`` when it has an image) rendered
    with the tokenizer's chat template (when `use_chat` and there is one; otherwise the raw text,
    with the tokenizer's special tokens added). Prompts are batched separately with and without
    an image. Items with an image are skipped (and counted) when the workflow cannot see images
    (the `text` workflow); items whose image file is missing or undecodable are skipped and
    counted too, unless `strict`, which raises instead. `text_fallback` overrides the workflow's
    setting for this evaluation only (False: image-free items go through the workflow's own path).
    """
    if task not in model.tasks:
        raise ValueError(f"unknown task {task!r}; available tasks: {model.tasks}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    items = _load_items(items_or_path, image_root)
    sees_images = _sees_images(model, task)
    chat = bool(use_chat and getattr(model.tokenizer, "chat_template", None))
    eos = _eos_ids(model)
    skipped: Counter = Counter()

    runnable: list[dict[str, Any]] = []
    for it in items:
        if "image" in it:
            if not sees_images:
                skipped[SKIP_NEEDS_IMAGE] += 1
                continue
            if not os.path.isfile(it["image"]):
                if strict:
                    raise FileNotFoundError(f"item {it['id']!r}: image file {it['image']} not found")
                skipped[SKIP_MISSING_IMAGE] += 1
                continue
        runnable.append(it)

    groups = [[it for it in runnable if "image" not in it], [it for it in runnable if "image" in it]]
    batches = [g[i : i + batch_size] for g in groups for i in range(0, len(g), batch_size)]
    outputs: dict[str, str] = {}

    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(runnable), desc=f"eval {task}", disable=not progress, unit="item") as bar:
            for batch in batches:
                images: list[list[Any]] = []
                kept: list[dict[str, Any]] = []
                for it in batch:
                    if "image" in it:
                        try:
                            img = load_image(it["image"])
                        except ImageError as exc:
                            if strict:
                                raise ValueError(f"item {it['id']!r}: {exc}") from exc
                            skipped[SKIP_BAD_IMAGE] += 1
                            continue
                        images.append([img])
                    else:
                        images.append([])
                    kept.append(it)
                if kept:
                    prompts = [_prompt(model, it, chat) for it in kept]
                    inputs = model.prepare_inputs(prompts, images, task=task, add_special_tokens=not chat)
                    new = model.generate(
                        inputs["input_ids"],
                        inputs["attention_mask"],
                        pixel_values=inputs["pixel_values"],
                        image_rows=inputs["image_rows"],
                        task=task,
                        max_new_tokens=max_new_tokens,
                        text_fallback=text_fallback,
                    )
                    for it, row in zip(kept, new.tolist()):
                        text = model.tokenizer.decode(_cut_at_eos(row, eos), skip_special_tokens=True)
                        outputs[it["id"]] = text.strip()
                bar.update(len(batch))
    finally:
        model.train(was_training)

    preds = []
    for it in runnable:
        if it["id"] not in outputs:
            continue
        p = {
            "id": it["id"],
            "task": it["task"],
            "question": it["question"],
            "answer": it["answer"],
            "prediction": outputs[it["id"]],
            "score": 0.0,
        }
        if it.get("qtype"):
            p["qtype"] = it["qtype"]
        if "image" in it:
            p["image"] = it["image"]
        if it.get("box_format") is not None:  # how the model writes boxes (grounding scoring)
            p["box_format"] = it["box_format"]
        preds.append(p)
    metrics = _score(preds)
    counts = dict(Counter(p["task"] for p in preds))
    return EvalReport(
        metrics=metrics,
        predictions=preds,
        skipped=dict(skipped),
        seconds=time.perf_counter() - start,
        task=task,
        counts=counts,
    )


def text_preservation(
    model: FrozenVLModel,
    items: str | os.PathLike | Iterable[dict[str, Any]],
    *,
    tasks: Sequence[str],
    baseline: str = "text",
    own_path: bool = False,
    **kw: Any,
) -> dict[str, Any]:
    """Answer the text-only items (those without an image) with `baseline` and with each of `tasks`.

    Returns ``{"baseline", "n_items", "tasks": {name: {"accuracy", "same_answers", "n_same",
    "differing_ids", "metrics"}}}`` where ``accuracy`` is the mean item score (the metric of each
    item's kind, exact match for text items) and ``same_answers`` the fraction of items whose
    answer is identical to the baseline's. A workflow that leaves text-only inputs to the frozen
    base answers exactly like it: ``same_answers == 1.0``. `kw` goes to :func:`evaluate`.

    `own_path` also answers with each workflow's own path (its `text_fallback` off), the figure
    that tells families apart; it is under ``tasks[name]["own_path"]``, same keys.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    loaded = _load_items(items, kw.get("image_root"))
    text_items = [it for it in loaded if "image" not in it]
    if not text_items:
        raise ValueError("no text-only items (items without an image) to compare on")
    kw = {k: v for k, v in kw.items() if k != "image_root"}
    names = [baseline, *[t for t in tasks if t != baseline]]
    reports = {name: evaluate(model, text_items, task=name, **kw) for name in names}
    base = {p["id"]: p["prediction"] for p in reports[baseline].predictions}

    def compare(report: EvalReport) -> dict[str, Any]:
        preds = report.predictions
        differing = [p["id"] for p in preds if base.get(p["id"]) != p["prediction"]]
        n = len(preds)
        return {
            "accuracy": _mean([p["score"] for p in preds]),
            "same_answers": (n - len(differing)) / n if n else math.nan,
            "n_same": n - len(differing),
            "differing_ids": differing,
            "metrics": report.metrics,
        }

    out: dict[str, Any] = {"baseline": baseline, "n_items": len(text_items), "tasks": {}}
    for name, report in reports.items():
        out["tasks"][name] = compare(report)
    if own_path:
        for name in names:
            falls_back = name != "text" and model.workflow(name).cfg.text_fallback
            if not falls_back:  # its deployed answers are its own path's already
                out["tasks"][name]["own_path"] = dict(out["tasks"][name])
                continue
            out["tasks"][name]["own_path"] = compare(evaluate(model, text_items, task=name, text_fallback=False, **kw))
    return out

