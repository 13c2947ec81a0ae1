"""LLaVA conversations -> chat-template token ids with image slots and assistant-only labels.

The assistant mask is never hand-written per template: the conversation is rendered with the
tokenizer's own chat template, and the character spans of its assistant answers are found in one
of two ways.

* **Markers.** A template that wraps its assistant turns in ``{% generation %}...{% endgeneration %}``
  reports those spans through transformers' renderer; they are used as they are.
* **Derived** (published templates have no markers: SmolLM2, Llama-3, Qwen2.5, Mistral, Gemma,
  Phi-3...). For assistant message ``i`` the conversation is also rendered up to message ``i`` with
  ``add_generation_prompt=True`` (the prompt the model answers at inference) and up to and
  including message ``i``. Both must be prefixes of the whole conversation's rendering (the
  *prefix property*, up to a closing text the template appends only at the very end of a
  conversation, such as Phi-3's ``eos_token``); the answer's span is what lies between them,
  without trailing whitespace. It therefore includes the end-of-turn token the template writes
  right after the answer (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<end_of_turn>``, ``<|end|>``):
  the model must learn to stop. A template without the prefix property (it changes earlier
  turns depending on later ones) cannot be handled this way and raises a ``SampleError`` of kind
  "template" that names the message and where the renderings differ.

The rendered text is then tokenized chunk by chunk around ``<image>`` exactly as
:func:`~frozenvl.data.prompt.tokenize_with_images` does, with offset mappings, and a token is
labelled iff its character span lies inside one of the answer spans.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..constants import IMAGE_TOKEN_ID
from .prompt import IMAGE_PLACEHOLDER

__all__ = [
    "IGNORE_INDEX",
    "ROLE_MAP",
    "SAMPLE_ERROR_KINDS",
    "EncodedSample",
    "SampleError",
    "derive_assistant_spans",
    "encode_conversation",
    "prepare_images",
    "render_with_generation_spans",
    "to_messages",
    "tokenize_with_image_offsets",
]

IGNORE_INDEX = -100

#: Every ``SampleError.kind``. "template" is a configuration error (the tokenizer has no usable
#: chat template, or one whose assistant text cannot be found); datasets never skip it.
SAMPLE_ERROR_KINDS = (
    "overlong",
    "answer_truncated",
    "image_truncated",
    "bad_image",
    "missing_image",
    "bad_format",
    "placeholder_mismatch",
    "template",
)

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

TRUNCATION_MODES = ("skip", "truncate")


class SampleError(ValueError):
    """A training sample cannot be used. ``kind`` (one of :data:`SAMPLE_ERROR_KINDS`) is for counting."""

    def __init__(self, message: str, *, kind: str = "bad_format", sample_id: str | None = None) -> None:
        if kind not in SAMPLE_ERROR_KINDS:
            raise ValueError(f"unknown SampleError kind {kind!r}; valid: {SAMPLE_ERROR_KINDS}")
        super().__init__(message)
        self.kind = kind
        self.sample_id = sample_id


def sample_error(sample_id: str, message: str, kind: str = "bad_format") -> SampleError:
    return SampleError(f"sample {sample_id!r}: {message}", kind=kind, sample_id=sample_id)


def check_encoding_args(max_length: int | None, truncation: str, tokens_per_image: int | Sequence[int]) -> None:
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    counts = [tokens_per_image] if isinstance(tokens_per_image, int) else list(tokens_per_image)
    if any(c < 0 for c in counts):
        raise ValueError(f"tokens_per_image must be >= 0, got {tokens_per_image}")


def fit_length(
    ids: list[int], labels: list[int], max_length: int | None, truncation: str, sample_id: str, what: str
) -> tuple[list[int], list[int], bool]:
    """Apply `max_length`: kind "overlong" with truncation "skip"; with "truncate", cut unless the cut
    drops an image slot ("image_truncated") or leaves no labelled (`what`) token ("answer_truncated")."""
    if max_length is None or len(ids) <= max_length:
        return ids, labels, False
    if truncation == "skip":
        raise sample_error(sample_id, f"{len(ids)} tokens, over max_length={max_length}", "overlong")
    if IMAGE_TOKEN_ID in ids[max_length:]:
        partial = ids[max_length - 1] == IMAGE_TOKEN_ID and ids[max_length] == IMAGE_TOKEN_ID
        where = "inside an image's slots" if partial else "before an image's slots"
        raise sample_error(
            sample_id, f"truncating {len(ids)} tokens to max_length={max_length} cuts {where}", "image_truncated"
        )
    if all(lab == IGNORE_INDEX for lab in labels[:max_length]):
        raise sample_error(
            sample_id, f"truncating {len(ids)} tokens to max_length={max_length} leaves no {what} token",
            "answer_truncated",
        )
    return ids[:max_length], labels[:max_length], True


# --------------------------------------------------------------------------- messages


def _content_text(content: Any, sample_id: str, turn: int) -> str:
    """Message content -> text. A list of parts is joined; image parts become ``<image>``."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif isinstance(part, dict) and part.get("type") == "image":
                out.append(IMAGE_PLACEHOLDER)
            else:
                raise sample_error(sample_id, f"turn {turn}: unsupported content part {part!r}")
        return "".join(out)
    raise sample_error(sample_id, f"turn {turn}: content must be a string, got {type(content).__name__}")


