"""Key rotation: the schedule, retiring keys nobody needs, and moving packages to the current key.

>>> ring.set_schedule(RotationSchedule.make("monthly", grace_seconds=86400))
>>> print(rotate_if_due(ring, passphrase))          # from a systemd timer or the LKM's own loop
created pending key 3kz...; it becomes current after 2031-02-02T00:00:00Z (a later run activates it)
>>> await retire_key(ring, old_kid, "file:///srv/recordings")       # KeyInUseError while packages need it
>>> report = await rewrap_repository(ring, passphrase, "s3://recordings/site-a")

Scheduled rotation is two-step so agents are warm: when the current key has been current for the
schedule's period minus the grace, a new key is added as `pending` (publish the key set: agents
fetch it and verify it while they still encrypt to the current key); a run at least `grace_seconds`
later makes it current, and the previous key becomes decrypt-only. `Keyring.rotate` ("rotate now")
stays immediate. The anchor is the current key's activation, so a manual rotation restarts the
period. A pending key older than the current key's activation (left behind by a manual rotation) is
superseded: made decrypt-only, never activated over a newer key.

Repositories (`file:///dir` or `s3://bucket/prefix`; keys must not import the uploader) are read
for package headers only: files walked, S3 objects listed and their first bytes fetched with a
ranged GET. `rewrap_repository` rewrites each package whose wraps name an older key of this keyring
so it carries a wrap for the current key instead (wraps for keys this keyring does not hold are
kept): the DEK is unwrapped and checked against the header's commitment in memory, re-wrapped, and
the body is copied byte for byte. Files are replaced atomically (temp file beside, fsync, rename,
fsync directory); S3 objects are rewritten by streaming (single PUT up to `part_size`, multipart
above it). No plaintext and no DEK is ever written anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from mediaseal import codec
from mediaseal.codec.header import MAX_HEADER
from mediaseal.keys.errors import KeysError, KeyStateError
from mediaseal.keys.keyring import KeyRecord, Keyring, KeyringUnwrapper, RotationSchedule
from mediaseal.keys.keyset import DECRYPT_ONLY, PENDING, RETIRED, format_time, parse_time

__all__ = [
    "KeyInUseError", "KeyUsage", "PackageRef", "RepositoryScanError", "RewrapReport", "RotationSchedule", "add_period",
    "key_usage", "next_rotation", "retire_key", "rewrap_repository", "rotate_if_due", "scan_repository",
]

PACKAGE_SUFFIX = ".mseal"
DEFAULT_PART_SIZE = 16 << 20
_HEAD_GUESS = 8192  # one ranged GET reads a typical header (about 1 KiB per wrap plus metadata)


class KeyInUseError(KeyStateError):
    """Packages in the repository still need the key (no other usable wrap): it can't be retired unforced."""


class RepositoryScanError(KeysError):
    """A repository could not be listed or read (bad URL, missing directory, S3 error)."""


# -- the schedule ----------------------------------------------------------------------------------


def add_period(t: datetime, every: str) -> datetime:
    """`t` plus one period: a day, a week, a calendar month or year (the day clamped to the month's end)."""
    if every == "daily":
        return t + timedelta(days=1)
    if every == "weekly":
        return t + timedelta(days=7)
    if every in ("monthly", "yearly"):
        if every == "yearly":
            year, month = t.year + 1, t.month
        else:
            year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
        return t.replace(year=year, month=month, day=min(t.day, calendar.monthrange(year, month)[1]))
    raise ValueError(f"no period for schedule {every!r}")


def _activated(rec: KeyRecord) -> datetime:
    return parse_time(rec.activated_at or rec.created_at)


def next_rotation(ring: Keyring) -> datetime | None:
    """When the scheduler next adds a pending key (None: schedule disabled)."""
    schedule = ring.schedule
    if schedule.every == "disabled":
        return None
    anchor = _activated(ring.current())
    return max(anchor, add_period(anchor, schedule.every) - timedelta(seconds=schedule.grace_seconds))


