"""Chat encoding with template-derived assistant masks, LLaVA datasets, collation, sampling, boxes."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from PIL import Image

from frozenvl.data.boxes import box_iou, format_box, format_boxes, parse_boxes, to_square_box
from frozenvl.data.chat import (
    IGNORE_INDEX,
    EncodedSample,
    SampleError,
    encode_conversation,
    prepare_images,
    to_messages,
)
from frozenvl.data.dataset import ConversationDataset, ModalityLengthGroupedSampler, collate
from frozenvl.data.prompt import tokenize_with_images
from frozenvl.families.base import IMAGE_TOKEN_ID
from frozenvl.tiny import build_tokenizer
from frozenvl.vision.images import CLIP_MEAN, CLIP_STD, ImagePreprocessor

TPI = 4  # tokens per image in these tests
TEMPLATES = ["chatml", "llama3"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {t: build_tokenizer(tmp_path_factory.mktemp(f"tok-{t}"), template=t) for t in TEMPLATES}


@pytest.fixture(params=TEMPLATES)
def tok(request, tokenizers):
    return tokenizers[request.param]


@pytest.fixture(scope="module")
def preprocessor():
    return ImagePreprocessor(size=(16, 16), image_mean=CLIP_MEAN, image_std=CLIP_STD)


# --------------------------------------------------------------------------- helpers


def labelled_runs(labels: list[int]) -> list[list[int]]:
    runs, cur = [], []
    for lab in labels:
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(lab)
    if cur:
        runs.append(cur)
    return runs


def check_assistant_labels(tok, enc: EncodedSample, answers: list[str]) -> None:
    """Labelled ids are exactly each answer + the template's end-of-turn token, nothing else."""
    eot = tok.eos_token  # <|im_end|> (chatml) / <|eot_id|> (llama3): ends an assistant turn
    expected = [tok(a + eot, add_special_tokens=False)["input_ids"] for a in answers]
    runs = labelled_runs(enc.labels)
    assert runs == expected
    assert [tok.decode(r) for r in runs] == [a + eot for a in answers]
    # Labels equal the input ids where set; nothing outside those runs is labelled.
    assert len(enc.labels) == len(enc.input_ids)
    for tid, lab in zip(enc.input_ids, enc.labels):
        assert lab in (IGNORE_INDEX, tid)
    assert sum(lab != IGNORE_INDEX for lab in enc.labels) == sum(map(len, expected))


def msgs(*turns: str, system: str | None = None) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    for k, text in enumerate(turns):
        out.append({"role": "user" if k % 2 == 0 else "assistant", "content": text})
    return out


def save_image(path, size=(40, 20), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_json(path, samples):
    path.write_text(json.dumps(samples), encoding="utf-8")
    return path


def write_jsonl(path, samples):
    path.write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- messages


def test_to_messages_maps_llava_roles():
    conv = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "<image>\nQ"},
        {"from": "gpt", "value": "A"},
    ]
    assert to_messages(conv) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "<image>\nQ"},
        {"role": "assistant", "content": "A"},
    ]
    already = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]
    assert to_messages(already) == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    with pytest.raises(SampleError, match="unknown role 'robot'") as info:
        to_messages([{"from": "robot", "value": "x"}], sample_id="s1")
    assert info.value.kind == "bad_format" and "s1" in str(info.value)
    for bad in ([], [{"from": "human", "value": 3}], ["text"], [{"foo": 1}]):
        with pytest.raises(SampleError):
            to_messages(bad)


# --------------------------------------------------------------------------- encoding, both templates


def test_text_only_sample(tok):
    messages = msgs("What is in the image?", "A red circle.", system="You are a helpful assistant.")
    enc = encode_conversation(tok, messages, tokens_per_image=TPI)
    check_assistant_labels(tok, enc, ["A red circle."])
    assert enc.num_images == 0 and not enc.truncated and IMAGE_TOKEN_ID not in enc.input_ids
    # Cross-check against transformers' own apply_chat_template assistant mask.
    ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert enc.input_ids == ref["input_ids"]
    assert [int(lab != IGNORE_INDEX) for lab in enc.labels] == ref["assistant_masks"]


