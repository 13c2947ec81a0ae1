"""The server's limits in one place (each is a `frozenvl serve` option; docs/serve.md lists them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..vision.images import DEFAULT_MAX_PIXELS

MIB = 1024 * 1024


@dataclass
class Limits:
    max_body_bytes: int = 32 * MIB  # a request body over this is refused (413) before it is parsed
    max_image_bytes: int = 10 * MIB  # one image's encoded bytes; data URLs are measured before base64 decoding
    max_images: int = 8  # images per request (all messages together)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decoded size (width * height), checked from the image header
    max_tokens: int = 512  # per-request cap on max_tokens / max_completion_tokens
    max_queue: int = 64  # requests waiting for the model; beyond: 429
    max_batch_size: int = 8  # rows decoded together; 1 turns batching off
    request_timeout_s: float = 300.0  # a request still unanswered after this is cancelled (504)
    remote_timeout_s: float = 10.0  # fetching an allowed http(s) image
    allowed_media_domains: list[str] = field(default_factory=list)  # http(s) images only from these hosts
    allowed_local_media_path: str | None = None  # file paths only under this directory

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_bytes", "max_images", "max_pixels", "max_tokens", "max_queue",
                     "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "max_images" else 1):
                raise ValueError(f"limit {name} must be a positive int, got {value!r}")
        if self.request_timeout_s <= 0 or self.remote_timeout_s <= 0:
            raise ValueError("timeouts must be > 0 seconds")
        self.allowed_media_domains = [d.strip().lower() for d in self.allowed_media_domains if d.strip()]
