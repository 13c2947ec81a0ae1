"""Training computes the head only at the positions that predict a label (`logits_mask`): the same
logits, loss and gradients as the full head, for a plain head and one widened by location tokens."""

from __future__ import annotations

import pytest
import torch

import frozenvl
from frozenvl.losses import causal_lm_loss, label_positions, selected_lm_loss
from frozenvl.train import TrainConfig
from frozenvl.train.trainer import Trainer

from .conftest import perturb, write_llava_data


def test_label_positions_pair_each_position_with_its_next_label():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, -100]])
    keep, targets = label_positions(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]
    assert targets.tolist() == [7, 8, 5]


@pytest.mark.parametrize("workflow", [{"family": "inner_adaptor", "layers": [0, 2]},
                                      {"family": "prefix", "location_tokens": 8}])
def test_selected_head_equals_the_full_head(bases, images, workflow):
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"w": workflow})
    perturb(model, "w")  # location rows and adapters away from their init
    inputs = model.prepare_inputs(["<image>\nwhat colour is it", "<image> and <image>: which is larger"],
                                  [[images[0]], [images[1], images[2]]], task="w")
    labels = inputs["input_ids"].clone()
    labels[:, :-6] = -100  # each row's last tokens are "the answer"
    labels[inputs["attention_mask"] == 0] = -100
    keep, targets = label_positions(labels)
    assert 0 < int(keep.sum()) < keep.numel() // 4

    def loss_and_grads(selected: bool):
        model.zero_grad(set_to_none=True)
        if selected:
            logits = model(**inputs, task="w", logits_mask=keep).logits
            loss = selected_lm_loss(logits, targets)
        else:
            logits = model(**inputs, task="w").logits
            loss = causal_lm_loss(logits, labels, reduction="sum")
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.workflow("w").named_parameters() if p.grad is not None}
        return logits.detach(), loss.detach(), grads

    full_logits, full_loss, full_grads = loss_and_grads(False)
    sel_logits, sel_loss, sel_grads = loss_and_grads(True)
    assert sel_logits.shape == (int(keep.sum()), full_logits.shape[-1])
    torch.testing.assert_close(sel_logits, full_logits[keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sel_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert full_grads and full_grads.keys() == sel_grads.keys()
    for name, g in full_grads.items():
        torch.testing.assert_close(sel_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="pass neither labels nor logits_to_keep"):
        model(**inputs, task="w", logits_mask=keep, labels=labels)


def test_trainer_computes_the_head_at_label_positions_only(bases, tmp_path):
    llm, vis = bases()
    data = write_llava_data(tmp_path, n=8, with_text_only=False)
    cfg = TrainConfig.from_dict({
        "llm": llm, "vision": vis, "output_dir": str(tmp_path / "run"),
        "workflow": {"name": "mm", "family": "inner_adaptor", "layers": [0]},
        "data": {"train": data, "max_length": 256},
        "stages": [{"name": "s", "train": ["connector", "adapter"], "lr": 1e-3, "steps": 2, "batch_size": 4}],
        "save_every": 0, "seed": 0})
    trainer = Trainer(cfg, show_progress=False)
    family = trainer.model.workflow("mm")
    seen, head = [], family.logits

    def recording(h):
        seen.append(tuple(h.shape))
        return head(h)

    family.logits = recording
    labelled = sum(int((trainer._load_micro(ix, cfg.stages[0])["labels"][:, 1:] != -100).sum())
                   for ix in trainer._epoch_order(0, 0, 4)[:2])
    trainer.train()
    # two steps, one micro-batch each: the head saw one row per label token, never a [batch, seq] block
    assert len(seen) == 2 and all(len(s) == 2 for s in seen)
    assert sum(s[0] for s in seen) == labelled
