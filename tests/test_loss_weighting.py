"""The trainer's loss weighting: per token (default), per sample, per task and per-sample weights."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from frozenvl.config import ConfigError
from frozenvl.data.chat import SampleError
from frozenvl.losses import causal_lm_loss
from frozenvl.train import TrainConfig
from frozenvl.train.trainer import Trainer

from .conftest import write_llava_data

SHORT, LONG = "red", "the box is [0.12,0.30,0.25,0.43] and [0.50,0.52,0.61,0.70]"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 image samples: even ones a one-word "vqa" answer, odd ones a long "grounding" answer."""
    path = write_llava_data(tmp_path_factory.mktemp("wdata"), n=8, with_text_only=False)
    records = json.load(open(path))
    for i, r in enumerate(records):
        r["task"] = "vqa" if i % 2 == 0 else "grounding"
        r["conversations"][1]["value"] = SHORT if i % 2 == 0 else LONG
    records[2]["loss_weight"] = 3.0
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def _cfg(llm, vis, path, out, data=None, **over) -> TrainConfig:
    cfg = {"llm": llm, "vision": vis, "output_dir": str(out),
           "workflow": {"name": "mm", "family": "inner_adaptor", "layers": [0]},
           "data": data or {"train": path, "max_length": 256},
           "stages": [{"name": "s", "train": ["connector", "adapter"], "lr": 1e-3, "steps": 1, "batch_size": 4,
                       "warmup_ratio": 0.0}],
           "save_every": 0, "log_every": 1, "seed": 0, **over}
    return TrainConfig.from_dict(cfg)


def _labelled(batch) -> torch.Tensor:
    return (batch["labels"][:, 1:] != -100).float()


def test_token_weights_as_stated(bases, data, tmp_path):
    llm, vis = bases()
    tr = Trainer(_cfg(llm, vis, data, tmp_path / "a", loss_weighting="sample", task_weights={"grounding": 0.5}),
                 show_progress=False)
    assert tr.sample_weights == [1.0, 0.5, 3.0, 0.5, 1.0, 0.5, 1.0, 0.5]
    assert not tr.uniform_loss
    batch = tr._load_micro([0, 1, 2, 3], tr.cfg.stages[0])
    w, mask = tr.token_weights(batch), _labelled(batch)
    n = mask.sum(1)
    assert n[1] > 3 * n[0]  # the long answer has many more label tokens
    assert torch.all(w[mask == 0] == 0)
    # per sample: each sample's tokens share its weight, so a row sums to the sample's weight
    torch.testing.assert_close(w.sum(1), torch.tensor([1.0, 0.5, 3.0, 0.5]))
    for row, weight in enumerate([1.0, 0.5, 3.0, 0.5]):
        torch.testing.assert_close(w[row][mask[row] == 1], torch.full((int(n[row]),), weight / float(n[row])))
    # per token: every label token carries its sample's weight
    tr.cfg.loss_weighting = "token"
    w = tr.token_weights(batch)
    torch.testing.assert_close(w.sum(1), torch.tensor([1.0, 0.5, 3.0, 0.5]) * n)


def _first_logged_loss(tr: Trainer) -> float:
    tr.train()
    rows = [json.loads(line) for line in open(os.path.join(tr.cfg.output_dir, "metrics.jsonl"))]
    return rows[0]["loss"]


def _per_sample_ce(tr: Trainer, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of CE and number of label tokens per sample, on the model as it is now (before step 1)."""
    batch = tr._load_micro(indices, tr.cfg.stages[0])
    with torch.no_grad():
        out = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], vision_features=batch.get("vision_features"),
                       image_rows=batch["image_rows"], task="mm")
    ce = causal_lm_loss(out.logits, batch["labels"], reduction="none").view(len(indices), -1)
    return ce.sum(1), _labelled(batch).sum(1)


@pytest.mark.parametrize("mode", ["token", "sample"])
def test_step_loss_is_the_weighted_mean(bases, data, tmp_path, mode):
    llm, vis = bases()
    tw = {"grounding": 0.25}
    tr = Trainer(_cfg(llm, vis, data, tmp_path / mode, loss_weighting=mode, task_weights=tw), show_progress=False)
    first = tr._epoch_order(0, 0, 4)[0]
    sums, n = _per_sample_ce(tr, first)
    w = torch.tensor([tr.sample_weights[i] for i in first])
    if mode == "sample":
        expected = float((w * sums / n).sum() / w.sum())
    else:
        expected = float((w * sums).sum() / (w * n).sum())
    plain = float(sums.sum() / n.sum())  # the unweighted token mean: what the weighting changes
    assert abs(expected - plain) > 1e-3
    assert math.isclose(_first_logged_loss(tr), expected, rel_tol=1e-5)


def test_default_is_the_plain_token_mean(bases, data, tmp_path):
    llm, vis = bases()
    records = json.load(open(data))
    for r in records:
        r.pop("loss_weight", None)
    plain_data = str(tmp_path / "plain.json")
    with open(plain_data, "w") as f:
        json.dump(records, f)
    tr = Trainer(_cfg(llm, vis, plain_data, tmp_path / "p", data={"train": plain_data, "max_length": 256,
                                                                  "image_root": os.path.dirname(data)}),
                 show_progress=False)
    assert tr.uniform_loss
    first = tr._epoch_order(0, 0, 4)[0]
    sums, n = _per_sample_ce(tr, first)
    assert math.isclose(_first_logged_loss(tr), float(sums.sum() / n.sum()), rel_tol=1e-5)


def test_bad_weighting_config_and_samples(bases, data, tmp_path):
    llm, vis = bases()
    with pytest.raises(ConfigError, match="loss_weighting 'tokens' is not one of"):
        _cfg(llm, vis, data, tmp_path / "x", loss_weighting="tokens")
    with pytest.raises(ConfigError, match=r"task_weights\['vqa'\] must be a finite number > 0"):
        _cfg(llm, vis, data, tmp_path / "x", task_weights={"vqa": 0})
    with pytest.raises(ConfigError, match=r"names task\(s\) \['grnding'\] that no sample .* \['grounding', 'vqa'\]"):
        Trainer(_cfg(llm, vis, data, tmp_path / "x", task_weights={"grnding": 2.0}), show_progress=False)
    records = json.load(open(data))
    records[0]["loss_weight"] = -1
    bad = str(tmp_path / "bad.json")
    with open(bad, "w") as f:
        json.dump(records, f)
    strict = {"train": bad, "image_root": os.path.dirname(data), "on_bad_sample": "error"}
    with pytest.raises(SampleError, match="'loss_weight' must be a finite number > 0, got -1"):
        Trainer(_cfg(llm, vis, bad, tmp_path / "y", data=strict), show_progress=False)
    lenient = Trainer(_cfg(llm, vis, bad, tmp_path / "z", data={**strict, "on_bad_sample": "skip"}),
                      show_progress=False)
    assert lenient.dataset.stats.skipped["bad_format"] == 1 and len(lenient.sample_weights) == 7
