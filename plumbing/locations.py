"""Where packages live: repository URLs and the deterministic key of each package inside one.

>>> RepositoryKey.from_capture("call", "2026-11-28T10:00:00Z", "rec-1").key
'call/2026/11/28/rec-1.mseal'
>>> RepositoryKey.parse("call/2026/11/28/rec-1.mseal").recording_id
'rec-1'
>>> parse_repository_url("s3://recordings/site-a")       # also file:///srv/rec and a plain path
RepositoryURL(scheme='s3', bucket='recordings', prefix='site-a', path=None)
>>> split_package_url("s3://recordings/site-a/call/2026/11/28/rec-1.mseal")
(RepositoryURL(scheme='s3', bucket='recordings', prefix='site-a', path=None), 'call/2026/11/28/rec-1.mseal')

Why here: the uploader writes these keys, the export side and key rotation read them, and keys must
not import the uploader; codec is the byte format and knows nothing of where packages are stored, but
it owns the list of kinds (codec.header.KINDS), which this layout is built from, so plumbing (the
lowest layer that may import codec) is the one place all three can share.

Invariants:
- A key is `<kind>/<YYYY>/<MM>/<DD>/<recording-id>.mseal`, the kind one of codec's KINDS and the date
  the capture date (UTC, from the RFC 3339 capture time). `parse(str(k)) == k` for every key made here,
  so a retry or replay always names the same object (exactly one object per recording).
- Every key handed to a repository is a plain relative key: no leading slash, no empty, `.` or `..`
  segment, no NUL (`check_relative_key`), so no key can escape the repository root or its prefix.
- URL errors are LocationError (a ValueError) naming the URL; callers turn it into their own error.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from mediaseal.codec.header import KINDS

__all__ = [
    "SUFFIX", "LocationError", "RepositoryKey", "RepositoryURL", "check_relative_key", "parse_repository_url",
    "parse_s3_object_url", "split_package_url",
]

SUFFIX = ".mseal"
# Built from codec's kinds, so a new kind needs no change here (anchored at a path segment's start).
_LAYOUT = re.compile(r"(?:^|/)((" + "|".join(map(re.escape, KINDS)) + r")/(\d{4})/(\d{2})/(\d{2})/([^/]+)"
                     + re.escape(SUFFIX) + r")$")


class LocationError(ValueError):
    """A repository URL or package key that is not acceptable (the message names it)."""


def check_relative_key(key: str) -> str:
    """`key` without its leading slashes, if it is a plain relative key; else LocationError."""
    k = key.lstrip("/")
    if not k or "\x00" in k or any(seg in ("", ".", "..") for seg in k.split("/")):
        raise LocationError(f"{key!r} is not a plain relative package key")
    return k


@dataclass(frozen=True)
class RepositoryKey:
    """One package's key in the agent's layout. `day` may be an impossible date in a parsed key."""

    kind: str
    year: int
    month: int
    day: int
    recording_id: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LocationError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.recording_id or "/" in self.recording_id or "\x00" in self.recording_id:
            raise LocationError(f"recording id {self.recording_id!r} cannot be part of a key")

    @classmethod
    def from_capture(cls, kind: str, captured_at: str, recording_id: str) -> RepositoryKey:
        """The key for a recording captured at `captured_at` (RFC 3339; its date part is used)."""
        y, m, d = captured_at[0:4], captured_at[5:7], captured_at[8:10]
        if not (y.isdigit() and m.isdigit() and d.isdigit()):
            raise LocationError(f"capture time {captured_at!r} is not RFC 3339")
        return cls(kind, int(y), int(m), int(d), recording_id)

    @classmethod
    def parse(cls, key: str) -> RepositoryKey:
        """The key `key` exactly (LocationError if it is not in the layout)."""
        found = cls.find(key)
        if found is None or found[0]:
            raise LocationError(f"{key!r} is not a <kind>/<YYYY>/<MM>/<DD>/<id>{SUFFIX} key")
        return found[1]

    @classmethod
    def find(cls, path: str) -> tuple[str, RepositoryKey] | None:
        """(what precedes the layout, the key) if `path` ends in a key of the layout, else None."""
        m = _LAYOUT.search(path)
        if m is None:
            return None
        kind, y, mo, d, rid = m.group(2, 3, 4, 5, 6)
        return path[: m.start(1)].rstrip("/"), cls(kind, int(y), int(mo), int(d), rid)

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.year:04d}/{self.month:02d}/{self.day:02d}/{self.recording_id}{SUFFIX}"

    @property
    def date(self) -> dt.date | None:
        """The capture date, None if the key's date is not a real one."""
        try:
            return dt.date(self.year, self.month, self.day)
        except ValueError:
            return None

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class RepositoryURL:
    """A repository root: a local directory (`file`) or a bucket and key prefix (`s3`)."""

    scheme: Literal["file", "s3"]
    bucket: str = ""
    prefix: str = ""  # no leading or trailing slash; "" for the bucket's root
    path: Path | None = None  # absolute, for `file`

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def object_key(self, key: str) -> str:
        """The S3 object key of a repository key (the prefix joined on)."""
        k = check_relative_key(key)
        return f"{self.prefix}/{k}" if self.prefix else k


