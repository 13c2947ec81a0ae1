"""Tests for the `frozenvl` command line (CPU only, tiny random models built in a tmp dir)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import frozenvl
from frozenvl.cli import app
from frozenvl.model import FrozenVLModel

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
GEN = ["--max-new-tokens", "6"]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _own_tiny_bases(root: Path) -> tuple[str, str]:
    """Fallback when frozenvl.tiny is not there: tokenizer + tiny Llama + tiny CLIP vision tower."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    sentences = ["What is in the image?", "The red square is on the left.", "hello there, how are you?"] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(sentences, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )
    llm_dir, vis_dir = root / "llm", root / "vision"
    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    CLIPVisionModel(
        CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2,
        )
    ).save_pretrained(vis_dir)
    return str(llm_dir), str(vis_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("cli")
    try:
        from frozenvl.tiny import build_tiny_bases
    except ImportError:
        build_tiny_bases = _own_tiny_bases
    llm_dir, vis_dir = build_tiny_bases(root)
    model_dir = root / "model"
    frozenvl.build(llm_dir, vis_dir, workflows={"mm": {"family": "prefix"}}).save_pretrained(model_dir)

    png = root / "red.png"
    Image.new("RGB", (40, 24), (255, 0, 0)).save(png)
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return {"root": root, "model": model_dir, "png": png, "corrupt": corrupt}


@pytest.fixture(scope="module")
def model(tiny) -> FrozenVLModel:
    return frozenvl.load(tiny["model"])


@pytest.fixture
def chat_calls(monkeypatch) -> list[dict]:
    """Record what the CLI hands to FrozenVLModel.chat (the real method still runs)."""
    calls: list[dict] = []
    original = FrozenVLModel.chat

    def spy(self, messages, images=None, task="text", **kwargs):
        calls.append(
            {"messages": [dict(m) for m in messages], "images": list(images or []), "task": task, "kwargs": kwargs}
        )
        return original(self, messages, images=images, task=task, **kwargs)

    monkeypatch.setattr(FrozenVLModel, "chat", spy)
    return calls


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input, env=ENV)