def to_messages(conversations: list[dict], *, sample_id: str = "?") -> list[dict]:
    """LLaVA turns (``{"from", "value"}``) or chat messages (``{"role", "content"}``) -> chat messages.

    Roles are mapped with :data:`ROLE_MAP` ("human" -> "user", "gpt" -> "assistant"). Content given
    as a list of parts is flattened to text (image parts become ``<image>``). Anything malformed
    raises :class:`SampleError` (kind "bad_format").
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise sample_error(sample_id, "'conversations' must be a non-empty list of turns")
    messages = []
    for turn, item in enumerate(conversations):
        if not isinstance(item, dict):
            raise sample_error(sample_id, f"turn {turn}: expected an object, got {type(item).__name__}")
        if "from" in item or "value" in item:
            role, content = item.get("from"), item.get("value")
        elif "role" in item:
            role, content = item.get("role"), item.get("content")
        else:
            raise sample_error(sample_id, f"turn {turn}: needs 'from'/'value' (LLaVA) or 'role'/'content' keys")
        if not isinstance(role, str) or role.lower() not in ROLE_MAP:
            raise sample_error(sample_id, f"turn {turn}: unknown role {role!r}; valid: {sorted(ROLE_MAP)}")
        messages.append({"role": ROLE_MAP[role.lower()], "content": _content_text(content, sample_id, turn)})
    return messages


def count_message_placeholders(messages: Sequence[dict]) -> int:
    return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)


def prepare_images(messages: list[dict], num_images: int, *, sample_id: str = "?") -> list[dict]:
    """Check that the ``<image>`` placeholders match the sample's ``num_images``.

    LLaVA convention: a sample with exactly one image and no placeholder gets ``"<image>\\n"``
    prepended to its first user message. Returns new messages (the input is not modified);
    a mismatch raises :class:`SampleError` (kind "placeholder_mismatch").
    """
    found = count_message_placeholders(messages)
    if num_images == 1 and found == 0:
        messages = [dict(m) for m in messages]
        for m in messages:
            if m["role"] == "user":
                m["content"] = IMAGE_PLACEHOLDER + "\n" + m["content"]
                return messages
        raise sample_error(sample_id, "one image but no user message to put its <image> placeholder in", "placeholder_mismatch")
    if found != num_images:
        raise sample_error(
            sample_id,
            f"{found} {IMAGE_PLACEHOLDER} placeholder(s) in the conversation but {num_images} image(s)",
            "placeholder_mismatch",
        )
    return messages


# --------------------------------------------------------------------------- rendering


# transformers' own test for a template with generation markers.
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class _ChatTemplate:
    source: str
    kwargs: dict[str, Any]  # what apply_chat_template exposes to the template (bos_token, eos_token...)

    @property
    def marked(self) -> bool:
        return bool(_GENERATION_TAG.search(self.source))

    def render(
        self, messages: list[dict], *, add_generation_prompt: bool = False, spans: bool = False, sample_id: str = "?"
    ) -> tuple[str, list[tuple[int, int]]]:
        import jinja2
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, indices = render_jinja_template(
                conversations=[messages],
                chat_template=self.source,
                return_assistant_tokens_mask=spans,
                add_generation_prompt=add_generation_prompt,
                **self.kwargs,
            )
        except jinja2.TemplateError as exc:  # raise_exception(...) in the template, e.g. roles must alternate
            raise sample_error(sample_id, f"the chat template rejected the conversation: {exc}") from exc
        return rendered[0], [(int(s), int(e)) for s, e in indices[0]] if spans else []


def _chat_template(tokenizer) -> _ChatTemplate:
    try:
        source = tokenizer.get_chat_template()
    except ValueError as exc:
        raise SampleError(f"the tokenizer has no usable chat template ({exc})", kind="template") from exc
    return _ChatTemplate(source, dict(getattr(tokenizer, "special_tokens_map", {}) or {}))


def render_with_generation_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the tokenizer's chat template (no generation prompt).

    Returns the text and the ``(start, end)`` character spans of the template's
    ``{% generation %}`` blocks, as computed by transformers' own renderer (the same one
    ``apply_chat_template(..., return_assistant_tokens_mask=True)`` uses); no spans for a
    template without markers.
    """
    template = _chat_template(tokenizer)
    return template.render(messages, spans=template.marked)