def test_image_sample(tok):
    messages = msgs("<image>\nWhat colour is the square?", "The square is blue.")
    enc = encode_conversation(tok, messages, tokens_per_image=TPI, num_images=1)
    check_assistant_labels(tok, enc, ["The square is blue."])
    slots = [i for i, t in enumerate(enc.input_ids) if t == IMAGE_TOKEN_ID]
    assert len(slots) == TPI and slots == list(range(slots[0], slots[0] + TPI))
    assert all(enc.labels[i] == IGNORE_INDEX for i in slots)
    assert enc.num_images == 1
    # Same ids as prompt.tokenize_with_images over the rendered template text.
    text = tok.apply_chat_template(messages, tokenize=False)
    assert enc.input_ids == tokenize_with_images(tok, text, TPI)
    # Families that keep images out of the sequence: zero slots.
    enc0 = encode_conversation(tok, messages, tokens_per_image=0, num_images=1)
    assert IMAGE_TOKEN_ID not in enc0.input_ids and enc0.num_images == 1
    check_assistant_labels(tok, enc0, ["The square is blue."])


def test_multi_turn_sample(tok):
    messages = msgs(
        "<image>\nHow many circles are there?",
        "There are three circles.",
        "What colour is the star?",
        "The star is green!",
        system="You are a helpful assistant that can see images.",
    )
    enc = encode_conversation(tok, messages, tokens_per_image=TPI, num_images=1)
    check_assistant_labels(tok, enc, ["There are three circles.", "The star is green!"])
    assert enc.input_ids.count(IMAGE_TOKEN_ID) == TPI


def test_grounding_sample(tok):
    box = to_square_box([20, 10, 120, 60], width=200, height=100)
    answer = f"The cat is at {format_box(box)}."
    assert answer == "The cat is at [0.10,0.30,0.60,0.55]."
    messages = msgs("<image>\nWhere is the cat?", answer)
    enc = encode_conversation(tok, messages, tokens_per_image=TPI, num_images=1)
    check_assistant_labels(tok, enc, [answer])
    (run,) = labelled_runs(enc.labels)
    assert parse_boxes(tok.decode(run)) == [pytest.approx([0.10, 0.30, 0.60, 0.55])]


def test_one_image_without_placeholder_gets_one_prepended(tok):
    messages = msgs("What is it?", "A dog.")
    enc = encode_conversation(tok, messages, tokens_per_image=TPI, num_images=1)
    assert enc.input_ids.count(IMAGE_TOKEN_ID) == TPI and enc.num_images == 1
    assert prepare_images(messages, 1)[0]["content"] == "<image>\nWhat is it?"
    assert messages[0]["content"] == "What is it?"  # input not modified
    check_assistant_labels(tok, enc, ["A dog."])


def test_placeholder_mismatch(tok):
    for messages, n in [
        (msgs("<image><image> Compare.", "Same."), 1),
        (msgs("Compare.", "Same."), 2),
        (msgs("<image> What?", "A cat."), 0),
    ]:
        with pytest.raises(SampleError, match="placeholder") as info:
            encode_conversation(tok, messages, tokens_per_image=TPI, num_images=n, sample_id="pm")
        assert info.value.kind == "placeholder_mismatch" and "'pm'" in str(info.value)


def test_truncation(tok):
    question = "<image>\n" + " ".join(["Describe the image in one sentence."] * 6)
    messages = msgs(question, "There is a small red circle on the left.")
    full = encode_conversation(tok, messages, tokens_per_image=TPI, num_images=1)
    n = len(full.input_ids)
    first_label = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    slot0 = full.input_ids.index(IMAGE_TOKEN_ID)

    with pytest.raises(SampleError, match="over max_length") as info:
        encode_conversation(tok, messages, tokens_per_image=TPI, num_images=1, max_length=n - 1, sample_id="long")
    assert info.value.kind == "overlong" and "'long'" in str(info.value)
    # Not longer than max_length: untouched.
    same = encode_conversation(tok, messages, tokens_per_image=TPI, num_images=1, max_length=n)
    assert same == full

    cut = first_label + 3
    enc = encode_conversation(tok, messages, tokens_per_image=TPI, num_images=1, max_length=cut, truncation="truncate")
    assert enc.truncated and enc.input_ids == full.input_ids[:cut] and enc.labels == full.labels[:cut]
    assert sum(lab != IGNORE_INDEX for lab in enc.labels) == 3

    with pytest.raises(SampleError, match="no assistant token") as info:
        encode_conversation(
            tok, messages, tokens_per_image=TPI, num_images=1, max_length=first_label, truncation="truncate"
        )
    assert info.value.kind == "answer_truncated"

    for cut in (slot0 + 1, slot0 + TPI - 1, slot0):  # inside the image's slots / before them
        with pytest.raises(SampleError, match="image") as info:
            encode_conversation(
                tok, messages, tokens_per_image=TPI, num_images=1, max_length=cut, truncation="truncate"
            )
        assert info.value.kind == "image_truncated"

    with pytest.raises(ValueError, match="truncation"):
        encode_conversation(tok, messages, tokens_per_image=TPI, max_length=5, truncation="left")


