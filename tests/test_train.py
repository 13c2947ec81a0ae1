"""Training engine: stages, frozen base, skip/strict data policies, crash-safe resume, two processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

import frozenvl
from frozenvl.config import ConfigError
from frozenvl.data.chat import SampleError
from frozenvl.train import TrainConfig, train
from frozenvl.train.trainer import base_checksum

from .conftest import write_llava_data


def _config(llm, vis, data, out, **over):
    cfg = {
        "llm": llm,
        "vision": vis,
        "output_dir": str(out),
        "workflow": {"name": "mm", "family": "inner_adaptor", "layers": [0, 2]},
        "data": {"train": data, "max_length": 256},
        "stages": [
            {"name": "align", "train": ["connector"], "lr": 1e-2, "steps": 3, "batch_size": 4, "warmup_ratio": 0.0},
            {"name": "tune", "train": ["connector", "adapter"], "lr": {"connector": 1e-3, "adapter": 1e-3},
             "steps": 4, "batch_size": 2, "grad_accum": 2, "schedule": "constant", "warmup_ratio": 0.0},
        ],
        "save_every": 2,
        "keep_last": 2,
        "log_every": 1,
        "seed": 0,
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_llava_data(tmp_path_factory.mktemp("data"), n=12)


def test_two_stages_train_only_what_each_stage_names(bases, data, tmp_path):
    llm, vis = bases()
    cfg = TrainConfig.from_dict(_config(llm, vis, data, tmp_path / "run"))
    cfg.stages = cfg.stages[:1]  # stage 1 alone: only the connector may move
    model = frozenvl.build(llm, vis, workflows={"mm": cfg.workflow_config()})
    fam = model.workflows["mm"]
    adapter0 = {n: p.detach().clone() for n, p in fam.adaptors.named_parameters()}
    conn0 = {n: p.detach().clone() for n, p in fam.connector.named_parameters()}
    base0 = base_checksum(model)
    res = train(cfg, model=model, show_progress=False)
    assert res.steps == 3 and res.base_unchanged and base_checksum(model) == base0
    assert all(torch.equal(adapter0[n], p) for n, p in fam.adaptors.named_parameters())
    assert any(not torch.equal(conn0[n], p) for n, p in fam.connector.named_parameters())
    # the run dir is a frozenvl model dir
    loaded = frozenvl.load(tmp_path / "run")
    inputs = model.prepare_inputs("<image> what colour", [os.path.join(os.path.dirname(data), "images/0.png")], "mm")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, task="mm").logits, model(**inputs, task="mm").logits)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)


def test_full_run_lowers_the_loss_and_keeps_base(bases, data, tmp_path):
    llm, vis = bases()
    cfg = _config(llm, vis, data, tmp_path / "run")
    cfg["stages"] = [{"name": "s", "train": ["connector", "adapter", "head"], "lr": 3e-3, "steps": 12,
                      "batch_size": 4, "warmup_ratio": 0.0, "schedule": "constant"}]
    res = train(cfg, show_progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert res.base_unchanged and res.tokens > 0
    summary = json.load(open(tmp_path / "run" / "train_summary.json"))
    assert summary["steps"] == 12


def test_llm_train_full_changes_only_the_workflow_copy(bases, data, tmp_path):
    llm, vis = bases()
    cfg = _config(llm, vis, data, tmp_path / "run", workflow={"name": "mm", "family": "prefix", "llm_train": "full"})
    cfg["stages"] = [{"name": "s", "train": ["connector", "llm"], "lr": 1e-3, "steps": 2, "batch_size": 4}]
    model = frozenvl.build(llm, vis, workflows={})
    base0 = base_checksum(model)
    res = train(cfg, model=model, show_progress=False)
    own = model.workflows["mm"].own_llm
    # the fine-tuned copy moved away from the base; the base (what `text` runs) did not
    assert not torch.equal(own.lm_head.weight, model.llm.lm_head.weight)
    assert res.base_unchanged and base_checksum(model) == base0
    saved = load_file(str(tmp_path / "run" / "workflow-mm.safetensors"))
    assert any(k.startswith("own_llm.") for k in saved)


def test_bad_samples_are_counted_or_stop_the_run(bases, tmp_path):
    llm, vis = bases()
    data = write_llava_data(tmp_path / "d", n=12, bad={0: "missing", 1: "corrupt"})
    cfg = _config(llm, vis, data, tmp_path / "run")
    cfg["stages"] = cfg["stages"][:1]
    res = train(cfg, show_progress=False)
    assert res.skipped.get("missing_image") == 1
    assert res.skipped.get("bad_image", 0) >= 1
    strict = _config(llm, vis, data, tmp_path / "strict")
    strict["data"]["on_bad_sample"] = "error"
    with pytest.raises(SampleError, match="s0"):
        train(strict, show_progress=False)


def test_config_errors_are_clear(bases, data, tmp_path):
    llm, vis = bases()
    cfg = _config(llm, vis, data, tmp_path)
    cfg["stages"][0]["train"] = ["conector"]
    with pytest.raises(ConfigError, match="'conector' is neither a part"):
        train(cfg, show_progress=False)
    cfg = _config(llm, vis, data, tmp_path)
    cfg["stages"][0]["epochs"] = 1
    with pytest.raises(ConfigError, match="exactly one of epochs or steps"):
        TrainConfig.from_dict(cfg)
    cfg = _config(llm, vis, data, tmp_path)
    cfg["stages"][1]["lr"] = {"connector": 1e-3}
    with pytest.raises(ConfigError, match="lr has no entry for 'adapter'"):
        train(cfg, show_progress=False)
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig.from_dict({**_config(llm, vis, data, tmp_path), "lr": 1})


def _final_weights(run_dir):
    return load_file(os.path.join(run_dir, "workflow-mm.safetensors"))


@pytest.fixture(scope="module")
def dropout_llm(bases, tmp_path_factory):
    """The tiny base with attention dropout configured: the frozen base runs in eval mode (no dropout),
    but inner_adaptor's trainable copies of its layers drop out while training, consuming the RNG."""
    llm, _ = bases()
    out = tmp_path_factory.mktemp("dropout") / "llm"
    shutil.copytree(llm, out)
    conf = json.loads((out / "config.json").read_text())
    conf["attention_dropout"] = 0.1
    (out / "config.json").write_text(json.dumps(conf))
    return str(out)