def _common_prefix_len(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _mismatch(sample_id: str, problem: str, part: str, got: str, full: str) -> SampleError:
    """Kind "template": `problem`, and where the rendering of `part` of the conversation leaves the whole one's."""
    at = _common_prefix_len(got, full)
    lo = max(0, at - 30)
    return sample_error(
        sample_id,
        f"{problem}, so its assistant text cannot be found without {{% generation %}} markers: the rendering "
        f"of {part} is not a prefix of the rendering of the whole conversation; from character {at} it has "
        f"{got[lo:at + 40]!r} where the whole conversation has {full[lo:at + 40]!r}. Training on that text "
        "would not match what the model sees when it answers; wrap the template's assistant turns in "
        "{% generation %}...{% endgeneration %} to say which text to learn",
        "template",
    )


def _closing_suffix(
    template: _ChatTemplate, messages: list[dict], text: str, boundaries: Sequence[int], sample_id: str
) -> str:
    """What the template appends only when a conversation ends without a generation prompt.

    Phi-3 writes ``eos_token`` there, so the rendering up to an earlier assistant turn ends with
    text that the whole conversation has only at its end. It is the part of `text` after where
    the rendering with ``add_generation_prompt=True`` departs from it, taken from a token boundary
    of `text` (so that ``<|endoftext|>`` vs ``<|assistant|>`` do not count as sharing ``<|``).
    """
    prompted, _ = template.render(messages, add_generation_prompt=True, sample_id=sample_id)
    if prompted.startswith(text):
        return ""
    at = _common_prefix_len(text, prompted)
    return text[boundaries[bisect.bisect_right(boundaries, at) - 1] :]


def _derive(
    template: _ChatTemplate,
    messages: list[dict],
    text: str,
    offsets: Sequence[tuple[int, int]],
    sample_id: str,
) -> list[tuple[int, int]]:
    boundaries = sorted({0, len(text)}.union(*offsets))
    closing = _closing_suffix(template, messages, text, boundaries, sample_id)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        what = f"message {i} (assistant)"
        prompt, _ = template.render(messages[:i], add_generation_prompt=True, sample_id=sample_id)
        if not text.startswith(prompt):
            raise _mismatch(
                sample_id, f"the chat template renders the prompt for {what} inconsistently",
                f"messages[:{i}] with add_generation_prompt=True", prompt, text,
            )
        if i == len(messages) - 1:
            upto = text
        else:
            upto, _ = template.render(messages[: i + 1], sample_id=sample_id)
            if not upto.endswith(closing) or not text.startswith(upto[: len(upto) - len(closing)]):
                raise _mismatch(
                    sample_id, f"the chat template renders {what} differently once later messages follow",
                    f"messages[:{i + 1}]" + (f" (without its closing {closing!r})" if closing else ""), upto, text,
                )
        # Trailing whitespace after the end-of-turn token is the template's separator, not the answer...
        start, stop = len(prompt), len(upto) - len(closing)
        end = start + len(text[start:stop].rstrip())
        if end == start:
            raise sample_error(sample_id, f"the chat template renders no text for {what}", "template")
        # ...unless a token runs on into it (no end-of-turn token: "answer.\n\n" may be one token ".\n\n").
        next_boundary = boundaries[bisect.bisect_left(boundaries, end)]
        spans.append((start, next_boundary if next_boundary <= stop else end))
    return spans


def derive_assistant_spans(
    tokenizer,
    messages: list[dict],
    text: str,
    offsets: Sequence[tuple[int, int]],
    *,
    sample_id: str = "?",
) -> list[tuple[int, int]]:
    """Character spans of the assistant answers in `text`, the rendering of `messages`, without markers.

    `offsets` are the token spans of `text` (:func:`tokenize_with_image_offsets`). Each span runs
    from the end of the generation prompt before the answer to the end of the answer's own
    rendering, without trailing whitespace: the answer and the template's end-of-turn token. See
    the module docstring; a template without the prefix property raises ``SampleError``
    (kind "template") naming the message and the first character where the renderings differ.
    """
    return _derive(_chat_template(tokenizer), messages, text, offsets, sample_id)


def tokenize_with_image_offsets(
    tokenizer, text: str, tokens_per_image: int | Sequence[int]
) -> tuple[list[int], list[tuple[int, int]]]:
    """:func:`~frozenvl.data.prompt.tokenize_with_images` (no added special tokens), plus offsets;
    `tokens_per_image` is one count for every image or one per image (tiled images).

    Returns ``(ids, offsets)``: ``offsets[i]`` is the ``(start, end)`` character span of token
    ``i`` in ``text``; the image slots get the span of their ``<image>`` placeholder.
    Needs a fast (Rust ``tokenizers``) tokenizer for the offset mapping.
    """
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    pos = 0
    chunks = text.split(IMAGE_PLACEHOLDER)
    per_image = [tokens_per_image] * (len(chunks) - 1) if isinstance(tokens_per_image, int) else list(tokens_per_image)
    if len(per_image) != len(chunks) - 1:
        raise ValueError(f"{len(chunks) - 1} <image> placeholder(s) but token counts for {len(per_image)} image(s)")
    for k, chunk in enumerate(chunks):
        if k > 0:
            span = (pos - len(IMAGE_PLACEHOLDER), pos)
            ids.extend([IMAGE_TOKEN_ID] * per_image[k - 1])
            offsets.extend([span] * per_image[k - 1])
        if chunk:
            try:
                enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            except NotImplementedError as exc:
                raise ValueError(
                    "assistant masks need the token offsets of a fast tokenizer "
                    f"(got {type(tokenizer).__name__}): {exc}"
                ) from exc
            ids.extend(enc["input_ids"])
            offsets.extend((pos + int(s), pos + int(e)) for s, e in enc["offset_mapping"])
        pos += len(chunk) + len(IMAGE_PLACEHOLDER)
    return ids, offsets


# --------------------------------------------------------------------------- encoding


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    num_images: int
    truncated: bool = False


def _assistant_labels(
    ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Label = token id iff the token's character span lies inside a generation span (image slots never).

    Token offsets are non-decreasing, so one pass with a pointer over the sorted spans suffices.
    """
    spans = sorted(spans)
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for i, (tid, (start, end)) in enumerate(zip(ids, offsets)):
        while k < len(spans) and spans[k][1] < end:
            k += 1  # spans ending before this token can contain no later token either
        if k < len(spans) and tid != IMAGE_TOKEN_ID and spans[k][0] <= start:
            labels[i] = tid
    return labels


def encode_conversation(
    tokenizer,
    messages: list[dict],
    *,
    tokens_per_image: int | Sequence[int],
    max_length: int | None = None,
    truncation: str = "skip",
    sample_id: str = "?",
    num_images: int | None = None,
) -> EncodedSample:
    """Chat messages -> input ids (``<image>`` -> ``tokens_per_image`` IMAGE_TOKEN_ID slots, or one
    count per image for tiled images) and labels.

    Labels are the token id for tokens inside the assistant answers: the chat template's
    ``{% generation %}`` blocks if it has them, else the spans :func:`derive_assistant_spans` finds
    (each answer and its end-of-turn token); -100 elsewhere (system/user turns, role headers,
    image slots).

    ``num_images``: if given, the placeholders are checked against it first (see
    :func:`prepare_images`, which also applies LLaVA's one-image-no-placeholder convention).

    ``max_length``: a longer sequence raises ``SampleError(kind="overlong")`` with
    ``truncation="skip"``; with ``truncation="truncate"`` it is cut to ``max_length``
    (``truncated=True``) unless the cut drops any image slot (kind "image_truncated": partial
    image runs, or images with no slots left, are never produced) or leaves no labelled token
    (kind "answer_truncated").
    """
    check_encoding_args(max_length, truncation, tokens_per_image)
    if not messages:
        raise sample_error(sample_id, "empty conversation")
    if num_images is not None:
        messages = prepare_images(messages, num_images, sample_id=sample_id)
    n_placeholders = count_message_placeholders(messages)

    template = _chat_template(tokenizer)
    text, spans = template.render(messages, spans=template.marked, sample_id=sample_id)
    if text.count(IMAGE_PLACEHOLDER) != n_placeholders:
        raise sample_error(
            sample_id,
            f"the chat template rendered {text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) "
            f"from {n_placeholders} in the messages",
            "placeholder_mismatch",
        )
    has_assistant = any(m["role"] == "assistant" for m in messages)
    if not has_assistant:
        raise sample_error(sample_id, "no assistant turn, nothing to learn")

    ids, offsets = tokenize_with_image_offsets(tokenizer, text, tokens_per_image)
    if not template.marked:
        spans = _derive(template, messages, text, offsets, sample_id)
    elif not spans:
        raise sample_error(
            sample_id,
            "the chat template has {% generation %} markers but marked no text of this conversation; "
            "assistant-only labels come from those markers when a template has them",
            "template",
        )
    labels = _assistant_labels(ids, offsets, spans)
    if all(lab == IGNORE_INDEX for lab in labels):
        raise sample_error(sample_id, "no token falls inside the template's assistant text")

    ids, labels, truncated = fit_length(ids, labels, max_length, truncation, sample_id, "assistant")
    return EncodedSample(input_ids=ids, labels=labels, num_images=n_placeholders, truncated=truncated)
