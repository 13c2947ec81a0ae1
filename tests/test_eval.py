"""Evaluation: metrics on hand-computed cases, and the runner on a tiny random model."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import frozenvl
from frozenvl.eval import (
    EvalReport,
    bleu,
    cider_d,
    cider_d_scores,
    evaluate,
    exact_match,
    grounding_scores,
    normalize_answer,
    read_eval_file,
    text_preservation,
    vqa_accuracy,
)

# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Red  Car!", "red car"),
        ("Two dogs", "2 dogs"),
        ("ten", "10"),
        ("1.5", "1.5"),
        ("It costs 1.5 dollars.", "it costs 1.5 dollars"),
        ("end.", "end"),
        ("1,000", "1000"),
        ("an apple", "apple"),
        ("  A\tcat\n", "cat"),
        ("black-and-white", "black and white"),
        ("yes!!!", "yes"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_contractions():
    assert normalize_answer("don't") == normalize_answer("dont") == normalize_answer("Don\u2019t")
    assert normalize_answer("it's") == normalize_answer("its")


def _leave_one_out(pred, answers):
    """The VQA formula spelled out: mean over the 10 subsets of 9 of min(#matches / 3, 1)."""
    accs = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1 :]
        accs.append(min(sum(a == pred for a in others) / 3, 1.0))
    return sum(accs) / len(accs)