def test_sigkill_and_resume_gives_the_same_weights(bases, dropout_llm, data, tmp_path):
    _, vis = bases()
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"

    def config(out):
        cfg = _config(dropout_llm, vis, data, out)
        # Resumed mid-warmup of a cosine schedule: a scheduler started afresh gives other learning rates.
        cfg["stages"][1].update(schedule="cosine", warmup_ratio=0.5)
        return cfg

    train(config(ref_dir), show_progress=False)
    rows = [json.loads(line) for line in open(ref_dir / "metrics.jsonl")]
    # stage 2's rate after each of its 4 steps: 2 steps of warmup, then cosine down to 0
    assert [r["lr"] for r in rows[3:]] == pytest.approx([5e-4, 1e-3, 5e-4, 0.0], abs=1e-12)

    cfg_path = tmp_path / "crash.yaml"
    cfg_path.write_text(yaml.safe_dump(config(crash_dir)))
    # The child kills itself with SIGKILL after optimizer step 5 (stage 2, mid-epoch; checkpoint at step 4).
    script = textwrap.dedent(f"""
        import os, signal
        from frozenvl.train import train
        def die(trainer, pos):
            if pos.global_step == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        train({str(cfg_path)!r}, show_progress=False, callbacks=[die])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = sorted(os.listdir(crash_dir / "checkpoints"))
    assert ckpts[-1] == "step-00000004" and not (crash_dir / "workflow-mm.safetensors").exists()

    res = train(str(cfg_path), resume=True, show_progress=False)
    assert res.resumed_from.endswith("step-00000004") and res.steps == 7
    ref, got = _final_weights(ref_dir), _final_weights(crash_dir)
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert len(os.listdir(crash_dir / "checkpoints")) == 2  # keep_last


def test_two_processes_match_one(bases, data, tmp_path):
    llm, vis = bases()
    one = _config(llm, vis, data, tmp_path / "one")
    one["stages"] = [{"name": "s", "train": ["connector", "adapter"], "lr": 1e-3, "steps": 3, "batch_size": 4,
                      "grad_accum": 1, "warmup_ratio": 0.0}]
    # modality grouping puts the text-only samples together: some process gets a micro-batch in which
    # the connector is unused (DDP must cope), and both runs still see the same global batches
    one["data"]["group_by"] = "modality_length"
    two = json.loads(json.dumps(one))
    two["output_dir"] = str(tmp_path / "two")
    two["stages"][0]["batch_size"] = 2  # 2 processes x 2 = the same global batch of 4
    train(one, show_progress=False)
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(two))
    script = tmp_path / "run2.py"
    # Registered before train(), so it runs after frozenvl's own exit hook (atexit is last in, first
    # out): the process group must be gone before interpreter finalization, where gloo's threads can
    # abort a finished run (SIGABRT, "terminate called without an active exception").
    script.write_text(textwrap.dedent(f"""
        import atexit, os, pathlib, torch
        from frozenvl.train import train
        report = pathlib.Path({str(tmp_path)!r}) / ("alive-at-exit-" + os.environ["RANK"])
        atexit.register(lambda: report.write_text(str(torch.distributed.is_initialized())))
        train({str(cfg_path)!r}, show_progress=False)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", str(script)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"alive-at-exit-{r}").read_text() for r in (0, 1)] == ["False", "False"]
    a, b = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    la = [json.loads(x)["loss"] for x in open(tmp_path / "one" / "metrics.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(la) == len(lb) == 3
    assert all(abs(x - y) <= 1e-5 * max(1.0, abs(x)) for x, y in zip(la, lb))


def test_gradient_checkpointing_gives_the_same_training(bases, data, tmp_path):
    llm, vis = bases()
    runs = {}
    for gc in (False, True):
        cfg = _config(llm, vis, data, tmp_path / f"gc{gc}", gradient_checkpointing=gc)
        cfg["stages"] = [{"name": "s", "train": ["connector", "adapter"], "lr": 1e-3, "steps": 2, "batch_size": 4}]
        train(cfg, show_progress=False)
        runs[gc] = _final_weights(tmp_path / f"gc{gc}")
    for k in runs[False]:
        torch.testing.assert_close(runs[True][k], runs[False][k], atol=1e-6, rtol=1e-5)
    # and it was really on: every decoder layer (frozen ones too) runs under torch.utils.checkpoint
    from unittest import mock

    from frozenvl.train.trainer import Trainer

    trainer = Trainer(TrainConfig.from_dict(_config(llm, vis, data, tmp_path / "x", gradient_checkpointing=True)),
                      show_progress=False)
    assert trainer.family.gradient_checkpointing
    real = torch.utils.checkpoint.checkpoint
    with mock.patch("torch.utils.checkpoint.checkpoint", side_effect=real) as spy:
        trainer.model.train()
        batch = trainer._load_micro(list(range(4)), trainer.cfg.stages[0])
        # (the trainer's feature memo hands the images' vision features in place of their pixels)
        trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"], vision_features=batch.get("vision_features"),
                      image_rows=batch.get("image_rows"), task="mm").logits.sum().backward()
    assert spy.call_count == trainer.model.llm.config.num_hidden_layers


def test_reused_output_dir_and_tiny_dataset_are_clear_errors(bases, data, tmp_path):
    llm, vis = bases()
    cfg = _config(llm, vis, data, tmp_path / "run")
    cfg["stages"] = cfg["stages"][:1]
    train(cfg, show_progress=False)
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run"):
        train(cfg, show_progress=False)
    cfg = _config(llm, vis, data, tmp_path / "big")
    cfg["stages"] = [{"name": "s", "train": ["connector"], "steps": 1, "batch_size": 4}]
    small = write_llava_data(tmp_path / "small", n=3)
    cfg["data"]["train"] = small
    res = train(cfg, show_progress=False)  # one process: a partial micro-batch is fine
    assert res.steps == 1


def test_a_family_that_changes_the_base_while_being_attached_is_caught(bases, data, tmp_path, monkeypatch):
    """The base checksum is taken before the trainer attaches the workflow, so a family whose
    construction alters a base weight fails the run (it used to pass: the checksum came after)."""
    from frozenvl.families.bind import BindFamily

    llm, vis = bases()
    real_init = BindFamily.__init__

    def tampering_init(self, cfg, base, vision_hidden):
        real_init(self, cfg, base, vision_hidden)
        with torch.no_grad():
            base.model.layers[0].mlp.down_proj.weight.mul_(1.01)

    monkeypatch.setattr(BindFamily, "__init__", tampering_init)
    cfg = _config(llm, vis, data, tmp_path / "run", workflow={"name": "mm", "family": "bind"})
    cfg["stages"] = [{"name": "s", "train": ["bind"], "lr": 1e-3, "steps": 1, "batch_size": 4}]
    with pytest.raises(RuntimeError, match="frozen base weights changed"):
        train(cfg, show_progress=False)  # the trainer loads the base itself
    model = frozenvl.build(llm, vis, workflows={})
    cfg["output_dir"] = str(tmp_path / "given")
    with pytest.raises(RuntimeError, match="frozen base weights changed"):
        train(cfg, model=model, show_progress=False)  # a loaded base handed in, the workflow attached by train
    assert json.load(open(tmp_path / "given" / "train_summary.json"))["base_unchanged"] is False
