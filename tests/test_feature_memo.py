"""The trainer keeps each image's frozen vision features after first use (`data.feature_cache_mb`):
training is the same as re-reading and re-encoding every image, each image is read once, the memo
stays within its bound, and workflows that do not read plain tower features do not use it."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from frozenvl.config import ConfigError
from frozenvl.train import TrainConfig
from frozenvl.train.feature_memo import VisionFeatureMemo
from frozenvl.train.trainer import Trainer

from .conftest import write_llava_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The llava fixture (one image, text-only and one corrupt image among them) plus two-image samples."""
    root = tmp_path_factory.mktemp("memo")
    path = write_llava_data(root, n=12, bad={5: "corrupt"})
    records = json.load(open(path))
    for k, (a, b) in enumerate([(0, 1), (2, 0)]):
        records.append({"id": f"pair{k}", "image": [f"images/{a}.png", f"images/{b}.png"], "conversations": [
            {"from": "human", "value": "<image> then <image>: the same colour?"}, {"from": "gpt", "value": "no"}]})
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def _cfg(llm, vis, data, out, workflow=None, **data_over):
    return TrainConfig.from_dict({
        "llm": llm, "vision": vis, "output_dir": str(out),
        "workflow": workflow or {"name": "mm", "family": "inner_adaptor", "layers": [0, 2]},
        "data": {"train": data, "max_length": 256, **data_over},
        "stages": [{"name": "s", "train": ["connector", "adapter"], "lr": 1e-3, "steps": 8, "batch_size": 4}],
        "save_every": 0, "seed": 0})


def _counting_reads(trainer: Trainer) -> list[tuple[int, str]]:
    """(step, path) of every image the dataset reads from disk from now on."""
    reads: list[tuple[int, str]] = []
    pre, step = trainer.dataset.preprocessor, [0]

    def counting(paths):
        reads.extend((step[0], p) for p in paths)
        return pre(paths)

    trainer.dataset.preprocessor = counting
    trainer.callbacks.append(lambda tr, pos: step.__setitem__(0, pos.global_step))
    return reads


def _steps_per_image(reads) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for step, path in reads:
        out.setdefault(path, set()).add(step)
    return out


def test_kept_features_train_like_reencoding_and_read_each_image_once(bases, data, tmp_path):
    llm, vis = bases()
    weights, reads = {}, {}
    for mb in (0, 64):
        trainer = Trainer(_cfg(llm, vis, data, tmp_path / f"mb{mb}", feature_cache_mb=mb), show_progress=False)
        assert (trainer.feature_memo is None) == (mb == 0)
        reads[mb] = _counting_reads(trainer)
        trainer.train()
        weights[mb] = load_file(os.path.join(trainer.cfg.output_dir, "workflow-mm.safetensors"))
        assert trainer.dataset.stats.skipped["bad_image"] == 1  # the corrupt image is skipped either way
    memo = trainer.feature_memo
    # 8 steps of 4 over 13 samples: images come round again, and are read again without the memo
    assert any(len(steps) > 1 for steps in _steps_per_image(reads[0]).values())
    # with it, in one step only (the step that first meets an image may hold it twice), unless a
    # two-image sample is read whole for its other image: 0.png, 1.png and 2.png are in those
    read_in = _steps_per_image(reads[64])
    alone = {p: steps for p, steps in read_in.items() if os.path.basename(p) not in ("0.png", "1.png", "2.png")}
    assert len(alone) >= 5 and all(len(steps) == 1 for steps in alone.values()), read_in
    assert len(reads[64]) < len(reads[0]) / 2
    assert memo.hits > 0 and len(memo) == len(read_in) - 1  # the corrupt one never got features
    assert weights[0].keys() == weights[64].keys()
    changed = False
    first = Trainer(_cfg(llm, vis, data, tmp_path / "init"), show_progress=False).family.owned_state_dict()
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[64][name], w, rtol=1e-5, atol=1e-6, msg=lambda m: name + m)
        changed |= not torch.equal(w, first[name].to(w.dtype))
    assert changed  # the runs trained: equal weights are not both the initial ones


def test_the_memo_stays_within_its_bound(bases, data, tmp_path):
    llm, vis = bases()
    trainer = Trainer(_cfg(llm, vis, data, tmp_path / "small"), show_progress=False)
    one = trainer.model.vision_features("mm", trainer.dataset[0]["pixel_values"])[0]
    size = one.numel() * one.element_size()
    trainer.feature_memo = VisionFeatureMemo(max_bytes=2 * size + size // 2)  # room for two images
    reads = _counting_reads(trainer)
    trainer.train()
    memo = trainer.feature_memo
    assert len(memo) == 2 and memo.bytes == 2 * size <= memo.max_bytes
    assert any(len(steps) > 1 for steps in _steps_per_image(reads).values())  # the others were read again


@pytest.mark.parametrize("workflow", [
    {"name": "ve", "family": "visual_experts", "connector": "monolithic:size=32,patch=8"},  # pixels, no tower
    {"name": "tiles", "family": "prefix", "tiling": "dynamic", "max_tiles": 2},
])
def test_workflows_that_read_more_than_tower_features_do_not_keep_them(bases, data, tmp_path, workflow):
    llm, vis = bases()
    cfg = _cfg(llm, vis, data, tmp_path / workflow["name"], workflow=workflow)
    cfg.stages[0].train = ["*"]
    assert Trainer(cfg, show_progress=False).feature_memo is None


def test_bad_feature_cache_mb_is_a_clear_error(bases, data, tmp_path):
    llm, vis = bases()
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="data.feature_cache_mb must be an integer >= 0"):
            _cfg(llm, vis, data, tmp_path / "x", feature_cache_mb=bad)
