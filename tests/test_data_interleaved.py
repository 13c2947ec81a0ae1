"""Interleaved image-text documents ({"document": [...]}) in the training data, next to conversations."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from PIL import Image

import frozenvl
from frozenvl.data.chat import IGNORE_INDEX, SampleError
from frozenvl.data.dataset import ConversationDataset, collate, encode_document, parse_document
from frozenvl.families.base import IMAGE_TOKEN_ID
from frozenvl.tiny import build_tokenizer

EOC = "<|endofchunk|>"
WORKFLOW = {
    "family": "cross_attention",
    "every": 1,
    "resampler_depth": 1,
    "resampler_latents": 4,
    "resampler_heads": 2,
    "resampler_head_dim": 8,
}
DOC = ["Some text ", {"image": "a.png"}, " a caption.<|endofchunk|>", {"image": "b.png"}, "more text<|endofchunk|>"]


@pytest.fixture(scope="module")
def model(bases):
    llm_dir, vision_dir = bases("llama")
    return frozenvl.build(llm_dir, vision_dir, workflows={"mm": WORKFLOW})


@pytest.fixture
def root(tmp_path):
    Image.new("RGB", (40, 20), (200, 30, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (24, 36), (10, 200, 10)).save(tmp_path / "b.png")
    return tmp_path


def write_json(path, samples):
    path.write_text(json.dumps(samples), encoding="utf-8")
    return path


def dataset(model, path, **kw):
    return ConversationDataset(
        path,
        tokenizer=model.tokenizer,
        tokens_per_image=model.tokens_per_image("mm"),
        preprocessor=model.preprocessor("mm"),
        **kw,
    )


def plain(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- encoding


def test_document_ids_and_labels_exact(model, root):
    tok = model.tokenizer
    assert model.tokens_per_image("mm") == 1 and tok.bos_token_id is None  # chatml tokenizer: no bos
    eoc = tok.convert_tokens_to_ids(EOC)
    assert plain(tok, EOC) == [eoc]

    expected = (
        plain(tok, "Some text ")
        + [IMAGE_TOKEN_ID]
        + plain(tok, " a caption.")
        + [eoc, IMAGE_TOKEN_ID]
        + plain(tok, "more text")
        + [eoc, tok.eos_token_id]
    )
    expected_labels = [IGNORE_INDEX if t == IMAGE_TOKEN_ID else t for t in expected]

    text, images = parse_document(DOC, sample_id="doc1")
    assert text == "Some text <image> a caption.<|endofchunk|><image>more text<|endofchunk|>"
    assert images == ["a.png", "b.png"]
    enc = encode_document(tok, text, tokens_per_image=1)
    assert enc.input_ids == expected and enc.labels == expected_labels
    assert enc.num_images == 2 and not enc.truncated
    assert tok.decode([t for t in expected if t != IMAGE_TOKEN_ID]) == (
        "Some text  a caption.<|endofchunk|>more text<|endofchunk|>" + tok.eos_token
    )

    ds = dataset(model, write_json(root / "d.json", [{"id": "doc1", "document": DOC}]))
    item = ds[0]
    assert ds.ids == ["doc1"] and ds.has_image == [True] and ds.lengths == [len(expected)]
    assert item["input_ids"].tolist() == expected and item["labels"].tolist() == expected_labels
    assert item["pixel_values"].shape == (2, 3, 32, 32) and item["id"] == "doc1"
    assert ds.stats.used == 1 and not ds.stats.skipped


def test_document_bos_multi_slot_and_joined_text(tmp_path):
    tok = build_tokenizer(tmp_path / "tok", template="llama3")  # plain encoding prepends bos
    tok.add_special_tokens({"additional_special_tokens": [EOC]})
    bos, eos, eoc = tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids(EOC)
    text, images = parse_document(["hel", "lo ", {"image": "x.png"}, "", "world" + EOC], sample_id="s")
    assert text == "hello <image>world" + EOC and images == ["x.png"]
    enc = encode_document(tok, text, tokens_per_image=3)
    body = plain(tok, "hello ")
    assert enc.input_ids == [bos] + body + [IMAGE_TOKEN_ID] * 3 + plain(tok, "world") + [eoc, eos]
    assert enc.labels == [IGNORE_INDEX] + body + [IGNORE_INDEX] * 3 + plain(tok, "world") + [eoc, eos]

    # text only: bos, text, eos
    enc = encode_document(tok, "just text", tokens_per_image=3)
    assert enc.input_ids == [bos] + plain(tok, "just text") + [eos]
    assert enc.labels == [IGNORE_INDEX] + plain(tok, "just text") + [eos] and enc.num_images == 0


def test_document_max_length(model):
    tok = model.tokenizer
    text, _ = parse_document(DOC, sample_id="d")
    full = encode_document(tok, text, tokens_per_image=1)
    n = len(full.input_ids)
    assert encode_document(tok, text, tokens_per_image=1, max_length=n).input_ids == full.input_ids
    with pytest.raises(SampleError, match="over max_length") as info:
        encode_document(tok, text, tokens_per_image=1, max_length=n - 1, sample_id="d")
    assert info.value.kind == "overlong" and info.value.sample_id == "d"

    cut = n - 2  # after the last image: kept, cut
    enc = encode_document(tok, text, tokens_per_image=1, max_length=cut, truncation="truncate")
    assert enc.truncated and enc.input_ids == full.input_ids[:cut] and enc.labels == full.labels[:cut]

    second_image = [i for i, t in enumerate(full.input_ids) if t == IMAGE_TOKEN_ID][1]
    with pytest.raises(SampleError) as info:
        encode_document(tok, text, tokens_per_image=1, max_length=second_image, truncation="truncate")
    assert info.value.kind == "image_truncated"

    lead = "<image>" + "a long text after the image " * 3
    with pytest.raises(SampleError, match="no text token") as info:
        encode_document(tok, lead, tokens_per_image=1, max_length=1, truncation="truncate")
    assert info.value.kind == "answer_truncated"
    with pytest.raises(ValueError, match="truncation"):
        encode_document(tok, text, tokens_per_image=1, max_length=5, truncation="left")


# --------------------------------------------------------------------------- dataset, collate, training


def test_mixed_batch_collate_and_forward(model, root):
    samples = [
        {"id": "conv_img", "image": "a.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A red box."}]},
        {"id": "doc", "document": DOC},
        {"id": "conv_txt", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "doc_txt", "document": ["plain text, no images", EOC]},
        {"id": "doc_one", "document": [{"image": "b.png"}, "a green box" + EOC]},
    ]
    ds = dataset(model, write_json(root / "mixed.json", samples))
    assert ds.ids == [s["id"] for s in samples] and ds.has_image == [True, True, False, False, True]
    items = [ds[i] for i in range(len(ds))]
    assert all(set(it) == {"input_ids", "labels", "pixel_values", "id"} for it in items)

    batch = ds.collate_fn()(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_rows"}
    assert batch["input_ids"].shape == (5, max(ds.lengths))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)  # 1 + 2 + 0 + 0 + 1, in order
    assert batch["image_rows"].tolist() == [0, 1, 1, 4]
    assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum(-1).tolist() == [1, 2, 0, 0, 1]
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], it["input_ids"])
        assert torch.equal(batch["labels"][row, :n], it["labels"])
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and batch["attention_mask"][row].sum() == n
    assert torch.equal(batch["pixel_values"][1], batch["pixel_values"][0])  # a.png twice
    # The document row's labels: every text token and eos; the conversation row only its answer.
    doc_labels = batch["labels"][1][batch["attention_mask"][1] == 1]
    assert (doc_labels != IGNORE_INDEX).sum() == ds.lengths[1] - 2
    assert (batch["labels"][0] != IGNORE_INDEX).sum() < (batch["attention_mask"][0] == 1).sum() - 1

    torch.manual_seed(0)
    model.train()
    out = model(**batch, task="mm")
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.trainable_parameters("mm") if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)
    model.eval()

    # the same through the trainer's path: collate with the tokenizer's pad id
    again = collate([ds[1], ds[3]], model.tokenizer.pad_token_id)
    assert again["image_rows"].tolist() == [0, 0] and again["pixel_values"].shape[0] == 2


BAD = [
    ("miss", {"document": ["x ", {"image": "nope.png"}, "y"]}, "missing_image", "nope.png"),
    ("int", {"document": ["x ", 7, "y"]}, "bad_format", "document item 1"),
    ("imgint", {"document": ["x", "y", {"image": 3}]}, "bad_format", "document item 2"),
    ("textkey", {"document": [{"text": "x"}]}, "bad_format", "document item 0"),
    ("extra", {"document": [{"image": "a.png", "caption": "c"}]}, "bad_format", "document item 0"),
    ("emptypath", {"document": ["x", {"image": " "}]}, "bad_format", "document item 1: empty image path"),
    ("both", {"document": ["x"], "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "bad_format", "both 'document' and 'conversations'"),
    ("topimage", {"image": "a.png", "document": [{"image": "a.png"}, "x"]}, "bad_format", "'image' is not used"),
    ("empty", {"document": []}, "bad_format", "non-empty list"),
    ("notlist", {"document": "just a string"}, "bad_format", "non-empty list"),
    ("placeholder", {"document": ["see <image> here"]}, "placeholder_mismatch", "document item 0"),
    ("long", {"document": ["word " * 200]}, "overlong", "over max_length=64"),
]


def test_bad_documents_skipped_and_counted(model, root):
    good = {"id": "good", "document": DOC}
    samples = [good] + [dict(rec, id=sid) for sid, rec, _, _ in BAD]
    ds = dataset(model, write_json(root / "bad.json", samples), max_length=64)
    assert ds.ids == ["good"]
    assert ds.stats.seen == len(BAD) + 1 and ds.stats.used == 1
    assert ds.stats.skipped == Counter(kind for _, _, kind, _ in BAD)


@pytest.mark.parametrize("sid,rec,kind,text", BAD, ids=[b[0] for b in BAD])
def test_bad_document_error_mode(model, root, sid, rec, kind, text):
    path = root / "one.jsonl"
    path.write_text(json.dumps({"id": "good", "document": DOC}) + "\n" + json.dumps(dict(rec, id=sid)) + "\n")
    with pytest.raises(SampleError) as info:
        dataset(model, path, max_length=64, on_bad_sample="error")
    msg = str(info.value)
    assert info.value.kind == kind and info.value.sample_id == sid
    assert text in msg and f"'{sid}'" in msg and "one.jsonl" in msg and "line 2" in msg and "index 1" in msg


def test_truncate_mode_in_dataset(model, root):
    samples = [
        {"id": "long", "document": ["word " * 200 + EOC]},
        {"id": "img_late", "document": ["word " * 200, {"image": "a.png"}, "x"]},
        {"id": "img_first", "document": [{"image": "a.png"}, "word " * 200]},
    ]
    ds = dataset(model, write_json(root / "t.json", samples), max_length=64, truncation="truncate")
    assert ds.ids == ["long", "img_first"] and ds.lengths == [64, 64] and ds.num_truncated == 2
    assert ds.stats.skipped == Counter(image_truncated=1)
    assert ds[1]["input_ids"][0] == IMAGE_TOKEN_ID and ds[1]["labels"][0] == IGNORE_INDEX