def rotate_if_due(keyring: Keyring, passphrase: bytes | None, now: datetime | None = None) -> str:
    """Do what the schedule says is due now and describe it in one line.

    The keyring's secret is checked first, on every run. Steps: supersede stale pending keys;
    activate a pending key whose grace has passed; or add a new pending key when the current one is
    due for rotation (with a zero grace it is activated at once). Blocking (RSA key generation, and
    KMS calls for a KMS keyring): call it from a thread in an event loop. Raises KeysError for a
    wrong secret or a refused KMS call, changing nothing.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    # The secret is checked on every run, due or not: a timer with a broken passphrase file (or a
    # revoked KMS grant) must fail now, not silently until the day a rotation is due.
    keyring.reload()  # a long-lived caller (the LKM) may hold it while a custodian changes the schedule
    keyring.unlock(passphrase)
    schedule = keyring.schedule
    grace = timedelta(seconds=schedule.grace_seconds)
    current = keyring.current()
    anchor = _activated(current)
    notes: list[str] = []
    pending: KeyRecord | None = None
    for rec in keyring.records():
        if rec.state != PENDING:
            continue
        if parse_time(rec.created_at) < anchor:  # older than the current key: never activated over it
            keyring.set_state(rec.kid, DECRYPT_ONLY)
            notes.append(f"superseded pending key {rec.kid} (older than current key {current.kid})")
        elif pending is None or rec.created_at >= pending.created_at:
            pending = rec
    prefix = "; ".join(notes) + "; " if notes else ""
    if pending is not None:
        ready_at = parse_time(pending.created_at) + grace
        if now < ready_at:
            return (f"{prefix}pending key {pending.kid} becomes current after {format_time(ready_at)};"
                    " nothing to do now")
        keyring.activate(pending.kid, passphrase, at=now)
        return (f"{prefix}activated key {pending.kid} (pending since {pending.created_at});"
                f" previous key {current.kid} is now decrypt-only")
    due = next_rotation(keyring)
    if due is None:
        return f"{prefix}rotation schedule is disabled; current key {current.kid} stays"
    if now < due:
        return f"{prefix}not due: current key {current.kid} ({schedule.every}); next pending key at {format_time(due)}"
    new = keyring.rotate(passphrase, pending=True, at=now)
    if schedule.grace_seconds == 0:
        keyring.activate(new.kid, passphrase, at=now)
        return f"{prefix}rotated: key {new.kid} is current (no grace period); {current.kid} is now decrypt-only"
    return (f"{prefix}created pending key {new.kid}; it becomes current after {format_time(now + grace)}"
            " (publish the key set now; a later run activates it)")


# -- repositories ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageRef:
    """A package in a repository: where it is (a path, or s3://bucket/key) and its parsed header."""

    location: str
    header: codec.Header


@dataclass(frozen=True)
class _Repo:
    scheme: str  # "file" or "s3"
    root: Path | None = None
    bucket: str = ""
    prefix: str = ""
    endpoint_url: str | None = None


def _parse_repository(url: str, endpoint_url: str | None) -> _Repo:
    parts = urlsplit(url)
    if parts.scheme == "file" and not parts.netloc and parts.path.startswith("/"):
        root = Path(unquote(parts.path))
        if not root.is_dir():
            raise RepositoryScanError(f"repository {url}: {root} is not a directory")
        return _Repo("file", root=root)
    if parts.scheme == "s3" and parts.netloc:
        prefix = unquote(parts.path).strip("/")
        return _Repo("s3", bucket=parts.netloc, prefix=f"{prefix}/" if prefix else "", endpoint_url=endpoint_url)
    raise RepositoryScanError(f"repository must be file:///absolute/dir or s3://bucket/prefix (got {url!r})")


async def scan_repository(url: str, *, endpoint_url: str | None = None) -> AsyncIterator[PackageRef]:
    """Every package's header (`*.mseal`, dot-files skipped: temp files). A package that can't be read or
    parsed raises RepositoryScanError naming it: a scan that skipped it could retire a key it needs."""
    repo = _parse_repository(url, endpoint_url)
    if repo.scheme == "file":
        assert repo.root is not None
        for path in await asyncio.to_thread(_package_files, repo.root):
            header = await asyncio.to_thread(_read_file_header, path)
            yield PackageRef(str(path), header)
        return
    async with _s3_client(repo) as s3:
        async for key in _s3_keys(s3, repo):
            yield PackageRef(f"s3://{repo.bucket}/{key}", await _s3_header(s3, repo.bucket, key))


def _package_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / n for n in sorted(filenames) if n.endswith(PACKAGE_SUFFIX) and not n.startswith(".")]
    return out


