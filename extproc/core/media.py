"""Prompt tokens of a request's non-text content parts: images, audio, video, files.

Pure. Images given inline (base64 ``data:`` URLs) are sized from their header
(``images``) and counted with the model's ``ImageRule``; everything the router
cannot size (an http(s) URL it must not fetch, audio, video, documents) gets a
conservative configured count, and every kind is flagged in the decision
(``media`` in the metadata) so operators can see what was guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from . import images

# Flags, as they appear in the decision's ``media`` metadata: kind:count,...
IMAGE = "image"                  # sized from its header
IMAGE_UNSIZED = "image_unsized"  # remote URL or unreadable header: configured count
AUDIO = "audio"
VIDEO = "video"
FILE = "file"
OTHER = "other"                  # a content part type we do not know


@dataclass(frozen=True, slots=True)
class MediaEstimate:
    tokens: int
    flags: str  # "image:2,audio:1"


def _url(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        url = value.get("url")
        return url if isinstance(url, str) else ""
    return ""


def _b64_size(data: Any) -> int:
    """Decoded size of base64 text, given raw or as a data: URL."""
    if not isinstance(data, str):
        return 0
    return images.data_url_bytes(data) if data.startswith("data:") else images.b64_size(data)


def _image(url: str, rule: images.ImageRule, m: Any) -> tuple[str, int]:
    head = images.data_url_head(url)
    size = images.image_size(head) if head is not None else None
    if size is None:
        return IMAGE_UNSIZED, m.remote_image_tokens
    return IMAGE, rule.tokens(*size)


def _part(part: Mapping[str, Any], rule: images.ImageRule, m: Any, bytes_per_token: float) -> tuple[str, int]:
    kind = part.get("type")
    if kind in ("image_url", "input_image"):
        return _image(_url(part.get("image_url")), rule, m)
    if kind == "input_audio":
        audio = part.get("input_audio")
        n = _b64_size(audio.get("data") if isinstance(audio, Mapping) else None)
        return AUDIO, max(m.audio_tokens, math.ceil(n / m.audio_bytes_per_token))
    if kind == "audio_url":
        return AUDIO, m.audio_tokens
    if kind in ("video_url", "video"):
        return VIDEO, m.file_tokens
    if kind in ("file", "input_file"):
        f = part.get("file") if kind == "file" else part
        n = _b64_size(f.get("file_data") if isinstance(f, Mapping) else None)
        return FILE, max(m.file_tokens, math.ceil(n / bytes_per_token))
    return OTHER, m.file_tokens


def estimate(parts: Iterable[Mapping[str, Any]], rule: images.ImageRule, m: Any,
             bytes_per_token: float) -> MediaEstimate:
    """Tokens of ``parts`` (content parts without text) under the media config
    ``m`` ([media]) and the model's image ``rule``."""
    total = 0
    counts: dict[str, int] = {}
    for part in parts:
        flag, tokens = _part(part, rule, m, bytes_per_token)
        total += tokens
        counts[flag] = counts.get(flag, 0) + 1
    return MediaEstimate(total, ",".join(f"{k}:{v}" for k, v in counts.items()))


def image_rule(m: Any, model: str) -> images.ImageRule:
    """The image rule of ``model``: its [media] models entry over the defaults."""
    over = m.models.get(model, {})
    get = lambda key: over.get(key, getattr(m, key))  # noqa: E731
    return images.ImageRule(get("image_patch_px"), get("image_min_tokens"), get("image_max_tokens"),
                            get("image_overhead_tokens"))