def test_template_without_generation_markers(tok):
    """Published templates have no markers: the answer spans are derived (tests/test_chat_templates.py has more)."""
    plain = copy.deepcopy(tok)
    plain.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    enc = encode_conversation(plain, msgs("Q?", "A.", "Why?", "B!"), tokens_per_image=TPI)
    check_assistant_labels(plain, enc, ["A.", "B!"])


def test_template_without_prefix_property(tok):
    # The rendering depends on the number of messages, so no prompt is a prefix of the conversation.
    plain = copy.deepcopy(tok)
    plain.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    with pytest.raises(SampleError, match="message 1 \\(assistant\\).*not a prefix") as info:
        encode_conversation(plain, msgs("Q?", "A."), tokens_per_image=TPI)
    assert info.value.kind == "template"


def test_no_assistant_turn(tok):
    with pytest.raises(SampleError, match="no assistant") as info:
        encode_conversation(tok, msgs("Only a question?"), tokens_per_image=TPI)
    assert info.value.kind == "bad_format"


# --------------------------------------------------------------------------- dataset


@pytest.fixture
def data_dir(tmp_path):
    save_image(tmp_path / "imgs" / "a.png", (40, 20))
    save_image(tmp_path / "imgs" / "b.png", (24, 36), (10, 200, 10))
    (tmp_path / "imgs" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return tmp_path


def good_samples():
    return [
        {"id": "t1", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
        {
            "id": "i1",
            "image": "imgs/a.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A red box."}],
        },
        {
            "id": "i2",
            "image": ["imgs/a.png", "imgs/b.png"],
            "conversations": [
                {"from": "human", "value": "<image> and <image>: same colour?"},
                {"from": "gpt", "value": "No."},
            ],
        },
        {  # one image, no placeholder: LLaVA convention
            "id": "i3",
            "image": "imgs/b.png",
            "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Green."}],
        },
    ]


def test_dataset_items(tokenizers, preprocessor, data_dir):
    tok = tokenizers["chatml"]
    path = write_json(data_dir / "data.json", good_samples())
    ds = ConversationDataset(path, tokenizer=tok, tokens_per_image=TPI, preprocessor=preprocessor)
    assert len(ds) == 4 and ds.ids == ["t1", "i1", "i2", "i3"]
    assert ds.has_image == [False, True, True, True]
    assert ds.stats.seen == 4 and ds.stats.used == 4 and not ds.stats.skipped

    t1 = ds[0]
    assert t1["id"] == "t1" and t1["pixel_values"] is None
    assert t1["input_ids"].dtype == torch.long and t1["labels"].dtype == torch.long
    assert ds.lengths[0] == len(t1["input_ids"]) == len(t1["labels"])

    i2 = ds[2]
    assert i2["pixel_values"].shape == (2, 3, 16, 16) and i2["pixel_values"].dtype == torch.float32
    assert int((i2["input_ids"] == IMAGE_TOKEN_ID).sum()) == 2 * TPI
    assert torch.equal(i2["pixel_values"][0], ds[1]["pixel_values"][0])  # same file, same tensor
    assert torch.all(i2["labels"][i2["input_ids"] == IMAGE_TOKEN_ID] == IGNORE_INDEX)
    i3 = ds[3]
    assert int((i3["input_ids"] == IMAGE_TOKEN_ID).sum()) == TPI and i3["pixel_values"].shape[0] == 1
    # Same encoding as encode_conversation directly.
    enc = encode_conversation(tok, to_messages(good_samples()[1]["conversations"]), tokens_per_image=TPI, num_images=1)
    assert ds[1]["input_ids"].tolist() == enc.input_ids and ds[1]["labels"].tolist() == enc.labels

    # JSONL and an explicit image_root give the same dataset.
    sub = data_dir / "sub"
    sub.mkdir()
    path2 = write_jsonl(sub / "data.jsonl", good_samples())
    ds2 = ConversationDataset(
        path2, tokenizer=tok, tokens_per_image=TPI, preprocessor=preprocessor, image_root=data_dir
    )
    assert ds2.lengths == ds.lengths and torch.equal(ds2[2]["input_ids"], i2["input_ids"])