def _read_file_header(path: Path) -> codec.Header:
    try:
        with open(path, "rb") as f:
            return codec.read_header(f)
    except OSError as e:
        raise RepositoryScanError(f"can't read package {path}: {e.strerror}") from None
    except codec.CodecError as e:
        raise RepositoryScanError(f"package {path}: {e}") from None


@dataclass
class KeyUsage:
    """Which packages carry a wrap for a kid, and which of them have no other usable wrap (need it)."""

    kid: str
    packages: int = 0
    needed_by: list[str] = field(default_factory=list)


async def key_usage(keyring: Keyring, kid: str, url: str, *, endpoint_url: str | None = None) -> KeyUsage:
    """Scan the repository's headers for wraps naming `kid`."""
    usable = {r.kid for r in keyring.records() if r.state != RETIRED and r.kid != kid}
    usage = KeyUsage(kid)
    async for ref in scan_repository(url, endpoint_url=endpoint_url):
        kids = {w.kid for w in ref.header.wraps}
        if kid in kids:
            usage.packages += 1
            if not kids & usable:
                usage.needed_by.append(ref.location)
    return usage


async def retire_key(keyring: Keyring, kid: str, url: str, *, force: bool = False,
                     endpoint_url: str | None = None) -> str:
    """Retire `kid` (final: the keyring stops unwrapping with it) unless packages in `url` still need it."""
    rec = keyring.record(kid)
    if rec.state == RETIRED:
        return f"key {kid} is already retired"
    if kid == keyring.current().kid:
        raise KeyStateError(f"key {kid} is current; rotate first, then rewrap, then retire it")
    usage = await key_usage(keyring, kid, url, endpoint_url=endpoint_url)
    if usage.needed_by and not force:
        raise KeyInUseError(
            f"key {kid} is still needed by {len(usage.needed_by)} package(s) in {url} (e.g. {usage.needed_by[0]}):"
            " re-wrap them first, or force")  # the command line adds the exact command (agent/cli/keys_cmd.py)
    keyring.set_state(kid, RETIRED)
    forced = f"; FORCED: {len(usage.needed_by)} package(s) can no longer be decrypted with this keyring" \
        if usage.needed_by else ""
    return f"retired key {kid} ({usage.packages} package(s) in {url} carry a wrap for it){forced}"


# -- rewrap ----------------------------------------------------------------------------------------


@dataclass
class RewrapReport:
    """What `rewrap_repository` did: packages moved to `to_kid`, already fine, and failures (location, error)."""

    to_kid: str
    rewrapped: list[str] = field(default_factory=list)
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"rewrapped {len(self.rewrapped)} package(s) to key {self.to_kid}; {self.unchanged} left as they were;"
                f" {len(self.failed)} failed")


def _plan(header: codec.Header, ours: set[str], current: str, from_kid: str | None) -> list[codec.Wrap] | None:
    """The wraps to keep if this package should move to the current key, else None."""
    old = [w for w in header.wraps if w.kid in ours and w.kid != current]
    if not old or (from_kid is not None and from_kid not in {w.kid for w in old}):
        return None
    return [w for w in header.wraps if w.kid not in ours]  # other key holders' wraps stay


def _new_header(header: codec.Header, keep: Sequence[codec.Wrap], unwrapper: codec.Unwrapper,
                recipient: codec.Recipient) -> codec.Header:
    dek = unwrapper.unwrap(header.wraps)
    header.open(dek)  # commitment and header MAC: never re-wrap a key that isn't this package's
    wrap = codec.wrap_dek(dek, recipient.public_key, recipient.kid, recipient.alg)
    del dek
    return header.with_wraps((*keep, wrap))


