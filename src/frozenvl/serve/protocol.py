"""The OpenAI chat-completions request, checked field by field, and OpenAI's error body.

Everything a request may hold is listed here; a field frozenvl does not implement is a 400 that
names it, never silently ignored (a client asking for `n=3` or `tools` would otherwise get an
answer it did not ask for).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data.prompt import IMAGE_PLACEHOLDER
from .limits import Limits

# Fields accepted as they are.
SUPPORTED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
             "stream", "stream_options", "user"}
# Fields accepted only at the value that means "off" (what OpenAI's own default does).
NEUTRAL = {"n": 1, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0, "parallel_tool_calls": None}
ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # as OpenAI


class APIError(Exception):
    """An error with its HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, param=param, code="payload_too_large")


@dataclass
class ImageRef:
    url: str
    where: str  # e.g. "messages[1].content[2]": named in every error about this image


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]  # content as one string, `<image>` where each image goes
    images: list[ImageRef]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    extra: dict[str, Any] = field(default_factory=dict)


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise bad(f"{name} must be a number in [{lo}, {hi}], got {value!r}", name)
    return float(value)


def _int(body: dict, name: str, lo: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise bad(f"{name} must be an integer >= {lo}, got {value!r}", name)
    return value


def _content(message: dict, i: int, images: list[ImageRef]) -> str:
    content = message.get("content")
    where = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if content is None and message["role"] == "assistant":
        return ""
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or a list of content parts", where)
    pieces = []
    for k, part in enumerate(content):
        pwhere = f"{where}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{pwhere}: a text part needs a string 'text'", pwhere)
            pieces.append(part["text"])
        elif kind == "image_url":
            if message["role"] != "user":
                raise bad(f"{pwhere}: images go in user messages, not {message['role']!r} ones", pwhere)
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise bad(f"{pwhere}: an image_url part needs image_url.url (a data:, http(s) URL or path)", pwhere)
            images.append(ImageRef(url, pwhere))
            pieces.append(IMAGE_PLACEHOLDER + "\n")  # as `frozenvl chat` puts images before their text
        else:
            raise bad(f"{pwhere}: unsupported content part type {kind!r} (supported: text, image_url)", pwhere)
    return "".join(pieces)


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    unsupported = sorted(k for k in body if k not in SUPPORTED and (k not in NEUTRAL or body[k] != NEUTRAL[k])
                         and body[k] is not None)
    if unsupported:
        raise bad(f"unsupported field(s): {', '.join(unsupported)} (frozenvl serve implements: "
                  f"{', '.join(sorted(SUPPORTED))}; n=1 only)", unsupported[0], "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: the workflow to answer with (see GET /v1/models)", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    images: list[ImageRef] = []
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}] needs a role in {ROLES}", f"messages[{i}].role")
        rendered.append({"role": m["role"], "content": _content(m, i, images)})
    if len(images) > limits.max_images:
        raise too_large(f"{len(images)} images in the request; at most {limits.max_images} are accepted",
                        images[limits.max_images].where)

    max_tokens = _int(body, "max_completion_tokens", 1)
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = _int(body, "max_tokens", 1), "max_tokens"
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise bad(f"{param}={max_tokens} is over this server's cap of {limits.max_tokens}", param)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("stream_options takes only include_usage", "stream_options")
    if options and not stream:
        raise bad("stream_options is only allowed with stream=true", "stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad(f"seed must be an integer, got {seed!r}", "seed")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p must be > 0 (it is the probability mass kept)", "top_p")
    return ChatRequest(
        model=model, messages=rendered, images=images, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=top_p,
        seed=seed, stop=stop, stream=stream, include_usage=bool(options.get("include_usage")),
    )