def test_dataset_skips_and_counts_bad_samples(tokenizers, preprocessor, data_dir):
    long_q = " ".join(["Describe the image in one sentence."] * 20)
    samples = good_samples() + [
        {"id": "miss", "image": "imgs/nope.png", "conversations": good_samples()[1]["conversations"]},
        {"id": "pm", "image": "imgs/a.png", "conversations": good_samples()[2]["conversations"]},
        {"id": "long", "conversations": [{"from": "human", "value": long_q}, {"from": "gpt", "value": "Ok."}]},
        {"id": "role", "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"id": "noconv"},
        "not an object",
        {"id": "img", "image": 7, "conversations": good_samples()[0]["conversations"]},
    ]
    path = write_json(data_dir / "data.json", samples)
    ds = ConversationDataset(
        path, tokenizer=tokenizers["llama3"], tokens_per_image=TPI, preprocessor=preprocessor, max_length=60
    )
    assert ds.ids == ["t1", "i1", "i2", "i3"]
    assert ds.stats.seen == 11 and ds.stats.used == 4
    assert ds.stats.skipped == Counter(missing_image=1, placeholder_mismatch=1, overlong=1, bad_format=4)

    # truncation="truncate": the long sample is kept, cut to max_length... unless that drops the answer.
    ds_t = ConversationDataset(
        path, tokenizer=tokenizers["llama3"], tokens_per_image=TPI, preprocessor=preprocessor,
        max_length=60, truncation="truncate",
    )
    assert "long" not in ds_t.ids and ds_t.stats.skipped["answer_truncated"] == 1


def test_dataset_error_mode_names_sample_and_file(tokenizers, preprocessor, data_dir):
    samples = good_samples() + [
        {"id": "miss", "image": "imgs/nope.png", "conversations": good_samples()[1]["conversations"]}
    ]
    path = write_jsonl(data_dir / "data.jsonl", samples)
    with pytest.raises(SampleError) as info:
        ConversationDataset(
            path, tokenizer=tokenizers["chatml"], tokens_per_image=TPI, preprocessor=preprocessor, on_bad_sample="error"
        )
    msg = str(info.value)
    assert info.value.kind == "missing_image" and info.value.sample_id == "miss"
    assert "'miss'" in msg and "nope.png" in msg and "data.jsonl" in msg and "line 5" in msg and "index 4" in msg

    with pytest.raises(ValueError, match="on_bad_sample"):
        ConversationDataset(
            path, tokenizer=tokenizers["chatml"], tokens_per_image=TPI, preprocessor=None, on_bad_sample="x"
        )
    with pytest.raises(ValueError, match="no preprocessor"):
        ConversationDataset(path, tokenizer=tokenizers["chatml"], tokens_per_image=TPI, preprocessor=None)


def test_template_error_is_never_skipped(tokenizers, preprocessor, data_dir):
    plain = copy.deepcopy(tokenizers["chatml"])
    plain.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = write_json(data_dir / "data.json", good_samples()[:1])
    with pytest.raises(SampleError, match="not a prefix") as info:
        ConversationDataset(path, tokenizer=plain, tokens_per_image=TPI, preprocessor=preprocessor)
    assert info.value.kind == "template"


def test_corrupt_image_at_getitem(tokenizers, preprocessor, data_dir):
    samples = good_samples() + [
        {"id": "bad", "image": "imgs/corrupt.jpg", "conversations": good_samples()[1]["conversations"]}
    ]
    path = write_json(data_dir / "data.json", samples)
    kw = dict(tokenizer=tokenizers["chatml"], tokens_per_image=TPI, preprocessor=preprocessor)
    ds = ConversationDataset(path, **kw)
    assert ds.ids[-1] == "bad" and ds.stats.used == 5  # exists: only decoded lazily
    assert ds[4] is None and ds[4] is None  # counted once
    assert ds.stats.skipped == Counter(bad_image=1) and ds.stats.used == 4 and ds.stats.seen == 5
    batch = collate([ds[1], ds[4], ds[0]], pad_token_id=0)
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 1
    assert collate([ds[4], None], pad_token_id=0) is None

    ds_err = ConversationDataset(path, on_bad_sample="error", **kw)
    with pytest.raises(SampleError) as info:
        ds_err[4]
    msg = str(info.value)
    assert info.value.kind == "bad_image" and "'bad'" in msg and "corrupt.jpg" in msg and "data.json" in msg


def test_malformed_files(tokenizers, preprocessor, tmp_path):
    kw = dict(tokenizer=tokenizers["chatml"], tokens_per_image=TPI, preprocessor=preprocessor)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b" "conversations": []}\n]\n')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON at line 3 column"):
        ConversationDataset(bad_json, **kw)

    bad_jsonl = tmp_path / "bad.jsonl"
    good = json.dumps(good_samples()[0])
    bad_jsonl.write_text(good + "\n\n" + good + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: invalid JSON at line 4"):
        ConversationDataset(bad_jsonl, **kw)

    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"data": good_samples()}, indent=2))
    with pytest.raises(ValueError, match="expected a JSON list"):
        ConversationDataset(obj, **kw)

    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        ConversationDataset(empty, **kw)

    all_bad = write_json(tmp_path / "allbad.json", [{"id": "x"}])
    with pytest.raises(ValueError, match="no usable samples"):
        ConversationDataset(all_bad, **kw)