async def rewrap_repository(keyring: Keyring, passphrase: bytes | None, url: str, *, from_kid: str | None = None,
                            endpoint_url: str | None = None, part_size: int = DEFAULT_PART_SIZE,
                            progress: Callable[[str], None] | None = None) -> RewrapReport:
    """Move every package in `url` wrapped to an older key of this keyring (or only `from_kid`) to the current key.

    One package failing (a retired or unknown key, a damaged header, an S3 error) is recorded and
    the rest go on; the report says what happened.
    """
    if from_kid is not None:
        keyring.record(from_kid)
    unwrapper = await asyncio.to_thread(keyring.unlock, passphrase)
    recipient = keyring.recipient()
    ours = {r.kid for r in keyring.records()}
    report = RewrapReport(recipient.kid)
    repo = _parse_repository(url, endpoint_url)

    def done(location: str, changed: bool) -> None:
        if changed:
            report.rewrapped.append(location)
            if progress:
                progress(f"rewrapped {location}")
        else:
            report.unchanged += 1

    if repo.scheme == "file":
        assert repo.root is not None
        for path in await asyncio.to_thread(_package_files, repo.root):
            try:
                done(str(path), await asyncio.to_thread(_rewrap_file, path, unwrapper, recipient, ours, from_kid))
            except (OSError, codec.CodecError, KeysError) as e:
                report.failed.append((str(path), _err(e)))
        return report
    errors: tuple[type[BaseException], ...] = (OSError, codec.CodecError, KeysError, *_client_errors())
    async with _s3_client(repo) as s3:
        async for key in _s3_keys(s3, repo):
            location = f"s3://{repo.bucket}/{key}"
            try:
                done(location, await _rewrap_object(s3, repo.bucket, key, unwrapper, recipient, ours, from_kid,
                                                    part_size))
            except errors as e:
                report.failed.append((location, _err(e)))
    return report


def _rewrap_file(path: Path, unwrapper: KeyringUnwrapper, recipient: codec.Recipient, ours: set[str],
                 from_kid: str | None) -> bool:
    with open(path, "rb") as src:
        header = codec.read_header(src)
        keep = _plan(header, ours, recipient.kid, from_kid)
        if keep is None:
            return False
        new = _new_header(header, keep, unwrapper, recipient)
        st = os.fstat(src.fileno())
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".rewrap.tmp")
        try:
            with os.fdopen(fd, "wb") as dst:
                os.fchmod(dst.fileno(), st.st_mode & 0o777)
                dst.write(new.encode())
                shutil.copyfileobj(src, dst, 1 << 20)  # the body, byte for byte
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return True


# -- S3 --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _s3_client(repo: _Repo) -> AsyncIterator[Any]:
    import aioboto3
    from aiobotocore.config import AioConfig

    config = AioConfig(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
    async with aioboto3.Session().client("s3", endpoint_url=repo.endpoint_url, config=config) as s3:
        try:
            yield s3
        except _client_errors() as e:
            raise RepositoryScanError(f"s3://{repo.bucket}/{repo.prefix}: {_err(e)}") from None


def _client_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


async def _s3_keys(s3: Any, repo: _Repo) -> AsyncIterator[str]:
    paginator = s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=repo.bucket, Prefix=repo.prefix):
        for obj in page.get("Contents", []):
            key = str(obj["Key"])
            if key.endswith(PACKAGE_SUFFIX) and not key.rsplit("/", 1)[-1].startswith("."):
                yield key