def test_vqa_accuracy_ten_answers():
    two = ["red", "Red."] + ["blue"] * 8
    # 2 subsets lose a match (1/3), 8 keep both (2/3): (2/3 + 16/3) / 10 = 0.6
    assert vqa_accuracy("red", two) == pytest.approx(0.6)
    assert vqa_accuracy("red", two) == pytest.approx(_leave_one_out("red", ["red"] * 2 + ["blue"] * 8))
    # 3 matches: 3 subsets with 2 (2/3), 7 with 3 (1): (2 + 7) / 10 = 0.9
    assert vqa_accuracy("the red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == pytest.approx(1.0)
    # 1 match: 9 subsets with 1 (1/3), 1 with 0: 0.3
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("green", two) == 0.0
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0


def test_vqa_accuracy_single_reference_and_exact_match():
    assert vqa_accuracy("The cat.", "cat") == 1.0
    assert vqa_accuracy("cat", ["cat"]) == 1.0
    assert vqa_accuracy("cats", "cat") == 0.0
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("three", ["3", "III"]) == 1.0
    assert exact_match("rome", "paris") == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


# --------------------------------------------------------------------------- grounding


def test_grounding_scores():
    assert grounding_scores("[0.1,0.1,0.5,0.5]", [0.1, 0.1, 0.5, 0.5]) == (pytest.approx(1.0), 1.0)
    # overlap 0.2 x 0.4 = 0.08, union 0.16 + 0.16 - 0.08 = 0.24 -> 1/3
    iou, hit = grounding_scores("it is at [0.2, 0, 0.6, 0.4] and [0,0,0.4,0.4]", "[0,0,0.4,0.4]")
    assert iou == pytest.approx(1 / 3) and hit == 0.0  # only the first box counts
    # the prediction lies inside the ground truth: 0.3 x 0.4 / (0.4 x 0.4) = 0.75
    iou, hit = grounding_scores("[0.1,0.0,0.4,0.4]", [0, 0, 0.4, 0.4])
    assert iou == pytest.approx(0.75) and hit == 1.0
    iou, hit = grounding_scores("[0.0,0.0,0.5,0.5]", [0, 0, 1.0, 0.5])  # exactly 0.5 counts
    assert iou == pytest.approx(0.5) and hit == 1.0
    assert grounding_scores("no box here", [0, 0, 1, 1]) == (0.0, 0.0)
    assert grounding_scores("[1e999,0,1,1]", [0, 0, 1, 1]) == (0.0, 0.0)
    with pytest.raises(ValueError):
        grounding_scores("[0,0,1,1]", "nothing")


# --------------------------------------------------------------------------- CIDEr-D


def _reference_cider_d(cands, refs, sigma=6.0):
    """CIDEr-D from the paper's formula, with dense numpy vectors over the whole n-gram vocabulary."""

    def toks(s):
        return "".join(ch if ch.isalnum() else " " for ch in s.lower().replace("'", "")).split()

    def grams(t, n):
        return Counter(tuple(t[i : i + n]) for i in range(len(t) - n + 1))

    ids = list(cands)
    n_images = len(ids)
    total = 0.0
    for n in range(1, 5):
        vocab = sorted({g for i in ids for s in [cands[i], *refs[i]] for g in grams(toks(s), n)})
        index = {g: j for j, g in enumerate(vocab)}
        df = np.zeros(len(vocab))
        for i in ids:
            seen = set().union(*[grams(toks(s), n) for s in refs[i]])
            for g in seen:
                df[index[g]] += 1
        idf = np.log(n_images) - np.log(np.maximum(df, 1.0))

        def vec(s):
            v = np.zeros(len(vocab))
            for g, c in grams(toks(s), n).items():
                v[index[g]] = c
            return v * idf

        for i in ids:
            c = vec(cands[i])
            acc = 0.0
            for r_text in refs[i]:
                r = vec(r_text)
                if np.linalg.norm(c) == 0 or np.linalg.norm(r) == 0:
                    continue
                pen = math.exp(-((len(toks(cands[i])) - len(toks(r_text))) ** 2) / (2 * sigma**2))
                acc += pen * float(np.minimum(c, r) @ r) / (np.linalg.norm(c) * np.linalg.norm(r))
            total += 10.0 * acc / len(refs[i]) / 4 / n_images
    return total


REFS = {
    "a": ["a man riding a red bike down the street", "a person rides a bicycle on a road"],
    "b": ["two dogs playing in the snow", "a pair of dogs run through snow", "dogs play outside in winter"],
    "c": ["a plate of food with broccoli and rice", "rice and broccoli on a white plate"],
    "d": ["a cat sleeping on a couch", "the cat is asleep on the sofa"],
}


def test_cider_d_tf_idf_hand_case():
    # Two images. "a" is in every image's references: idf log(2/2) = 0, so it carries no weight;
    # "cat", "dog" and both bigrams have idf log 2. Unigrams and bigrams match exactly
    # (cosine 1), no 3/4-grams (0): (1 + 1 + 0 + 0) / 4 * 10 = 5.
    refs = {1: ["a cat"], 2: ["a dog"]}
    assert cider_d({1: "a cat", 2: "a dog"}, refs) == pytest.approx(5.0)
    # "cat" alone: the unigram cosine is still 1 (the weightless "a" changes nothing), no bigram,
    # and one token shorter: 2.5 * exp(-1 / 72).
    scores = cider_d_scores({1: "cat", 2: "a dog"}, refs)
    assert scores[1] == pytest.approx(2.5 * math.exp(-1 / 72))
    assert scores[2] == pytest.approx(5.0)
    # Clipping: "cat cat" has the unigram vector (2w) against (w): min(2w, w) * w / (2w * w) = 1/2;
    # its bigram "cat cat" is not in the reference: 0. Same length as the reference.
    assert cider_d_scores({1: "cat cat", 2: "a dog"}, refs)[1] == pytest.approx(10 * 0.5 / 4)


def test_cider_d_matches_reference_computation():
    cands = {
        "a": "a man rides a red bike on the street",
        "b": "dogs playing in snow",
        "c": "a white plate with rice",
        "d": "a dog on a couch",
    }
    assert cider_d(cands, REFS) == pytest.approx(_reference_cider_d(cands, REFS), rel=1e-9)
    ident = {k: v[0] for k, v in REFS.items()}
    assert cider_d(ident, REFS) == pytest.approx(_reference_cider_d(ident, REFS), rel=1e-9)


def test_cider_d_orders_good_above_bad():
    good = {k: v[0] for k, v in REFS.items()}
    wrong = {"a": REFS["c"][0], "b": REFS["d"][0], "c": REFS["a"][0], "d": REFS["b"][0]}
    one_ref = {k: [v[0]] for k, v in REFS.items()}
    assert cider_d(good, one_ref) > cider_d(good, REFS) > cider_d(wrong, REFS)
    assert cider_d(wrong, one_ref) < 0.5
    # one reference per image, candidate == reference: cosine 1 at every n the sentences have
    assert cider_d(good, one_ref) == pytest.approx(10.0, rel=1e-9)


def test_cider_d_length_penalty():
    refs = {1: ["a red bus on the road"], 2: ["a cat on a mat"], 3: ["two men at a table"]}
    cands = {1: "red bus", 2: "a cat on a mat", 3: "two men at a table"}
    with_penalty = cider_d_scores(cands, refs)
    without = cider_d_scores(cands, refs, sigma=1e9)
    # one reference: every term of image 1 is scaled by exp(-(2 - 6)^2 / (2 * 36))
    assert with_penalty[1] / without[1] == pytest.approx(math.exp(-16 / 72))
    assert with_penalty[2] == pytest.approx(without[2])  # same length: no penalty


def test_cider_d_errors_and_bleu():
    with pytest.raises(ValueError, match="no references"):
        cider_d({"x": "a"}, {"y": ["a"]})
    assert cider_d({}, {}) == 0.0
    cands = {1: "the cat sat on the mat", 2: "a dog ran in the park"}
    refs = {1: ["the cat sat on the mat"], 2: ["a dog ran in the park"]}
    assert bleu(cands, refs) == pytest.approx(1.0)
    # every n-gram of the 8-token candidate matches, but the reference has 9 tokens: exp(1 - 9/8)
    assert bleu({1: "the cat sat on the red mat today"}, {1: ["so the cat sat on the red mat today"]}) == (
        pytest.approx(math.exp(1 - 9 / 8))
    )
    assert bleu({1: "completely different words here"}, refs) == 0.0


# --------------------------------------------------------------------------- runner

BOX = "[0.10,0.20,0.60,0.70]"


def _write_eval_set(root) -> str:
    root = os.fspath(root)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    colours = [(220, 30, 30), (30, 200, 60), (40, 60, 220), (200, 200, 40)]
    for k, c in enumerate(colours):
        img = Image.new("RGB", (32 + 8 * k, 32), c)
        img.putpixel((3, 3), (255, 255, 255))
        img.save(os.path.join(root, "img", f"{k}.png"))
    items = [
        {"id": "v1", "task": "vqa", "qtype": "colour", "image": "img/0.png", "question": "what colour is it?",
         "answer": ["red"] * 6 + ["dark red"] * 4},
        {"id": "v2", "task": "vqa", "qtype": "count", "image": "img/1.png", "question": "how many squares?",
         "answer": "one"},
        {"id": "v3", "task": "vqa", "qtype": "colour", "image": "img/2.png", "question": "which colour?",
         "answer": "blue"},
        {"id": "g1", "task": "grounding", "image": "img/3.png", "question": "where is the dot?", "answer": BOX},
        {"id": "c1", "task": "caption", "image": "img/0.png", "question": "describe the image.",
         "answer": ["a red square", "a red image"]},
        {"id": "c2", "task": "caption", "image": "img/2.png", "question": "describe the image.",
         "answer": ["a blue square"]},
        {"id": "t1", "task": "text", "question": "what is 2 plus 2?", "answer": "4"},
        {"id": "t2", "task": "text", "question": "name a colour", "answer": ["red", "blue"]},
        {"id": "t3", "task": "text", "qtype": "math", "question": "what is ten minus 3", "answer": "7"},
        {"id": "t4", "task": "text", "question": "say hello", "answer": "hello"},
        {"id": "m1", "task": "vqa", "image": "img/missing.png", "question": "what is this?", "answer": "x"},
    ]
    path = os.path.join(root, "eval.jsonl")
    with open(path, "w") as f:
        for k, it in enumerate(items):
            f.write(json.dumps(it) + "\n")
            if k == 3:
                f.write("\n")  # blank lines are fine
    return path


@pytest.fixture(scope="module")
def model(bases):
    llm, vis = bases("llama", "clip")
    return frozenvl.build(llm, vis, workflows={"mm": {"family": "prefix"}})


@pytest.fixture(scope="module")
def eval_path(tmp_path_factory):
    return _write_eval_set(tmp_path_factory.mktemp("evalset"))


def test_read_eval_file(eval_path, tmp_path):
    items = read_eval_file(eval_path)
    assert len(items) == 11
    assert items[0]["image"] == os.path.join(os.path.dirname(eval_path), "img", "0.png")
    assert "image" not in items[6]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "task": "text", "question": "q", "answer": "a"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2"):
        read_eval_file(bad)
    bad.write_text("\n" + json.dumps({"id": 1, "task": "draw", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: 'task'"):
        read_eval_file(bad)
    bad.write_text(json.dumps({"id": 1, "task": "text", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: missing field 'answer'"):
        read_eval_file(bad)
    bad.write_text(json.dumps({"id": 1, "task": "grounding", "image": "x.png", "question": "q", "answer": "left"}))
    with pytest.raises(ValueError, match="grounding 'answer'"):
        read_eval_file(bad)
    line = json.dumps({"id": "a", "task": "text", "question": "q", "answer": "a"}) + "\n"
    bad.write_text(line + line)
    with pytest.raises(ValueError, match="line 2: duplicate item id 'a'"):
        read_eval_file(bad)


@pytest.fixture(scope="module")
def mm_report(model, eval_path):
    return evaluate(model, eval_path, task="mm", batch_size=4, max_new_tokens=6, progress=False)


def test_evaluate_multimodal(model, eval_path, mm_report, tmp_path):
    report = mm_report
    assert isinstance(report, EvalReport)
    assert report.skipped == {"missing_image": 1}
    assert len(report.predictions) == 10
    assert [p["id"] for p in report.predictions] == ["v1", "v2", "v3", "g1", "c1", "c2", "t1", "t2", "t3", "t4"]
    assert report.counts == {"vqa": 3, "grounding": 1, "caption": 2, "text": 4}
    for key in ["vqa_acc", "vqa_acc/colour", "vqa_acc/count", "grounding_acc50", "grounding_miou",
                "caption_cider", "caption_bleu4", "text_acc", "text_acc/math"]:
        assert key in report.metrics, key
        assert math.isfinite(report.metrics[key])
    for p in report.predictions:
        assert set(p) >= {"id", "task", "question", "answer", "prediction", "score"}
        assert isinstance(p["prediction"], str) and p["prediction"] == p["prediction"].strip()
    assert any(p["prediction"] for p in report.predictions)
    g = next(p for p in report.predictions if p["id"] == "g1")
    assert "iou" in g
    # the aggregates are the means of the item scores
    vqa = [p["score"] for p in report.predictions if p["task"] == "vqa"]
    assert report.metrics["vqa_acc"] == pytest.approx(sum(vqa) / 3)
    assert 0.0 <= report.metrics["text_acc"] <= 1.0

    text = report.summary()
    assert "vqa_acc" in text and "missing" in text
    out = tmp_path / "out" / "report.json"
    report.to_json(out)
    data = json.loads(out.read_text())
    assert data["metrics"] == pytest.approx(report.metrics)
    assert len(data["predictions"]) == 10 and data["skipped"] == {"missing_image": 1}

    with pytest.raises(FileNotFoundError, match=r"'m1'.*missing\.png"):
        evaluate(model, eval_path, task="mm", max_new_tokens=2, progress=False, strict=True)


def test_evaluate_batched_equals_unbatched(model, eval_path, mm_report):
    one = evaluate(model, eval_path, task="mm", batch_size=1, max_new_tokens=6, progress=False)
    four = mm_report
    assert [p["prediction"] for p in one.predictions] == [p["prediction"] for p in four.predictions]
    assert one.metrics == pytest.approx(four.metrics)


def test_evaluate_text_workflow_skips_image_items(model, eval_path):
    report = evaluate(model, eval_path, task="text", batch_size=3, max_new_tokens=6, progress=False)
    assert report.skipped == {"needs_image": 7}
    assert [p["id"] for p in report.predictions] == ["t1", "t2", "t3", "t4"]
    assert set(report.metrics) == {"text_acc", "text_acc/math"}
    assert "cannot see images" in report.summary()


def test_evaluate_matches_model_chat(model, eval_path):
    """The runner's prompt + greedy decoding is what `model.chat` answers."""
    items = [it for it in read_eval_file(eval_path) if it["id"] in ("t1", "v1")]
    report = evaluate(model, items, task="mm", max_new_tokens=6, progress=False)
    by_id = {p["id"]: p["prediction"] for p in report.predictions}
    t1 = model.chat([{"role": "user", "content": "what is 2 plus 2?"}], task="mm", max_new_tokens=6)
    v1 = model.chat([{"role": "user", "content": "<image>\nwhat colour is it?"}], images=[items[0]["image"]],
                    task="mm", max_new_tokens=6)
    assert by_id["t1"] == t1.strip()
    assert by_id["v1"] == v1.strip()


def test_evaluate_without_chat_template(model, eval_path):
    """use_chat=False: the raw question, with the tokenizer's special tokens, as `generate(prompt=...)`."""
    items = [it for it in read_eval_file(eval_path) if it["id"] == "t1"]
    report = evaluate(model, items, task="text", max_new_tokens=6, use_chat=False, progress=False)
    ids = model.generate(prompt="what is 2 plus 2?", task="text", max_new_tokens=6)[0].tolist()
    eos = model.tokenizer.eos_token_id
    ids = ids[: ids.index(eos)] if eos in ids else ids
    assert report.predictions[0]["prediction"] == model.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_evaluate_bad_arguments(model, eval_path):
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(model, eval_path, task="nope", progress=False)
    with pytest.raises(ValueError, match="item 0: missing field"):
        evaluate(model, [{"id": "x", "task": "text"}], task="text", progress=False)


def test_text_preservation(bases, eval_path):
    llm, vis = bases("llama", "clip")
    model = frozenvl.build(llm, vis, workflows={"mm": {"family": "prefix"}})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the connector cannot matter on text-only input
        for p in model.trainable_parameters("mm"):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    res = text_preservation(model, eval_path, tasks=["mm"], batch_size=2, max_new_tokens=8, progress=False)
    assert res["baseline"] == "text" and res["n_items"] == 4
    assert res["tasks"]["mm"]["same_answers"] == 1.0
    assert res["tasks"]["mm"]["differing_ids"] == []
    assert res["tasks"]["mm"]["accuracy"] == res["tasks"]["text"]["accuracy"]
    assert res["tasks"]["text"]["same_answers"] == 1.0