def parse_repository_url(text: str) -> RepositoryURL:
    """`/abs/dir` (or a relative path, made absolute), `file:///abs/dir` or `s3://bucket/prefix`."""
    if "://" not in text:
        if not text or "\x00" in text:
            raise LocationError(f"not a repository path: {text!r}")
        return RepositoryURL("file", path=Path(text).absolute())
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise LocationError(f"repository url {text!r} has a query or fragment")
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise LocationError(f"file url must be file:///absolute/dir: {text!r}")
        return RepositoryURL("file", path=Path(path))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise LocationError(f"not an s3://bucket/prefix url: {text!r}")
        prefix = unquote(parts.path).strip("/")
        if prefix and any(seg in ("", ".", "..") for seg in prefix.split("/")):
            raise LocationError(f"s3 repository prefix {prefix!r} has empty or dot segments")
        return RepositoryURL("s3", bucket=parts.netloc, prefix=prefix)
    raise LocationError(f"repository url must be file:///dir or s3://bucket/prefix, not {text!r}")


def split_package_url(url: str) -> tuple[RepositoryURL, str]:
    """A single package's URL (`s3://bucket/...` or `file:///...`) -> (its repository, its key).

    The repository root is where the layout `<kind>/<YYYY>/<MM>/<DD>/<id>.mseal` starts; a path not in
    that layout is split at its last `/` (the object's directory is the repository).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("s3", "file") or parts.query or parts.fragment:
        raise LocationError(f"not an s3://bucket/key or file:///path url: {url!r}")
    if parts.scheme == "s3" and not parts.netloc:
        raise LocationError(f"s3 url without a bucket: {url!r}")
    if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
        raise LocationError(f"file url must be file:///absolute/path: {url!r}")
    path = unquote(parts.path)
    found = RepositoryKey.find(path)
    if found is not None:
        root, key = found[0], found[1].key
    else:
        root, _, key = path.rpartition("/")
    check_relative_key(key)
    if any(seg in (".", "..") for seg in root.split("/")):
        raise LocationError(f"url has dot segments: {url!r}")
    if parts.scheme == "file":
        return RepositoryURL("file", path=Path(root or "/")), key
    return parse_repository_url(f"s3://{parts.netloc}/{root.strip('/')}"), key


def parse_s3_object_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key"): one object, the key non-empty."""
    parts = urlsplit(url)
    key = unquote(parts.path.lstrip("/"))
    if parts.scheme != "s3" or not parts.netloc or not key or parts.query or parts.fragment:
        raise LocationError(f"not an s3://bucket/key URL: {url!r}")
    return parts.netloc, key