def test_collate_pads_right():
    items = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "pixel_values": None, "id": "a"},
        {
            "input_ids": torch.tensor([IMAGE_TOKEN_ID, 8]),
            "labels": torch.tensor([-100, 8]),
            "pixel_values": torch.ones(1, 3, 4, 4),
            "id": "b",
        },
        None,
        {
            "input_ids": torch.tensor([9]),
            "labels": torch.tensor([9]),
            "pixel_values": torch.zeros(2, 3, 4, 4),
            "id": "c",
        },
    ]
    out = collate(items, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [IMAGE_TOKEN_ID, 8, 0], [9, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [-100, 8, -100], [9, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert out["pixel_values"].shape == (3, 3, 4, 4)
    assert out["pixel_values"][0].eq(1).all() and out["pixel_values"][1:].eq(0).all()
    assert collate(items[:1], pad_token_id=0)["pixel_values"] is None
    assert collate([None, None], pad_token_id=0) is None
    with pytest.raises(ValueError):
        collate(items, pad_token_id=None)


def test_collate_with_dataloader(tokenizers, preprocessor, data_dir):
    tok = tokenizers["chatml"]
    ds = ConversationDataset(write_json(data_dir / "d.json", good_samples()), tokenizer=tok, tokens_per_image=TPI,
                             preprocessor=preprocessor)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.collate_fn())
    (batch,) = list(loader)
    assert batch["input_ids"].shape == (4, max(ds.lengths))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)  # 0 + 1 + 2 + 1 images, in order
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()


# --------------------------------------------------------------------------- sampler


def _batches(order, bs):
    return [order[k : k + bs] for k in range(0, len(order), bs)]


def test_sampler_groups_modalities_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    n, bs = 103, 4
    lengths = torch.randint(5, 500, (n,), generator=g).tolist()
    has_image = (torch.rand(n, generator=g) < 0.6).tolist()
    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=bs, seed=1, mega_batch_mult=100)
    order = list(sampler)
    assert sorted(order) == list(range(n)) and len(sampler) == n
    batches = _batches(order, bs)
    mixed = [b for b in batches if len({has_image[i] for i in b}) > 1]
    assert len(mixed) <= 1 and (not mixed or mixed[0] in batches[-2:])
    # One mega-batch per modality: the full batches are consecutive chunks of the lengths sorted.
    for modality in (True, False):
        ranked = sorted((lengths[i] for i in range(n) if has_image[i] == modality), reverse=True)
        chunks = [ranked[k : k + bs] for k in range(0, len(ranked) - bs + 1, bs)]
        got = [[lengths[i] for i in b] for b in batches if len(b) == bs and {has_image[i] for i in b} == {modality}]
        assert sorted(got) == sorted(chunks)

    assert list(ModalityLengthGroupedSampler(lengths, has_image, bs, seed=1, mega_batch_mult=100)) == order
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != order and sorted(epoch1) == list(range(n))
    sampler.set_epoch(0)
    assert list(sampler) == order
    assert list(ModalityLengthGroupedSampler(lengths, has_image, bs, seed=2, mega_batch_mult=100)) != order
    fixed = ModalityLengthGroupedSampler(lengths, has_image, bs, seed=1, shuffle=False)
    assert list(fixed) == list(ModalityLengthGroupedSampler(lengths, has_image, bs, seed=9, shuffle=False))

    # Small mega-batches: still single-modality batches, lengths sorted inside each mega-batch.
    small = ModalityLengthGroupedSampler(lengths, has_image, batch_size=bs, seed=3, mega_batch_mult=2)
    sb = _batches(list(small), bs)
    assert sum(len({has_image[i] for i in b}) > 1 for b in sb) <= 1
    for b in sb[:-2]:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_sampler_with_dataloader_batches():
    lengths = [10, 50, 20, 40, 30, 60, 70, 80]
    has_image = [True, False, True, False, True, False, True, False]
    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, sampler=sampler)
    for batch in loader:
        assert len({has_image[i] for i in batch.tolist()}) == 1
    with pytest.raises(ValueError):
        ModalityLengthGroupedSampler([1, 2], [True], batch_size=2)


