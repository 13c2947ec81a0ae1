"""Location tokens (`location_tokens: N`, box format `loc<N>`): tokens added to the shared tokenizer
whose embedding and head rows the workflow owns, for every family; the base and `text` untouched;
trained, saved, loaded, generated and scored end to end."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import frozenvl
from frozenvl.config import ConfigError
from frozenvl.data.boxes import box_format
from frozenvl.eval import grounding_scores
from frozenvl.families import FAMILIES
from frozenvl.families.vocab import location_token_names, logits_with_rows
from frozenvl.train.trainer import base_checksum

from .conftest import assert_cache_matches_recompute, perturb

N = 16
PROMPT = "<image>\nwhere is the red square"
# options that fit the tiny bases (4 layers)
OPTIONS = {"adaption_prompt": {"adapter_len": 4, "adapter_layers": 2},
           "cross_attention": {"every": 1, "resampler_depth": 1, "resampler_latents": 4},
           "inner_adaptor": {"layers": [0, 2]}}


def test_location_token_names_and_format():
    assert location_token_names(8) == [f"<loc_{i}>" for i in range(8)]
    names = location_token_names(32)
    assert names[0] == "<loc_00>" and names[-1] == "<loc_31>" and len(set(names)) == 32
    fmt = box_format("loc32")
    text = fmt.render([0.1, 0.3, 0.25, 0.999])
    assert text == "<loc_03><loc_09><loc_08><loc_31>"
    assert all(t in names for t in text.replace(">", "> ").split())  # every token the format writes exists


def test_config_rejects_bad_counts():
    for bad in (1, -3, 10**6):
        with pytest.raises(ConfigError, match="location_tokens"):
            frozenvl.config.parse_workflow("g", {"family": "prefix", "location_tokens": bad})


def test_logits_with_rows_appends_or_writes_in_place():
    base = torch.arange(12.0).view(2, 6)
    extra = torch.tensor([[100.0, 101.0], [200.0, 201.0]])
    rows = lambda ids: logits_with_rows(base, extra, ids, torch.tensor(ids))  # noqa: E731
    assert torch.equal(rows([6, 7]), torch.cat([base, extra], -1))
    inside = rows([1, 4])  # a tokenizer shorter than the table: ids inside it
    assert inside.shape == (2, 6) and inside[0, 1] == 100 and inside[1, 4] == 201 and inside[0, 0] == 0
    beyond = rows([8, 9])  # a gap (another workflow's ids) is never sampled
    assert beyond.shape == (2, 10) and beyond[0, 6] == torch.finfo(base.dtype).min and beyond[1, 9] == 201


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_owns_its_location_rows(family, bases, images):
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"g": {"family": family, "location_tokens": N,
                                                          **OPTIONS.get(family, {})}})
    bare = AutoModelForCausalLM.from_pretrained(llm)
    tok = model.tokenizer
    base_vocab = bare.get_input_embeddings().num_embeddings
    fam = model.workflow("g")
    ids = tok.convert_tokens_to_ids(location_token_names(N))
    assert ids == list(range(len(tok) - N, len(tok))) and min(ids) >= base_vocab  # appended, after the base rows
    # plain tokens: one id per token in text, and decoded text keeps them (even skipping special tokens)
    box = box_format(f"loc{N}").render([0.1, 0.2, 0.6, 0.9])
    enc = tok(f"at {box}.", add_special_tokens=False)["input_ids"]
    assert [i for i in enc if i in ids] == tok.convert_tokens_to_ids(box.replace(">", "> ").split())
    assert box in tok.decode(enc, skip_special_tokens=True)
    assert "location" in fam.parts() and fam.loc_embed.shape == (N, bare.config.hidden_size)

    perturb(model, "g")
    inputs = model.prepare_inputs(f"{PROMPT} {box}", [images[0]], task="g")
    with torch.no_grad():
        out = model(**inputs, task="g").logits
    assert out.shape[-1] == len(tok) == base_vocab + N + len(fam.extra_tokens())
    # the workflow's rows: its embeddings at the location positions, its head rows for their columns
    input_ids = inputs["input_ids"]
    loc_pos = torch.isin(input_ids, torch.tensor(ids))
    assert int(loc_pos.sum()) == 4
    with torch.no_grad():
        emb = fam.embed_text(input_ids.clamp(min=0))
        want = fam.loc_embed[torch.tensor([ids.index(int(i)) for i in input_ids[loc_pos]])]
        assert torch.equal(emb[loc_pos], want.to(emb.dtype))
        assert not torch.equal(fam.loc_embed[0], fam.loc_embed[1])  # they start apart
    # the text workflow: the bare base, bit for bit, with the base's width
    text_in = model.prepare_inputs("where is the red square", task="text")
    with torch.no_grad():
        ref = bare(input_ids=text_in["input_ids"], attention_mask=text_in["attention_mask"]).logits
        got = model(**text_in, task="text").logits
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="beyond the base vocabulary"):
        model(input_ids=torch.tensor([ids[:2]]), attention_mask=torch.ones(1, 2, dtype=torch.long), task="text")


def test_generation_writes_location_tokens_and_cache_matches(bases, images):
    """Head rows that favour the location tokens: greedy output is location tokens, decoded as text and
    parsed as a box; cached generation equals recomputation with them in the sequence."""
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"g": {"family": "prefix", "location_tokens": N}})
    perturb(model, "g", scale=0.2)
    fam = model.workflow("g")
    with torch.no_grad():  # location logits far above the rest, varied by the hidden state
        fam.loc_head.mul_(20.0)
        fam.loc_head.add_(torch.randn_like(fam.loc_head) * 5.0)
    assert_cache_matches_recompute(model, "g", images, max_new_tokens=8, min_distinct=3)
    new = model.generate(prompt=PROMPT, images=[images[0]], task="g", max_new_tokens=8, eos_token_id=[])[0]
    ids = set(model.tokenizer.convert_tokens_to_ids(location_token_names(N)))
    assert set(new.tolist()) <= ids
    text = model.tokenizer.decode(new, skip_special_tokens=True)
    assert text.count("<loc_") == 8, text
    # the decoded text reads back as the same tokens, so a box in it is parsed from what was generated
    assert model.tokenizer(text, add_special_tokens=False)["input_ids"] == new.tolist()


def test_train_save_load_and_score_end_to_end(bases, tmp_path, images):
    """ShapesWorld grounding data in loc16 -> a prefix workflow with 16 location tokens trains its
    connector and location rows (the base bit-identical) -> saved and loaded, same logits -> scored."""
    from frozenvl.eval import evaluate, read_eval_file
    from frozenvl.shapesworld import generate
    from frozenvl.train import train

    root = tmp_path / "sw"
    generate(root, seed=0, n_train_images=6, n_eval_images=2, n_text_train=10, tasks=("grounding",),
             box_format=f"loc{N}")
    fmt = box_format(f"loc{N}")
    records = json.load(open(root / "train_grounding.json"))
    assert all(fmt.parse(r["conversations"][1]["value"]) for r in records)
    llm, vis = bases()
    out = tmp_path / "run"
    built = frozenvl.build(llm, vis, workflows={"g": {"family": "prefix", "location_tokens": N}})
    before = base_checksum(built)
    init_rows = built.workflow("g").loc_head.detach().clone()  # the mean row, whatever the seed
    train({"llm": llm, "vision": vis, "output_dir": str(out),
           "workflow": {"name": "g", "family": "prefix", "location_tokens": N},
           "data": {"train": str(root / "train_grounding.json"), "max_length": 256},
           "stages": [{"name": "s", "train": ["connector", "location"], "lr": 1e-2, "steps": 3, "batch_size": 4}],
           "save_every": 0, "seed": 0}, show_progress=False)
    model = frozenvl.load(out)
    fam = model.workflow("g")
    assert base_checksum(model) == before
    assert not torch.equal(fam.loc_head.detach(), init_rows)  # the head rows of the answers' tokens trained
    reloaded = frozenvl.load(out)
    inputs = model.prepare_inputs(PROMPT + " " + fmt.render([0.1, 0.1, 0.5, 0.5]), [images[0]], task="g")
    with torch.no_grad():
        assert torch.equal(model(**inputs, task="g").logits, reloaded(**inputs, task="g").logits)
    items = read_eval_file(root / "eval_grounding.jsonl")
    report = evaluate(model, items, task="g", max_new_tokens=8, progress=False)
    for p in report.predictions:
        assert p["box_format"] == f"loc{N}"
        assert (p["iou"], p["score"]) == grounding_scores(p["prediction"], p["answer"], box_format=f"loc{N}")