# ---------------------------------------------------------------------------- info / version
def test_info_table_and_json(tiny, model):
    result = run("info", tiny["model"])
    assert result.exit_code == 0, result.output
    info = model.info()
    out = result.stdout
    assert "mm" in out and "prefix" in out and "base LLM" in out
    assert f"{info['frozen_llm_params']:,}" in out
    assert f"{info['workflows']['mm']['trainable_params']:,}" in out
    for part in info["workflows"]["mm"]["parts"]:
        assert part in out

    result = run("info", tiny["model"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(json.dumps(info))


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"frozenvl {frozenvl.__version__}"


# ---------------------------------------------------------------------------- user errors
def test_missing_model_dir_exits_2(tiny):
    missing = tiny["root"] / "nope"
    result = run("info", missing)
    assert result.exit_code == 2
    assert "does not exist" in result.stderr and str(missing) in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_not_a_frozenvl_dir_and_bad_config_exit_2(tiny, tmp_path):
    result = run("chat", tmp_path, "--prompt", "hi")
    assert result.exit_code == 2
    assert "not a frozenvl model directory" in result.stderr

    (tmp_path / "frozenvl.json").write_text('{"llm": "x", "workflows": {"mm": {"family": "nofamily"}}}')
    result = run("info", tmp_path)
    assert result.exit_code == 2
    assert "nofamily" in result.stderr and "prefix" in result.stderr  # names what exists
    assert "Traceback" not in result.output


def test_unknown_task_exits_2_listing_tasks(tiny):
    result = run("chat", tiny["model"], "--task", "nope", "--prompt", "hi")
    assert result.exit_code == 2
    assert "unknown task 'nope'" in result.stderr
    assert "text" in result.stderr and "mm" in result.stderr


def test_corrupt_image_is_a_clear_error(tiny):
    result = run("chat", tiny["model"], "--prompt", "hi", "--image", tiny["corrupt"])
    assert result.exit_code == 2
    assert str(tiny["corrupt"]) in result.stderr and "decode" in result.stderr
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------- chat --prompt
def test_chat_prompt_text(tiny, model, chat_calls):
    result = run(
        "chat", tiny["model"], "--task", "text", "--prompt", "What is in the image?", "--system", "Be brief.", *GEN
    )
    assert result.exit_code == 0, result.output
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is in the image?"}]
    assert chat_calls[0]["messages"] == messages and chat_calls[0]["task"] == "text"
    assert chat_calls[0]["kwargs"] == {
        "stream": True, "max_new_tokens": 6, "do_sample": False, "temperature": 1.0, "top_p": 1.0
    }
    answer = "".join(model.chat(messages, task="text", stream=True, max_new_tokens=6))
    assert result.stdout == answer + "\n"  # greedy: exactly what the library answers, streamed


def test_chat_prompt_mm_with_image_and_sampling(tiny, chat_calls):
    result = run(
        "chat", tiny["model"], "--task", "mm", "--image", tiny["png"], "--image", tiny["png"],
        "--prompt", "Describe it.", "--temperature", "0.7", "--top-p", "0.9", *GEN,
    )
    assert result.exit_code == 0, result.output
    call = chat_calls[0]
    assert call["task"] == "mm"
    assert call["messages"] == [{"role": "user", "content": "<image>\n<image>\nDescribe it."}]
    assert len(call["images"]) == 2 and all(img.size == (40, 24) for img in call["images"])
    assert call["kwargs"]["do_sample"] is True and call["kwargs"]["temperature"] == 0.7
    assert call["kwargs"]["top_p"] == 0.9
    assert result.stdout.endswith("\n")


# ---------------------------------------------------------------------------- interactive chat
def test_interactive_unknown_task_keeps_going(tiny, chat_calls):
    result = run("chat", tiny["model"], *GEN, input="hi\n/task nope\nhello\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "unknown task 'nope'" in result.stderr and "text, mm" in result.stderr
    assert len(chat_calls) == 2  # both turns answered
    first, second = chat_calls
    assert first["messages"] == [{"role": "user", "content": "hi"}]
    # the second turn carries the first one and its answer: history kept across the error
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][0]["content"] == "hi" and second["messages"][2]["content"] == "hello"
    assert second["task"] == first["task"] == "mm"


def test_interactive_images_errors_and_reset(tiny, chat_calls):
    long = "red " * 3000  # more tokens than max_position_embeddings
    script = "\n".join(
        [
            f"/image {tiny['corrupt']}",  # refused at once, not attached
            f"/image {tiny['png']}",
            "What is it?",
            long,  # too long: error, conversation unchanged
            "/task text",
            "and now?",  # the text task takes no images: error, conversation unchanged
            "/task mm",
            f"/image {tiny['png']}",
            "Another one.",
            "/reset",
            "fresh",
        ]
    )
    result = run("chat", tiny["model"], *GEN, input=script + "\n")  # ends with EOF, no /exit
    assert result.exit_code == 0, result.output
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3, errors
    assert str(tiny["corrupt"]) in errors[0]
    assert "max_position_embeddings" in errors[1]
    assert "text" in errors[2]

    ok = [c for c in chat_calls if not (len(c["messages"][-1]["content"]) > 1000 or c["task"] == "text")]
    assert [c["messages"][-1]["content"] for c in ok] == ["<image>\nWhat is it?", "<image>\nAnother one.", "fresh"]
    # the third successful turn sees turn one and its answer, nothing of the failed ones, and both images in order
    assert [m["content"] for m in ok[1]["messages"] if m["role"] == "user"] == [
        "<image>\nWhat is it?",
        "<image>\nAnother one.",
    ]
    assert len(ok[1]["images"]) == 2
    assert ok[2]["messages"] == [{"role": "user", "content": "fresh"}] and ok[2]["images"] == []


# ---------------------------------------------------------------------------- import
def test_import_llava_hf_calls_the_importer(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("frozenvl.importers.llava")

    def import_llava_hf(src, out, workflow="mm"):
        calls.append((src, Path(out), workflow))
        return str(out)

    fake.import_llava_hf = import_llava_hf
    monkeypatch.setitem(sys.modules, "frozenvl.importers.llava", fake)
    out = tmp_path / "converted"
    result = run("import", "llava-hf", "some/llava-hf", out, "--workflow", "vqa")
    assert result.exit_code == 0, result.output
    assert calls == [("some/llava-hf", out, "vqa")]
    assert str(out) in result.stdout and "vqa" in result.stdout

    help_result = run("import", "--help")
    assert help_result.exit_code == 0 and "llava-hf" in help_result.stdout


# ---------------------------------------------------------------------------- eval
def test_eval_scores_a_file_and_writes_the_report(tiny, model, tmp_path):
    items = tmp_path / "items.jsonl"
    rows = [
        {"id": "v1", "task": "vqa", "image": str(tiny["png"]), "question": "what colour is it?", "answer": "red"},
        {"id": "t1", "task": "text", "question": "what is 2 plus 2?", "answer": "4"},
    ]
    items.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = tmp_path / "report.json"
    result = run("eval", tiny["model"], items, "--task", "mm", "--max-new-tokens", "4", "--out", report)
    assert result.exit_code == 0, result.output
    saved = json.loads(report.read_text())
    assert {p["id"] for p in saved["predictions"]} == {"v1", "t1"}
    assert "vqa_acc" in saved["metrics"] and "text_acc" in saved["metrics"]
    # the CLI's answers are the library's
    from frozenvl.eval import evaluate

    direct = evaluate(model, items, task="mm", max_new_tokens=4, progress=False)
    assert {p["id"]: p["prediction"] for p in direct.predictions} == {
        p["id"]: p["prediction"] for p in saved["predictions"]}
    bad = run("eval", tiny["model"], items, "--task", "nope")
    assert bad.exit_code == 2 and "available tasks" in bad.output
    missing = run("eval", tiny["model"], tmp_path / "none.jsonl")
    assert missing.exit_code == 2 and "does not exist" in missing.output
