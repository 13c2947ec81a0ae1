"""The demo's real track, the parts that need no real bases: per-family options, LLaVA's LLM rate,
chat-prompt items, per-item benchmark scores (deployed vs own path) on a tiny model."""

from __future__ import annotations

import pytest
import torch

import frozenvl
from frozenvl.eval import MCItem, score_multiple_choice
from frozenvl.shapesworld import real
from frozenvl.shapesworld.demo import BASES, run_demo

from .conftest import perturb


def test_fit_workflow_and_stages():
    wf = real.fit_workflow({"family": "prefix", "select_layer": -1})
    assert wf == {"family": "prefix", "connector": real.CONNECTOR_64}  # the tiny ViT's layer is dropped
    assert real.fit_workflow({"family": "adaption_prompt", "adapter_layers": 4})["adapter_layers"] == 8
    assert real.fit_workflow({"family": "bind", "select_layer": -1}) == {"family": "bind"}
    stages = [{"name": "align", "train": ["connector"], "lr": 2e-3},
              {"name": "tune", "train": ["connector", "llm"], "lr": {"connector": 1e-3, "llm": 3e-4}},
              {"name": "all", "train": ["connector", "llm"], "lr": 1e-3}]
    got = real.fit_stages(stages)
    assert got[0] == stages[0]
    assert got[1]["lr"] == {"connector": 1e-3, "llm": real.FULL_FINETUNE_LR}
    assert got[2]["lr"] == {"connector": 1e-3, "llm": real.FULL_FINETUNE_LR}
    assert stages[1]["lr"]["llm"] == 3e-4  # the inputs are not changed


def test_chat_items_are_held_out_prompts_without_gold():
    items = real.chat_items()
    assert len(items) >= 100 and len({it["question"] for it in items}) == len(items)
    assert all(it["qtype"] == "chat" and it["answer"] == "" and "image" not in it for it in items)
    assert [it["id"] for it in real.chat_items(3)] == ["chat-000", "chat-001", "chat-002"]


def test_unknown_bases_are_named(tmp_path):
    assert BASES == ("tiny", "real")
    with pytest.raises(ValueError, match="unknown bases 'huge'"):
        run_demo(str(tmp_path), bases="huge", chat=False, progress=False)


ITEMS = [MCItem("a", "The sky on a clear day is", (" blue", " green", " loud"), 0),
         MCItem("b", "Fire is", (" cold", " hot"), 1),
         MCItem("c", "Two plus two is", (" four", " five", " six"), 0)]


def test_benchmark_scores_deployed_and_own_path(bases):
    llm, vis = bases("llama")
    model = frozenvl.build(llm, vis, workflows={"iaa": {"family": "inner_adaptor", "layers": [0]}})
    perturb(model, "iaa", scale=0.5)  # its own path now differs from the base
    benches = {"arc_easy": ITEMS}
    base = real.benchmark_correct(model, benches, "text", deployed=False)
    res = score_multiple_choice(model, ITEMS, task="text")
    want = [float(max(range(len(lp)), key=lp.__getitem__) == g) for lp, g in zip(res.logprobs, res.gold)]
    assert base["arc_easy"] == want and sum(want) == pytest.approx(len(ITEMS) * res.acc)
    got = real.text_skill_predictions(model, benches, "iaa", base)
    assert [p["id"] for p in got["arc_easy"]] == ["a", "b", "c"]
    assert [p["score"] for p in got["arc_easy"]] == base["arc_easy"]  # deployed through the base
    own = score_multiple_choice(model, ITEMS, task="iaa")
    assert not torch.allclose(torch.tensor(own.logprobs[0]), torch.tensor(res.logprobs[0]))  # really its own path
    assert [p["score"] for p in got["arc_easy_own"]] == [
        float(max(range(len(lp)), key=lp.__getitem__) == g) for lp, g in zip(own.logprobs, own.gold)]


def test_sentence_answers_are_right_only_when_they_name_the_answer_alone():
    from frozenvl.shapesworld.bases import names_only_the_answer

    colours = {"red", "blue", "green"}
    assert names_only_the_answer("The circle is Red.", "red", colours) == 1.0
    assert names_only_the_answer("It is red or blue.", "red", colours) == 0.0  # hedging between candidates
    assert names_only_the_answer("It is blue.", "red", colours) == 0.0
    assert names_only_the_answer("A reddish one.", "red", colours) == 0.0  # whole words only
    assert names_only_the_answer("There are three shapes.", "3", {"1", "2", "3", "4"}) == 1.0
    assert names_only_the_answer("There are 3, not 4.", "3", {"1", "2", "3", "4"}) == 0.0
    assert names_only_the_answer("The red circle.", "red circle", {"red circle", "blue square"}) == 1.0
