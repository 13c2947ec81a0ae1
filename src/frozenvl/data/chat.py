"""LLaVA conversations -> chat-template token ids with image slots and assistant-only labels.

The assistant mask is never hand-written per template: the conversation is rendered with the
tokenizer's own chat template through transformers' renderer, which reports the character spans
of the template's ``{% generation %}...{% endgeneration %}`` blocks. The rendered text is then
tokenized chunk by chunk around ``<image>`` exactly as :func:`~frozenvl.data.prompt.tokenize_with_images`
does, with offset mappings, and a token is labelled iff its character span lies inside one of
those generation spans.
"""

from __future__ import annotations

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
    "encode_conversation",
    "prepare_images",
    "render_with_generation_spans",
    "to_messages",
    "tokenize_with_image_offsets",
]

IGNORE_INDEX = -100

#: Every ``SampleError.kind``. "template" is a configuration error (the tokenizer has no usable
#: chat template); datasets never skip it.
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


def check_encoding_args(max_length: int | None, truncation: str, tokens_per_image: int) -> None:
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if tokens_per_image < 0:
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


def render_with_generation_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the tokenizer's chat template (no generation prompt).

    Returns the text and the ``(start, end)`` character spans of the template's
    ``{% generation %}`` blocks, as computed by transformers' own renderer (the same one
    ``apply_chat_template(..., return_assistant_tokens_mask=True)`` uses).
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        template = tokenizer.get_chat_template()
    except ValueError as exc:
        raise SampleError(f"the tokenizer has no usable chat template ({exc})", kind="template") from exc
    # apply_chat_template exposes the special tokens (bos_token, eos_token...) to the template.
    template_kwargs = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    rendered, spans = render_jinja_template(
        conversations=[messages],
        chat_template=template,
        return_assistant_tokens_mask=True,
        add_generation_prompt=False,
        **template_kwargs,
    )
    return rendered[0], [(int(s), int(e)) for s, e in spans[0]]


def tokenize_with_image_offsets(
    tokenizer, text: str, tokens_per_image: int
) -> tuple[list[int], list[tuple[int, int]]]:
    """:func:`~frozenvl.data.prompt.tokenize_with_images` (no added special tokens), plus offsets.

    Returns ``(ids, offsets)``: ``offsets[i]`` is the ``(start, end)`` character span of token
    ``i`` in ``text``; the image slots get the span of their ``<image>`` placeholder.
    Needs a fast (Rust ``tokenizers``) tokenizer for the offset mapping.
    """
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    pos = 0
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k > 0:
            span = (pos - len(IMAGE_PLACEHOLDER), pos)
            ids.extend([IMAGE_TOKEN_ID] * tokens_per_image)
            offsets.extend([span] * tokens_per_image)
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
    tokens_per_image: int,
    max_length: int | None = None,
    truncation: str = "skip",
    sample_id: str = "?",
    num_images: int | None = None,
) -> EncodedSample:
    """Chat messages -> input ids (``<image>`` -> ``tokens_per_image`` IMAGE_TOKEN_ID slots) and labels.

    Labels are the token id for tokens inside the chat template's ``{% generation %}`` blocks
    (assistant content and its end-of-turn token, as the template marks them), -100 elsewhere
    (system/user turns, role headers, image slots).

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

    text, spans = render_with_generation_spans(tokenizer, messages)
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
    if not spans:
        raise sample_error(
            sample_id,
            "the chat template marked no assistant text; assistant-only labels need a chat template whose "
            "assistant turns are wrapped in {% generation %}...{% endgeneration %}",
            "template",
        )

    ids, offsets = tokenize_with_image_offsets(tokenizer, text, tokens_per_image)
    labels = _assistant_labels(ids, offsets, spans)
    if all(lab == IGNORE_INDEX for lab in labels):
        raise sample_error(sample_id, "no token falls inside the template's assistant (generation) text")

    ids, labels, truncated = fit_length(ids, labels, max_length, truncation, sample_id, "assistant")
    return EncodedSample(input_ids=ids, labels=labels, num_images=n_placeholders, truncated=truncated)
