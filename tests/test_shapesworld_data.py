"""ShapesWorld data generator: determinism, file formats, and every answer checked on the pixels."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frozenvl.data.boxes import box_iou, format_box, parse_boxes, to_square_box
from frozenvl.data.dataset import read_records
from frozenvl.shapesworld import (
    BACKGROUND,
    COLOURS,
    GROUNDING_PROMPT,
    KINDS,
    corpus,
    generate,
    sample_scene,
    text_tasks,
)
from frozenvl.shapesworld.tasks import CAPTION_PROMPT, DAYS, LEFT_MARGIN, MONTHS, WORDS, fact_world
from frozenvl.shapesworld.world import LARGE_R, SMALL_R
from frozenvl.vision.images import square_pad_offsets

GEN_ARGS = dict(n_train_images=100, n_eval_images=100, n_text_train=600, n_text_eval=None)
RGB_TO_COLOUR = {v: k for k, v in COLOURS.items()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapesworld")
    info = generate(out, seed=0, **GEN_ARGS)
    return out, info


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- pixel analysis


_BLOB_CACHE: dict[Path, list[dict]] = {}


def _blobs(path: Path) -> list[dict]:
    if path not in _BLOB_CACHE:
        _BLOB_CACHE[path] = _find_blobs(path)
    return _BLOB_CACHE[path]


def _find_blobs(path: Path) -> list[dict]:
    """Connected (4-neighbour) components of non-background pixels, measured on the image."""
    arr = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    h, w, _ = arr.shape
    code = (arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]  # one int per pixel
    bg = (BACKGROUND[0] << 16) | (BACKGROUND[1] << 8) | BACKGROUND[2]
    mask = code != bg
    pixels = code.tolist()
    todo = mask.tolist()  # True: a shape pixel not yet assigned to a blob
    blobs = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if not todo[y0][x0]:
            continue
        todo[y0][x0] = False
        stack, xs, ys, colours = [(int(y0), int(x0))], [], [], set()
        while stack:
            y, x = stack.pop()
            xs.append(x)
            ys.append(y)
            colours.add(pixels[y][x])
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and todo[ny][nx]:
                    todo[ny][nx] = False
                    stack.append((ny, nx))
        assert len(colours) == 1, f"{path}: a blob with several colours {colours} (overlap or antialiasing)"
        c = colours.pop()
        rgb = (c >> 16, (c >> 8) & 255, c & 255)
        assert rgb in RGB_TO_COLOUR, f"{path}: unexpected colour {rgb}"
        x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
        bw, bh = x2 - x1 + 1, y2 - y1 + 1
        fill = len(xs) / (bw * bh)
        # Expected fill ratios: square 1.0, circle ~0.785, triangle ~0.5.
        kind = "square" if fill > 0.95 else "circle" if 0.68 < fill < 0.88 else "triangle" if fill < 0.6 else None
        assert kind is not None, f"{path}: blob with fill ratio {fill:.3f} is no known shape"
        assert bw == bh, f"{path}: blob is {bw}x{bh}, not square-bounded"
        if bw <= 2 * SMALL_R[1] + 1:
            size = "small"
        elif bw >= 2 * LARGE_R[0] + 1:
            size = "large"
        else:
            raise AssertionError(f"{path}: blob {bw}px across is neither small nor large")
        blobs.append(
            {
                "colour": RGB_TO_COLOUR[rgb],
                "kind": kind,
                "size": size,
                "box": (x1, y1, x2, y2),
                "mx": sum(xs) / len(xs),
                "n": len(xs),
            }
        )
    return blobs


def _one(blobs: list[dict], **want) -> dict:
    found = [b for b in blobs if all(b[k] == v for k, v in want.items())]
    assert len(found) == 1, f"expected exactly one blob with {want}, found {len(found)}"
    return found[0]


_Q = {
    "colour": re.compile(r"What colour is the (\w+)\?"),
    "shape": re.compile(r"What shape is the (\w+) thing\?"),
    "exists": re.compile(r"Is there a (\w+) (\w+)\?"),
    "left_of": re.compile(r"Which is further left, the (\w+) (\w+) or the (\w+) (\w+)\?"),
    "size": re.compile(r"What size is the (\w+) (\w+)\?"),
}
_GROUND = re.compile(re.escape(GROUNDING_PROMPT.format("the ")[:-1]) + r"(\w+) (\w+)\.")


def _check_item(root: Path, image: str, qtype: str, question: str, answer: str, stats: dict) -> None:
    """Check one (image, question, answer) against the pixels of the image."""
    path = root / image
    blobs = _blobs(path)
    where = f"{image}: {question!r} -> {answer!r}"
    if qtype == "count":
        assert question == "How many shapes are there?"
        assert answer == str(len(blobs)), where
    elif qtype == "colour":
        (kind,) = _Q["colour"].fullmatch(question).groups()
        blob = _one(blobs, kind=kind)
        assert answer == blob["colour"], where
        assert np.all(np.asarray(Image.open(path)) == np.array(COLOURS[answer], dtype=np.uint8), axis=2).any()
    elif qtype == "shape":
        (colour,) = _Q["shape"].fullmatch(question).groups()
        assert answer == _one(blobs, colour=colour)["kind"], where
    elif qtype == "exists":
        colour, kind = _Q["exists"].fullmatch(question).groups()
        present = any(b["colour"] == colour and b["kind"] == kind for b in blobs)
        assert answer == ("yes" if present else "no"), where
        stats[answer] = stats.get(answer, 0) + 1
    elif qtype == "left_of":
        c1, k1, c2, k2 = _Q["left_of"].fullmatch(question).groups()
        b1, b2 = _one(blobs, colour=c1, kind=k1), _one(blobs, colour=c2, kind=k2)
        left, right = (b1, b2) if b1["mx"] < b2["mx"] else (b2, b1)
        assert right["mx"] - left["mx"] >= LEFT_MARGIN - 1, where
        assert answer == f"{left['colour']} {left['kind']}", where
    elif qtype == "size":
        colour, kind = _Q["size"].fullmatch(question).groups()
        assert answer == _one(blobs, colour=colour, kind=kind)["size"], where
    elif qtype == "caption":
        assert question == CAPTION_PROMPT
        parts = [re.fullmatch(r"a (small|large) (\w+) (\w+)", p) for p in answer.split(" and ")]
        assert all(parts), where
        described = [m.groups() for m in parts]
        assert sorted(described) == sorted((b["size"], b["colour"], b["kind"]) for b in blobs), where
        xs = [_one(blobs, colour=c, kind=k)["mx"] for _, c, k in described]
        assert all(a <= b + 0.5 for a, b in itertools.pairwise(xs)), f"{where}: not left to right ({xs})"
    elif qtype == "box":
        colour, kind = _GROUND.fullmatch(question).groups()
        blob = _one(blobs, colour=colour, kind=kind)
        (norm,) = parse_boxes(answer)
        assert re.fullmatch(r"\[\d\.\d\d,\d\.\d\d,\d\.\d\d,\d\.\d\d\]", answer), where
        w, h = Image.open(path).size
        side, left, top = square_pad_offsets(w, h)
        px = [norm[0] * side - left, norm[1] * side - top, norm[2] * side - left, norm[3] * side - top]
        ex = blob["box"]
        # All of the shape's pixels lie inside the box (1 px slack for the 2-decimal rounding) ...
        assert px[0] - 1 <= ex[0] and px[1] - 1 <= ex[1] and ex[2] <= px[2] + 1 and ex[3] <= px[3] + 1, where
        # ... every edge is its pixel extent up to half a rounding step on the square: the answer
        # is exactly the 2-decimal rounding of the extent measured on the pixels ...
        for got, want in zip(px, ex):
            assert abs(got - want) <= 0.005 * side + 1e-6, f"{where}: edge {got:.2f} vs pixel {want}"
        assert answer == format_box(to_square_box(ex, w, h)), where
        # ... so the box is not bigger than the shape (boxes as pixel areas: last pixel + 1).
        # 2 decimals on a side of up to 128 px move each edge by up to 0.64 px, which costs a small
        # (13-19 px) shape up to ~20% IoU; large shapes (>= 27 px) must reach 0.9.
        iou = box_iou([px[0], px[1], px[2] + 1, px[3] + 1], [ex[0], ex[1], ex[2] + 1, ex[3] + 1])
        assert iou >= (0.9 if blob["size"] == "large" else 0.75), f"{where}: IoU {iou:.3f} with the pixel extent {ex}"
        key = f"min_iou_{blob['size']}"
        stats[key] = min(stats.get(key, 1.0), iou)
    else:
        raise AssertionError(f"unknown qtype {qtype!r}")
    stats.setdefault("qtypes", set()).add(qtype)


# --------------------------------------------------------------------------- tests


def test_render_is_exact_geometry():
    """Every drawn shape is one blob of its exact colour whose pixel box is Shape.bbox()."""
    rng = random.Random(123)
    for _ in range(60):
        scene = sample_scene(rng, min_shapes=1, max_shapes=6)
        pairs = [(s.colour, s.kind) for s in scene.shapes]
        assert len(pairs) == len(set(pairs))
        assert 64 <= scene.width <= 128 and 64 <= scene.height <= 128
        arr = np.asarray(scene.render())
        assert arr.shape == (scene.height, scene.width, 3)
        covered = np.zeros(arr.shape[:2], dtype=bool)
        for s in scene.shapes:
            lo, hi = SMALL_R if s.size == "small" else LARGE_R
            assert lo <= s.r <= hi
            x1, y1, x2, y2 = s.bbox()
            assert x1 >= 0 and y1 >= 0 and x2 < scene.width and y2 < scene.height
            inside = np.all(arr[y1 : y2 + 1, x1 : x2 + 1] == np.array(s.rgb, dtype=arr.dtype), axis=2)
            ys, xs = np.nonzero(inside)
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == (0, 0, x2 - x1, y2 - y1)
            others = ~inside & ~np.all(arr[y1 : y2 + 1, x1 : x2 + 1] == np.array(BACKGROUND, dtype=arr.dtype), axis=2)
            assert not others.any()  # only the shape and background inside its box
            covered[y1 : y2 + 1, x1 : x2 + 1] = True
        assert np.all(arr[~covered] == np.array(BACKGROUND, dtype=arr.dtype))


def test_deterministic_and_seed_dependent(tmp_path, dataset):
    root, _ = dataset
    again = generate(tmp_path / "a", seed=0, **GEN_ARGS)
    assert again["counts"] == dataset[1]["counts"]
    h0, h1 = _hashes(root), _hashes(tmp_path / "a")
    assert h0 == h1
    generate(tmp_path / "b", seed=1, **GEN_ARGS)
    h2 = _hashes(tmp_path / "b")
    assert set(h2) == set(h0)
    assert h2["images/train/00000.png"] != h0["images/train/00000.png"]
    assert h2["train_mixed.json"] != h0["train_mixed.json"]
    assert h2["eval_text.jsonl"] != h0["eval_text.jsonl"]
    with pytest.raises(FileExistsError):
        generate(tmp_path / "a", seed=0, **GEN_ARGS)
    generate(tmp_path / "a", seed=0, overwrite=True, **GEN_ARGS)
    assert _hashes(tmp_path / "a") == h0


def test_file_formats(dataset):
    root, info = dataset
    for name in ("train_mm", "train_grounding", "train_mixed", "pretrain_text"):
        records = [r for r, _ in read_records(root / f"{name}.json")]
        assert len(records) == info["counts"][name] > 0
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            human, gpt = r["conversations"]
            assert (human["from"], gpt["from"]) == ("human", "gpt")
            if name == "pretrain_text":
                assert "image" not in r and "<image>" not in human["value"]
            else:
                assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
                assert (root / r["image"]).is_file()
    mixed = {r["id"] for r, _ in read_records(root / "train_mixed.json")}
    parts = [{r["id"] for r, _ in read_records(root / f"{n}.json")} for n in ("train_mm", "train_grounding")]
    assert mixed == parts[0] | parts[1] and not parts[0] & parts[1]
    for task in ("caption", "vqa", "grounding", "text"):
        rows = [r for r, _ in read_records(root / f"eval_{task}.jsonl")]
        assert len(rows) == info["counts"][f"eval_{task}"] > 0
        for r in rows:
            assert r["task"] == task and "<image>" not in r["question"] and r["answer"]
            assert set(r) == {"id", "task", "qtype", "question", "answer"} | ({"image"} if task != "text" else set())
    meta = json.loads((root / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["counts"] == info["counts"]
    assert len(list((root / "images" / "train").glob("*.png"))) == GEN_ARGS["n_train_images"]
    texts = corpus(root)
    assert texts and not any("<image>" in t for t in texts)
    joined = " ".join(texts)
    for word in [*COLOURS, *KINDS, *meta["vocabulary"]["names"], *meta["vocabulary"]["cities"]]:
        assert word in joined


def test_eval_answers_match_pixels(dataset):
    root, _ = dataset
    stats: dict = {}
    for task in ("vqa", "caption", "grounding"):
        for r, _ in read_records(root / f"eval_{task}.jsonl"):
            _check_item(root, r["image"], r["qtype"], r["question"], r["answer"], stats)
    assert stats["qtypes"] == {"count", "colour", "shape", "exists", "left_of", "size", "caption", "box"}
    assert stats["yes"] == stats["no"] == GEN_ARGS["n_eval_images"]  # one of each per image
    print({k: round(v, 3) for k, v in stats.items() if k.startswith("min_iou")})


def test_train_answers_match_pixels(dataset):
    root, _ = dataset
    stats: dict = {}
    for r, _ in read_records(root / "train_mixed.json"):
        qtype = r["id"].split("-")[2]
        question = r["conversations"][0]["value"].removeprefix("<image>\n")
        _check_item(root, r["image"], qtype, question, r["conversations"][1]["value"], stats)
    assert len(stats["qtypes"]) == 8


def test_pixel_checker_catches_wrong_answers(dataset):
    """The checker itself: a wrong answer of each kind is rejected."""
    root, _ = dataset
    rows = [r for task in ("vqa", "caption", "grounding") for r, _ in read_records(root / f"eval_{task}.jsonl")]
    wrong = {
        "count": lambda a: str(int(a) + 1),
        "exists": lambda a: "no" if a == "yes" else "yes",
        "size": lambda a: "small" if a == "large" else "large",
        "colour": lambda a: "purple" if a != "purple" else "red",
        "shape": lambda a: "square" if a != "square" else "circle",
        "caption": lambda a: " and ".join(reversed(a.split(" and "))) if " and " in a else a.replace("a ", "a very ", 1),
        "box": lambda a: format_box([v + 0.03 for v in parse_boxes(a)[0]]),
    }
    checked = set()
    for r in rows:
        if r["qtype"] in wrong and r["qtype"] not in checked:
            bad = wrong[r["qtype"]](r["answer"])
            if bad == r["answer"]:
                continue
            with pytest.raises(AssertionError):
                _check_item(root, r["image"], r["qtype"], r["question"], bad, {})
            checked.add(r["qtype"])
    left = next(r for r in rows if r["qtype"] == "left_of")
    c1, k1, c2, k2 = _Q["left_of"].fullmatch(left["question"]).groups()
    other = f"{c2} {k2}" if left["answer"] == f"{c1} {k1}" else f"{c1} {k1}"
    with pytest.raises(AssertionError):
        _check_item(root, left["image"], "left_of", left["question"], other, {})
    assert checked == set(wrong)


def test_text_tasks(dataset):
    root, _ = dataset
    train, held = text_tasks(0)
    train_q = {it["question"] for it in train}
    pretrain = [r for r, _ in read_records(root / "pretrain_text.json")]
    pretrain_q = {r["conversations"][0]["value"] for r in pretrain}
    assert pretrain_q == train_q  # 600 >= the training pool: every training item is seen
    eval_rows = [r for r, _ in read_records(root / "eval_text.jsonl")]
    assert [(r["question"], r["answer"]) for r in eval_rows] == [(it["question"], it["answer"]) for it in held]
    assert {r["qtype"] for r in eval_rows} == {"arith", "fact", "word"}
    assert not {it["question"] for it in held} & train_q
    assert len({it["question"] for it in train + held}) == len(train) + len(held)

    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    train_pairs = set()
    for it in train + held:
        m = re.fullmatch(r"What is (\d) (plus|minus|times) (\d)\?", it["question"])
        if it["qtype"] == "arith":
            a, op, b = int(m[1]), m[2], int(m[3])
            assert it["answer"] == str(ops[op](a, b)) and ops[op](a, b) >= 0
            if it in train:
                train_pairs.add((a, op, b))
    for it in held:  # held-out plus/times: the swapped order was trained
        m = re.fullmatch(r"What is (\d) (plus|times) (\d)\?", it["question"])
        if m:
            assert (int(m[3]), m[2], int(m[1])) in train_pairs

    people = {p["name"]: p for p in fact_world()}
    assert len(people) == 20
    statements = {it["answer"] for it in train if it["qtype"] == "fact"}
    for it in held:
        if it["qtype"] == "fact":
            name = re.search(r"(?:does|is) (\w+?)(?:'s)? ", it["question"])[1]
            p = people[name]
            stated = {
                p["city"]: f"{name} lives in {p['city']}.",
                p["pet"]: f"{name} has a pet {p['pet']}.",
                p["colour"]: f"{name}'s favourite colour is {p['colour']}.",
            }
            assert it["answer"] in stated
            assert stated[it["answer"]] in statements  # the fact itself was stated in training
        elif it["qtype"] == "word":
            m = re.fullmatch(r"Spell '(\w+)' backwards\.", it["question"])
            if m:
                assert m[1] in WORDS and it["answer"] == m[1][::-1]
            else:
                x = re.fullmatch(r"What comes after (\w+)\?", it["question"])[1]
                seq = DAYS if x in DAYS else MONTHS
                assert it["answer"] == seq[(seq.index(x) + 1) % len(seq)]

    # the split depends on the seed, the facts do not
    assert text_tasks(1)[1] != held
    assert text_tasks(0) == (train, held)
