"""Grounding answer formats (frozenvl.data.boxes.BoxFormat): render -> parse, malformed = miss, end to end."""

from __future__ import annotations

import json
import random

import pytest

from frozenvl.data.boxes import box_format, box_iou
from frozenvl.eval import grounding_scores

FORMATS = ["unit", "unit3", "int1000", "bins32", "bins100", "bins7", "loc32", "loc8"]


def _random_box(rng: random.Random) -> list[float]:
    x1, x2 = sorted(rng.random() for _ in range(2))
    y1, y2 = sorted(rng.random() for _ in range(2))
    return [x1, y1, x2, y2]


@pytest.mark.parametrize("name", FORMATS)
def test_render_parse_round_trip(name):
    fmt = box_format(name)
    rng = random.Random(0)
    boxes = [_random_box(rng) for _ in range(300)] + [[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]]
    for box in boxes:
        text = fmt.render(box)
        (back,) = fmt.parse(f"The box is {text}.")
        assert max(abs(a - b) for a, b in zip(box, back)) <= fmt.resolution + 1e-9, (name, box, text, back)
        assert fmt.render(back) == text  # a parsed box renders to the same text: the format is stable
    two = fmt.render_many(boxes[:2])
    assert len(fmt.parse(two)) == 2


def test_format_texts_and_resolution():
    box = [0.1234, 0.3, 0.25, 0.999]
    assert box_format("unit").render(box) == "[0.12,0.30,0.25,1.00]"
    assert box_format("int1000").render(box) == "[123,300,250,999]"
    assert box_format("bins32").render(box) == "[03,09,08,31]"  # fixed width: 2 digits for 0..31
    assert box_format("bins7").render(box) == "[0,2,1,6]"
    assert box_format("bins32").resolution == pytest.approx(1 / 64)
    assert box_format(None).name == "unit" and box_format(box_format("bins32")).bins == 32


@pytest.mark.parametrize("bad", ["bins1", "bins0", "bins100000", "unit0", "qwen", "", 3, "loc1", "loc"])
def test_unknown_formats_are_clear_errors(bad):
    with pytest.raises(ValueError, match="box format"):
        box_format(bad)


def test_render_rejects_out_of_range_boxes():
    with pytest.raises(ValueError, match="must lie in 0-1"):
        box_format("bins32").render([0.1, 0.2, 1.3, 0.4])


MALFORMED = {
    "bins32": ["[03,09,08]", "[03,09,08,32]", "[3,9,8,13]", "[08,09,03,13]", "[0.10,0.29,0.25,0.43]",
               "03,09,08,13", "[03,09,08,13", "[03;09;08;13]", "box", ""],
    "loc32": ["<loc_03><loc_09><loc_08>", "<loc_03><loc_09><loc_08><loc_32>", "<loc_3><loc_9><loc_8><loc_13>",
              "<loc_08><loc_09><loc_03><loc_13>", "[03,09,08,13]", "<loc_03>,<loc_09>,<loc_08>,<loc_13>",
              "<loc03><loc09><loc08><loc13>"],
    "int1000": ["[120,300,250]", "[120,300,250,1000]", "[250,300,120,430]", "[0.12,0.30,0.25,0.43]", "[a,b,c,d]"],
    "unit": ["[0.12,0.30,0.25]", "[0.12,0.30,1.25,0.43]", "[0.25,0.30,0.12,0.43]", "[120,300,250,430]",
             "[0.12,0.30,0.25,-0.43]", "[nan,0.3,0.4,0.5]"],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_outputs_are_misses(name):
    fmt = box_format(name)
    truth = [0.1, 0.29, 0.26, 0.43]
    answer = fmt.render(truth)
    iou, hit = grounding_scores(answer, answer, box_format=name)
    assert hit == 1.0 and iou == pytest.approx(1.0)
    for bad in MALFORMED[name]:
        assert fmt.parse(bad) == [], (name, bad)
        assert grounding_scores(bad, answer, box_format=name) == (0.0, 0.0), (name, bad)
    # a near miss is scored by IoU, in the format's own coordinates
    near = fmt.render([0.12, 0.31, 0.27, 0.45])
    iou, hit = grounding_scores(f"it is at {near}", truth, box_format=name)
    assert 0.5 < iou < 1.0 and hit == 1.0
    assert iou == pytest.approx(box_iou(fmt.parse(near)[0], truth))


def test_without_a_format_any_numbers_are_read_as_unit_boxes():
    # the old behaviour stays: an integer box is read as 0-1 numbers, so it misses
    assert grounding_scores("[3,9,8,13]", [0.1, 0.29, 0.26, 0.43]) == (0.0, 0.0)


def test_end_to_end_on_a_tiny_model(bases, tmp_path):
    """ShapesWorld data in bins32 -> a tiny workflow trains on it -> evaluate() scores the model's
    outputs in bins32: a well-formed right box is a hit, a unit-format box or garbage a miss."""
    import frozenvl
    from frozenvl.eval import evaluate, read_eval_file
    from frozenvl.eval.runner import _score
    from frozenvl.shapesworld import generate
    from frozenvl.train import train

    root = tmp_path / "sw"
    generate(root, seed=0, n_train_images=6, n_eval_images=2, n_text_train=10, tasks=("grounding",),
             box_format="bins32")
    fmt = box_format("bins32")
    train_records = json.load(open(root / "train_grounding.json"))
    assert all(r["task"] == "grounding" and fmt.parse(r["conversations"][1]["value"]) for r in train_records)
    assert json.load(open(root / "meta.json"))["box_format"] == "bins32"
    items = read_eval_file(root / "eval_grounding.jsonl")
    assert items and all(it["box_format"] == "bins32" and fmt.parse(it["answer"]) for it in items)

    llm, vis = bases()
    out = tmp_path / "run"
    train({"llm": llm, "vision": vis, "output_dir": str(out), "workflow": {"name": "g", "family": "prefix"},
           "data": {"train": str(root / "train_grounding.json"), "max_length": 256},
           "stages": [{"name": "s", "train": ["connector"], "lr": 1e-3, "steps": 2, "batch_size": 4}],
           "save_every": 0, "loss_weighting": "sample", "task_weights": {"grounding": 2.0}}, show_progress=False)
    model = frozenvl.load(out)
    report = evaluate(model, items, task="g", max_new_tokens=12, progress=False)
    assert len(report.predictions) == len(items)
    for p in report.predictions:  # the runner scored the model's own text in the item's format
        assert p["box_format"] == "bins32"
        assert (p["iou"], p["score"]) == grounding_scores(p["prediction"], p["answer"], box_format="bins32")
    # the same items with chosen outputs: the right box in bins32 hits; the same box in unit, or
    # without the zero padding (not bins32's fixed width), or inverted, misses
    truth = items[0]["answer"]
    cells = [int(c) for c in truth.strip("[]").split(",")]
    unpadded = "[" + ",".join(str(c) for c in cells) + "]"
    assert unpadded != truth  # at least one coordinate below 10
    unit_text = box_format("unit").render(fmt.parse(truth)[0])
    texts = (f"at {truth}", unit_text, unpadded, "[31,31,00,00]")
    preds = [dict(report.predictions[0], prediction=text) for text in texts]
    metrics = _score(preds)
    assert [p["score"] for p in preds] == [1.0, 0.0, 0.0, 0.0] and metrics["grounding_acc50"] == pytest.approx(1 / 4)
