"""Which media types a package may carry and a reader may serve as they are (issue 15, finding 2).

The content type comes from the producer (a file's extension, or a watch's `content_type`), and the
player serves recordings on its own origin to browsers that hold its credentials (a client certificate,
a session): a recording typed `text/html` or `image/svg+xml` would run script there (stored XSS). So
only passive types are ever recorded or served as themselves: audio, video and plain text, which a
browser renders without running anything. Everything else is recorded and served as
`application/octet-stream` (served as an attachment too).
"""

from __future__ import annotations

import re

__all__ = ["OCTET_STREAM", "is_passive", "passive_or_octet"]

OCTET_STREAM = "application/octet-stream"
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")
_PASSIVE_TOP = ("audio", "video")
_PASSIVE = frozenset({"text/plain", "application/ogg", OCTET_STREAM})


def is_passive(media_type: str) -> bool:
    """A bare media type (no parameters) that a browser shows without running anything."""
    t = media_type.strip().lower()
    if _MEDIA_TYPE.fullmatch(t) is None:
        return False
    return t.split("/", 1)[0] in _PASSIVE_TOP or t in _PASSIVE


def passive_or_octet(media_type: str | None) -> str:
    """`media_type` (lower-cased) if passive, else application/octet-stream."""
    if media_type is not None and is_passive(media_type):
        return media_type.strip().lower()
    return OCTET_STREAM