async def _s3_header(s3: Any, bucket: str, key: str) -> codec.Header:
    """The header from one ranged GET (a second, up to the largest possible header, if it is longer)."""
    for size in (_HEAD_GUESS, MAX_HEADER):
        resp = await s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{size - 1}")
        async with resp["Body"] as body:
            data = await body.read()
        try:
            return codec.parse_header(data)
        except codec.TruncatedPackageError:
            if len(data) < size:
                raise RepositoryScanError(f"package s3://{bucket}/{key} ends inside its header") from None
        except codec.CodecError as e:
            raise RepositoryScanError(f"package s3://{bucket}/{key}: {e}") from None
    raise RepositoryScanError(f"package s3://{bucket}/{key}: header larger than {MAX_HEADER} bytes")


_COPIED = ("ContentType", "Metadata", "StorageClass", "ServerSideEncryption", "SSEKMSKeyId", "CacheControl",
           "ContentDisposition", "ContentEncoding", "Expires", "BucketKeyEnabled")


async def _rewrap_object(s3: Any, bucket: str, key: str, unwrapper: KeyringUnwrapper, recipient: codec.Recipient,
                         ours: set[str], from_kid: str | None, part_size: int) -> bool:
    """Rewrite one object with new wraps, streaming: at most one part in memory, nothing on disk.

    The full-object SHA-256 goes into the new object's `package-sha256` metadata when the original
    had it, so a first pass hashes the stream; the second pass (IfMatch the same ETag) uploads.
    """
    head = await _s3_header(s3, bucket, key)
    keep = _plan(head, ours, recipient.kid, from_kid)
    if keep is None:
        return False
    new = await asyncio.to_thread(_new_header, head, keep, unwrapper, recipient)
    encoded = new.encode()
    info = await s3.head_object(Bucket=bucket, Key=key)
    etag, size = info["ETag"], int(info["ContentLength"])
    new_size = size - head.size + len(encoded)
    args: dict[str, Any] = {k: info[k] for k in _COPIED if info.get(k)}
    if args.get("StorageClass") == "STANDARD":
        del args["StorageClass"]
    if "package-sha256" in args.get("Metadata", {}):
        digest = hashlib.sha256(encoded)
        async for block in _body_blocks(s3, bucket, key, etag, head.size, part_size):
            digest.update(block)
        args["Metadata"] = {**args["Metadata"], "package-sha256": digest.hexdigest()}
    if new_size <= part_size:
        data = bytearray(encoded)
        async for block in _body_blocks(s3, bucket, key, etag, head.size, part_size):
            data += block
        await s3.put_object(Bucket=bucket, Key=key, Body=bytes(data), ChecksumSHA256=_b64sha(data), **args)
        return True
    upload = await s3.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256", **args)
    upload_id = upload["UploadId"]
    try:
        parts: list[dict[str, Any]] = []
        pending = bytearray(encoded)
        async for block in _body_blocks(s3, bucket, key, etag, head.size, part_size):
            pending += block
            while len(pending) >= part_size:
                parts.append(await _part(s3, bucket, key, upload_id, len(parts) + 1, bytes(pending[:part_size])))
                del pending[:part_size]
        if pending or not parts:
            parts.append(await _part(s3, bucket, key, upload_id, len(parts) + 1, bytes(pending)))
        await s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                           MultipartUpload={"Parts": parts})
    except BaseException:
        with contextlib.suppress(Exception):
            await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise
    return True


async def _part(s3: Any, bucket: str, key: str, upload_id: str, n: int, data: bytes) -> dict[str, Any]:
    b64 = _b64sha(data)
    resp = await s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=data,
                                ChecksumSHA256=b64)
    return {"PartNumber": n, "ETag": resp["ETag"], "ChecksumSHA256": resp.get("ChecksumSHA256", b64)}


async def _body_blocks(s3: Any, bucket: str, key: str, etag: str, offset: int, block: int) -> AsyncIterator[bytes]:
    """The object's bytes from `offset` on, as read (the object must still have `etag`)."""
    resp = await s3.get_object(Bucket=bucket, Key=key, IfMatch=etag, Range=f"bytes={offset}-")
    stream = resp["Body"]  # aiobotocore's StreamingBody reads in pieces; `async with` only closes it
    async with stream:
        while chunk := await stream.read(min(block, 1 << 20)):
            yield chunk


def _b64sha(data: bytes | bytearray) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _err(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