# --------------------------------------------------------------------------- boxes


def test_to_square_box_wide_and_tall():
    # Wide 200x100: side 200, image pasted at (0, 50).
    assert to_square_box([20, 10, 120, 60], 200, 100) == pytest.approx([0.10, 0.30, 0.60, 0.55])
    assert to_square_box([20, 10, 100, 50], 200, 100, fmt="xywh") == pytest.approx([0.10, 0.30, 0.60, 0.55])
    # Tall 100x200: side 200, image pasted at (50, 0).
    assert to_square_box([10, 20, 60, 120], 100, 200) == pytest.approx([0.30, 0.10, 0.55, 0.60])
    assert to_square_box([10, 20, 50, 100], 100, 200, fmt="xywh") == pytest.approx([0.30, 0.10, 0.55, 0.60])
    # Odd difference 101x50: side 101, top = 51 // 2 = 25.
    assert to_square_box([0, 0, 101, 50], 101, 50) == pytest.approx([0, 25 / 101, 1, 75 / 101])
    # Square image: plain normalisation; clamping to [0, 1].
    assert to_square_box([8, 16, 32, 64], 64, 64) == pytest.approx([0.125, 0.25, 0.5, 1.0])
    assert to_square_box([-10, 0, 300, 50], 200, 100) == pytest.approx([0.0, 0.25, 1.0, 0.5])


def test_to_square_box_rejects_bad_input():
    for args, kwargs in [
        (([30, 10, 20, 60], 200, 100), {}),  # x2 < x1
        (([10, 60, 20, 10], 200, 100), {}),  # y2 < y1
        (([10, 10, -5, 20], 200, 100), {"fmt": "xywh"}),
        (([10, 10, 5, 20], 200, 100), {"fmt": "cxcywh"}),
        (([10, 10, 5], 200, 100), {}),
        (([10, 10, 5, float("nan")], 200, 100), {}),
        (([1, 1, 2, 2], 0, 100), {}),
    ]:
        with pytest.raises(ValueError):
            to_square_box(*args, **kwargs)


def test_format_parse_iou():
    assert format_box([0.1, 0.3, 0.6, 0.55]) == "[0.10,0.30,0.60,0.55]"
    assert format_box([0.12345, 0, 1, -0.0001], decimals=3) == "[0.123,0.000,1.000,0.000]"
    boxes = [[0.1, 0.3, 0.6, 0.55], [0.0, 0.25, 1.0, 0.5]]
    text = format_boxes(boxes)
    assert text == "[0.10,0.30,0.60,0.55]; [0.00,0.25,1.00,0.50]"
    assert parse_boxes(text) == [pytest.approx(b) for b in boxes]
    assert parse_boxes("at [ 0.1 , 0.2,0.3 ,0.4 ] and [1, 2, 3, 4]; not [1,2] nor [a,b,c,d]") == [
        [0.1, 0.2, 0.3, 0.4],
        [1.0, 2.0, 3.0, 4.0],
    ]
    assert parse_boxes("no boxes") == []
    assert box_iou([0, 0, 2, 2], [0, 0, 2, 2]) == pytest.approx(1.0)
    assert box_iou([0, 0, 2, 2], [1, 0, 3, 2]) == pytest.approx(1 / 3)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
