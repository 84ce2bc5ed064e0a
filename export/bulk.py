"""Bulk export: recordings out of a repository, decrypted (and optionally OpenPGP-encrypted) into a bucket.

>>> report = await run_export(ExportOptions(source="s3://rec/site-a", dest="s3://audit/case-7",
...                                         sse="aws:kms", sse_kms_key_id=key_arn), unwrapper)
>>> report.exported, report.skipped, report.failed

Per recording, one stream: ranged GET of the package -> chunks authenticated and decrypted (header,
key commitment and every chunk tag checked) -> SHA-256 of the plaintext -> optionally `gpg --encrypt`
-> multipart upload with a SHA-256 checksum per part. Nothing touches the local disk; memory per
recording is about one part buffer plus a chunk. At most `concurrency` recordings are in flight.

Destination layout: `<prefix>/year=YYYY/month=MM/day=DD/<recording-id>.<ext>[.pgp]` and beside it
`<recording-id>_metadata.json`. The date is the one in the source key (`<kind>/<YYYY>/<MM>/<DD>/`),
else the capture time. The data object is verified by HEAD (size, SHA-256 checksum, server-side
encryption) before the metadata object is written, so a metadata object that matches the source
package (key, size, PGP recipient) means "done": a re-run skips it. A failure (wrong key, tampered
package, upload error) fails that recording only (its multipart upload is aborted) and is reported.
An outage of the key provider itself (the LKM unreachable or out of service after its retries, KMS
refusing or unreachable) is not a failure of one recording: the export stops with one ExportError;
recordings already in flight finish, none is started, and a re-run resumes after the last one done.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import json
import mimetypes
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from mediaseal import codec
from mediaseal.export.pgp import PgpError, PgpRecipient
from mediaseal.export.source import PackageSource, SourceError, SourceObject, open_source
from mediaseal.keys.errors import KeysError
from mediaseal.keys.kms import KmsError
from mediaseal.keys.lkm.client import LKMClient
from mediaseal.keys.lkm.errors import KeyServiceUnreachableError, OverloadedError, RateLimitedError, UnavailableError
from mediaseal.plumbing import s3 as s3io
from mediaseal.plumbing.locations import LocationError, RepositoryKey, parse_repository_url
from mediaseal.uploader.base import RepositoryError
from mediaseal.uploader.s3 import MIN_PART_SIZE, S3Options

__all__ = ["ExportError", "ExportOptions", "Failure", "Report", "Selection", "run_export"]

MiB = 1 << 20
HEAD_READ = 64 * 1024  # the first GET of a package: its header is far smaller
EXPORT_FORMAT = "mediaseal-export/1"
_EXT = re.compile(r"[A-Za-z0-9]{1,10}")
# The key provider failing as a whole, not for one package: the LKM unreachable or out of service (after
# the client's own retries), KMS refusing or unreachable (a KMS keyring's private keys all sit under one
# KMS key). Every recording still to come would fail the same way, each after its own connection
# attempts and timeouts, and each reported on its own (thousands of identical errors, found by
# tests/test_reliability_export.py); so the first one stops the export instead.
_PROVIDER_DOWN: tuple[type[KeysError], ...] = (KeyServiceUnreachableError, UnavailableError, OverloadedError,
                                               RateLimitedError, KmsError)


class ExportError(Exception):
    """The export could not start or could not write one recording (one line)."""


@dataclass(frozen=True)
class Selection:
    """Which recordings: every filter given must match."""

    prefix: str = ""
    kinds: frozenset[str] = frozenset()
    since: dt.date | None = None
    until: dt.date | None = None  # inclusive
    ids: frozenset[str] | None = None

    def wants(self, kind: str | None, day: dt.date | None, recording_id: str | None) -> bool:
        """None means "not known yet" and passes (the header decides later)."""
        if self.kinds and kind is not None and kind not in self.kinds:
            return False
        if day is not None and ((self.since and day < self.since) or (self.until and day > self.until)):
            return False
        return not (self.ids is not None and recording_id is not None and recording_id not in self.ids)

    @property
    def needs_date(self) -> bool:
        return self.since is not None or self.until is not None


@dataclass(frozen=True)
class ExportOptions:
    source: str  # s3://bucket/prefix or file:///dir
    dest: str  # s3://bucket/prefix
    selection: Selection = Selection()
    sse: str | None = None  # AES256 | aws:kms
    sse_kms_key_id: str | None = None
    pgp_recipient: Path | None = None
    concurrency: int = 4
    part_size: int = 8 * MiB
    batch: int = 64  # recordings whose headers are read and DEKs unwrapped together
    endpoint_url: str | None = None  # both repositories; None: the AWS chain (AWS_ENDPOINT_URL_S3, ...)


@dataclass(frozen=True)
class Failure:
    key: str
    error: str


@dataclass
class Report:
    selected: int = 0
    exported: int = 0
    skipped: int = 0
    failed: list[Failure] = field(default_factory=list)
    plaintext_bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.plaintext_bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0
        per_s = self.exported / self.seconds if self.seconds > 0 else 0.0
        return (f"export: {self.selected} selected, {self.exported} exported, {self.skipped} already exported, "
                f"{len(self.failed)} failed; {self.plaintext_bytes} bytes in {self.seconds:.1f} s "
                f"({per_s:.1f} recordings/s, {rate:.1f} MB/s)")


class Progress(Protocol):
    def start(self, total: int, total_bytes: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def done(self, key: str, outcome: str, detail: str) -> None: ...
    def stop(self) -> None: ...


class LogProgress:
    """Plain lines on stderr, one per recording (for logs and pipes)."""

    def start(self, total: int, total_bytes: int) -> None:
        _say(f"export: {total} recording(s) selected, {total_bytes} package bytes")

    def advance(self, nbytes: int) -> None:
        pass

    def done(self, key: str, outcome: str, detail: str) -> None:
        if outcome != "excluded":
            _say(f"export: {outcome} {key}: {detail}")

    def stop(self) -> None:
        pass


class RichProgress:
    """A progress bar on a terminal: one bar over the package bytes (bytes shown as bytes, with throughput
    and ETA) and the recordings done beside it, counted as recordings."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
        from rich.progress import Progress as RichBar

        self._bar = RichBar(TextColumn("[bold]export"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TextColumn("{task.fields[recordings]}"), TimeRemainingColumn(),
                            console=console or Console(stderr=True))
        self._task: Any = None
        self._total = self._done = 0

    def _recordings(self) -> str:
        return f"{self._done}/{self._total} recordings"

    def start(self, total: int, total_bytes: int) -> None:
        self._total = total
        self._bar.start()
        self._task = self._bar.add_task("export", total=total_bytes, recordings=self._recordings())

    def advance(self, nbytes: int) -> None:
        self._bar.advance(self._task, nbytes)

    def done(self, key: str, outcome: str, detail: str) -> None:
        self._done += 1
        self._bar.update(self._task, recordings=self._recordings())
        if outcome == "failed":
            self._bar.console.print(f"export: failed {key}: {detail}")

    def stop(self) -> None:
        self._bar.stop()


def default_progress() -> Progress:
    return RichProgress() if sys.stderr.isatty() else LogProgress()


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- the export ------------------------------------------------------------------------------------


@dataclass
class _Item:
    obj: SourceObject
    header: codec.Header | None = None
    day: dt.date | None = None
    dek: bytes | None = None
    kid: str = ""
    error: str | None = None


async def run_export(opts: ExportOptions, unwrapper: codec.Unwrapper, progress: Progress | None = None) -> Report:
    """Export every selected recording; per-recording failures are in the report, not raised."""
    if opts.concurrency < 1 or opts.batch < 1:
        raise ExportError("--concurrency and the batch size must be at least 1")
    if opts.part_size < MIN_PART_SIZE:
        raise ExportError("the part size must be at least 5 MiB")
    progress = progress or default_progress()
    started = time.monotonic()
    pgp = await PgpRecipient.load(opts.pgp_recipient) if opts.pgp_recipient else None
    try:
        dest = _Dest(opts)
        try:
            source = open_source(opts.source, endpoint_url=opts.endpoint_url)
        except SourceError as e:
            raise ExportError(str(e)) from None
        try:
            report = await _Exporter(opts, unwrapper, source, dest, pgp, progress).run()
        finally:
            await source.close()
            await dest.close()
    finally:
        if pgp is not None:
            pgp.close()
    report.seconds = time.monotonic() - started
    return report


class _Exporter:
    def __init__(self, opts: ExportOptions, unwrapper: codec.Unwrapper, source: PackageSource, dest: _Dest,
                 pgp: PgpRecipient | None, progress: Progress) -> None:
        self.opts, self.unwrapper, self.source, self.dest, self.pgp = opts, unwrapper, source, dest, pgp
        self.progress = progress
        self.report = Report()
        self.slots = asyncio.Semaphore(opts.concurrency)
        self.outage: KeysError | None = None  # the key provider is down: start nothing more
        self.unattempted = 0

    async def run(self) -> Report:
        sel = self.opts.selection
        selected: list[SourceObject] = []
        try:
            async for obj in self.source.list(sel.prefix):
                facts = _key_facts(obj.key)
                if facts is None or sel.wants(*facts):
                    selected.append(obj)
        except SourceError as e:
            raise ExportError(str(e)) from None
        await self.dest.check()
        self.progress.start(len(selected), sum(o.size for o in selected))
        try:
            for start in range(0, len(selected), self.opts.batch):
                window = [_Item(o) for o in selected[start:start + self.opts.batch]]
                await asyncio.gather(*(self._bounded(self._prepare, it) for it in window))
                await self._unwrap_batch([it for it in window if it.header is not None and it.error is None])
                await asyncio.gather(*(self._bounded(self._finish, it) for it in window))
                if self.outage is not None:
                    self.unattempted += len(selected) - start - len(window)
                    break
        finally:
            self.progress.stop()
        r = self.report
        if self.outage is not None:
            raise ExportError(f"export stopped, the key provider failed: {self.outage} ({r.exported} exported, "
                              f"{r.skipped} already exported, {len(r.failed)} failed, {self.unattempted} not "
                              "attempted; run the same export again to resume)")
        r.selected = r.exported + r.skipped + len(r.failed)
        return r

    async def _bounded(self, fn: Callable[[_Item], Awaitable[None]], item: _Item) -> None:
        async with self.slots:
            try:
                await fn(item)
            except (codec.CodecError, KeysError, SourceError, PgpError, ExportError, RepositoryError) as e:
                item.error = str(e) or type(e).__name__

    async def _prepare(self, it: _Item) -> None:
        """Read the header; drop recordings the filters exclude; mark those already exported."""
        head, _size = await self.source.read_head(it.obj.key, HEAD_READ)
        header = codec.read_header(io.BytesIO(head))
        codec.Layout(header.size, header.chunk_size, it.obj.size)  # a truncated package fails here
        m = header.metadata
        facts = _key_facts(it.obj.key)
        it.day = facts[1] if facts else _date_of(m.captured_at)
        if not self.opts.selection.wants(m.kind, it.day, m.recording_id) or (
                self.opts.selection.needs_date and it.day is None):
            it.error = "excluded"  # not an error: not reported
            return
        it.header = header
        done = await self.dest.exported(self._meta_key(it), it.obj, self._fingerprint)
        if done:
            it.error = "skipped"

    @property
    def _fingerprint(self) -> str | None:
        return self.pgp.fingerprint if self.pgp else None

    async def _unwrap_batch(self, items: Sequence[_Item]) -> None:
        """LKM: one batch request for the window (first wrap of each); the rest one by one later."""
        if not isinstance(self.unwrapper, LKMClient) or not items:
            return
        try:
            answers = await self.unwrapper.unwrap_batch(
                [(it.header.wraps[0], it.header.metadata.recording_id) for it in items if it.header is not None])
        except _PROVIDER_DOWN as e:
            self.outage = self.outage or e
            return
        except KeysError:
            return  # each recording asks on its own, and fails on its own
        for it, answer in zip(items, answers, strict=True):
            if isinstance(answer, bytes) and it.header is not None:
                it.dek, it.kid = answer, it.header.wraps[0].kid

    async def _finish(self, it: _Item) -> None:
        key = it.obj.key
        if it.error == "excluded":
            self.progress.advance(it.obj.size)
            self.progress.done(key, "excluded", "not selected")
            return
        if it.error == "skipped":
            self.report.skipped += 1
            self.progress.advance(it.obj.size)
            self.progress.done(key, "skipped", "already exported")
            return
        if it.error is None:
            if self.outage is not None:  # not this recording's failure: not tried, not reported
                self.unattempted += 1
                return
            try:
                await self._export(it)
            except _PROVIDER_DOWN as e:
                self.outage = self.outage or e
                self.unattempted += 1
                return
            except (codec.CodecError, KeysError, SourceError, PgpError, ExportError, RepositoryError) as e:
                it.error = str(e) or type(e).__name__
            except Exception as e:  # anything else fails this recording, not the export
                it.error = f"{type(e).__name__}: {e}"
        if it.error is not None:
            self.report.failed.append(Failure(key, it.error))
            self.progress.done(key, "failed", it.error)

    async def _unwrap(self, it: _Item) -> None:
        assert it.header is not None
        if it.dek is not None:
            return
        failure: Exception | None = None
        for w in it.header.wraps:  # one at a time, so the metadata can name the kid that opened it
            try:
                if isinstance(self.unwrapper, LKMClient):
                    it.dek = await self.unwrapper.unwrap_async([w], it.header.metadata.recording_id)
                else:
                    it.dek = await asyncio.to_thread(self.unwrapper.unwrap, [w])
            except _PROVIDER_DOWN:
                raise  # the other wraps go to the same provider
            except (codec.NoMatchingKeyError, KeysError) as e:
                failure = failure if isinstance(failure, KeysError) else e
                continue
            it.kid = w.kid
            return
        raise failure or codec.NoMatchingKeyError("the package has no wraps")

    async def _export(self, it: _Item) -> None:
        assert it.header is not None
        try:
            await self._unwrap(it)
        except _PROVIDER_DOWN:
            raise  # _finish stops the export
        except (codec.NoMatchingKeyError, KeysError) as e:
            raise ExportError(f"no key: {e}") from None
        assert it.dek is not None
        header, obj = it.header, it.obj
        keys = header.open(it.dek)  # key commitment and header MAC, before any chunk
        it.dek = None
        m = header.metadata
        data_key = self.dest.key(self._day_path(it), f"{m.recording_id}.{_extension(m)}"
                                 + (".pgp" if self.pgp else ""))
        content_type = "application/pgp-encrypted" if self.pgp else m.content_type
        upload = _Upload(self.dest, data_key, content_type, self.opts.part_size)
        plain = _PlainStream(self.source, obj, header, keys, self.progress)
        try:
            if self.pgp is None:
                async for piece in plain.pieces():
                    await upload.write(piece)
            else:
                await self._through_gpg(self.pgp, plain, upload)
            size, checksum = await upload.finish()
        except BaseException:
            await upload.abort()
            raise
        await self.dest.verify(data_key, size, checksum)
        doc = {
            "format": EXPORT_FORMAT,
            "recording": dict(m.__dict__),
            "kid": it.kid,
            "kids": [w.kid for w in header.wraps],
            "source": {"repository": self.source.url, "key": obj.key, "size": obj.size},
            "object": {"key": data_key, "size": size, "checksum_sha256": checksum, "content_type": content_type},
            "plaintext": {"size": plain.size, "sha256": plain.sha256.hexdigest()},
            "server_side_encryption": {"sse": self.opts.sse, "kms_key_id": self.opts.sse_kms_key_id},
            "pgp": {"recipient_fingerprint": self.pgp.fingerprint, "recipient": self.pgp.user_id,
                    "packets": "PKESK v3 + SEIPD v1 (MDC)"} if self.pgp else None,
            "exported_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        await self.dest.put_small(self._meta_key(it), json.dumps(doc, indent=2).encode() + b"\n", "application/json")
        self.report.exported += 1
        self.report.plaintext_bytes += plain.size
        self.progress.done(obj.key, "exported", f"{self.dest.url_of(data_key)} ({plain.size} bytes)")

    async def _through_gpg(self, pgp: PgpRecipient, plain: _PlainStream, upload: _Upload) -> None:
        async with pgp.encryptor() as enc:
            async def feed() -> None:
                async for piece in plain.pieces():
                    await enc.write(piece)
                await enc.close_input()

            async def drain() -> None:
                async for block in enc.output(MiB):
                    await upload.write(block)

            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(feed())
                    tg.create_task(drain())
            except BaseExceptionGroup as eg:
                raise _first(eg) from None

    def _day_path(self, it: _Item) -> str:
        d = it.day
        return "year=unknown/month=unknown/day=unknown" if d is None else \
            f"year={d.year:04d}/month={d.month:02d}/day={d.day:02d}"

    def _meta_key(self, it: _Item) -> str:
        assert it.header is not None
        return self.dest.key(self._day_path(it), f"{it.header.metadata.recording_id}_metadata.json")


def _first(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    for x in eg.exceptions:
        if isinstance(x, BaseExceptionGroup):
            return _first(x)
        if not isinstance(x, asyncio.CancelledError):
            return x
    first: BaseException = eg.exceptions[0]
    return first


class _PlainStream:
    """The authenticated plaintext of one package, chunk by chunk, from one streamed ranged GET.

    `codec.BodyStream` owns the chunk layout and the last-chunk rule: it is fed the body as it comes,
    so a package cut short (even at a chunk boundary) fails at its end, and the upload is aborted.
    """

    def __init__(self, source: PackageSource, obj: SourceObject, header: codec.Header, keys: codec.Keys,
                 progress: Progress) -> None:
        self.source, self.obj, self.header, self.progress = source, obj, header, progress
        self.stream = codec.BodyStream(header, keys)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def _take(self, pieces: Iterable[memoryview]) -> list[bytes]:
        out = [bytes(pt) for pt in pieces]  # each view is valid until the next one is produced
        for pt in out:
            self.sha256.update(pt)
            self.size += len(pt)
        return out

    def _end(self) -> list[bytes]:
        return self._take([self.stream.end()])

    async def pieces(self) -> AsyncIterator[bytes]:
        stride = codec.stride(self.header.chunk_size)
        body = self.obj.size - self.header.size
        async for ct in self.source.iter_read(self.obj.key, self.header.size, body, stride):
            for pt in await asyncio.to_thread(self._take, self.stream.feed(ct)):
                yield pt
            self.progress.advance(len(ct))
        for pt in await asyncio.to_thread(self._end):
            yield pt
        self.progress.advance(self.header.size)


# -- the destination bucket --------------------------------------------------------------------------


class _Dest:
    """The destination bucket: its own client (plumbing.s3.COMMAND retries: a one-shot command)."""

    def __init__(self, opts: ExportOptions) -> None:
        try:
            where = parse_repository_url(opts.dest)
            if where.scheme != "s3":
                raise LocationError(f"not an s3://bucket/prefix url: {opts.dest!r}")
            S3Options(sse=opts.sse, sse_kms_key_id=opts.sse_kms_key_id)  # validates the combination
        except (LocationError, RepositoryError) as e:
            raise ExportError(str(e)) from None
        self.bucket, self.prefix = where.bucket, where.prefix
        self.opts = opts
        self.settings = s3io.ClientSettings(endpoint_url=opts.endpoint_url, retries=s3io.COMMAND,
                                            max_pool_connections=max(10, 2 * opts.concurrency))
        try:
            self._client = s3io.LazyClient(self.settings)
        except s3io.S3Error as e:
            raise ExportError(f"destination {opts.dest}: {e}") from None

    def key(self, day_path: str, name: str) -> str:
        return f"{self.prefix}/{day_path}/{name}" if self.prefix else f"{day_path}/{name}"

    def url_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def sse_args(self) -> dict[str, str]:
        return s3io.sse_args(self.opts.sse, self.opts.sse_kms_key_id)

    async def target(self) -> s3io.S3Bucket:
        try:
            return s3io.S3Bucket(await self._client.get(), self.bucket, settings=self.settings)
        except s3io.S3Error as e:
            raise ExportError(f"destination {self.opts.dest}: {e}") from None

    async def call(self, op: str, key: str, fn: Callable[..., Awaitable[Any]], **kwargs: Any) -> Any:
        b = await self.target()
        try:
            return await b.call(op, key, fn(Bucket=self.bucket, **kwargs))
        except s3io.S3Error as e:
            raise ExportError(str(e)) from None

    async def check(self) -> None:
        """The destination bucket exists and answers (before any recording is read)."""
        c = (await self.target()).client
        try:
            await self.call("HeadBucket", "", c.head_bucket)
        except ExportError as e:
            if ": 404" in str(e) or "NoSuchBucket" in str(e):
                raise ExportError(f"destination bucket {self.bucket} does not exist") from None
            raise

    async def exported(self, meta_key: str, obj: SourceObject, fingerprint: str | None) -> bool:
        """True when a metadata object says this very package was exported (and its data object is there)."""
        b = await self.target()
        try:
            resp = await b.call("GetObject", meta_key, b.client.get_object(Bucket=self.bucket, Key=meta_key))
            async with resp["Body"] as body:
                doc = json.loads(await b.call("GetObject", meta_key, body.read()))
        except s3io.S3NotFoundError:
            return False
        except s3io.S3Error as e:
            raise ExportError(str(e)) from None
        except ValueError:
            return False  # not ours, or damaged: export again (same keys: overwritten)
        try:
            same = (doc["format"] == EXPORT_FORMAT and doc["source"]["key"] == obj.key
                    and doc["source"]["size"] == obj.size
                    and (doc["pgp"] or {}).get("recipient_fingerprint") == fingerprint)
            data_key, size = str(doc["object"]["key"]), int(doc["object"]["size"])
        except (KeyError, TypeError, ValueError):
            return False
        if not same:
            return False
        try:
            head = await b.call("HeadObject", data_key, b.client.head_object(Bucket=self.bucket, Key=data_key))
        except s3io.S3Error:
            return False
        return int(head.get("ContentLength", -1)) == size

    async def put_small(self, key: str, data: bytes, content_type: str) -> str:
        up = s3io.StreamingUpload(await self.target(), key, max(len(data) + 1, MIN_PART_SIZE),
                                  {"ContentType": content_type, **self.sse_args()})
        try:
            await up.write(data)
            return (await up.finish())[1]
        except s3io.S3Error as e:
            raise ExportError(str(e)) from None

    async def verify(self, key: str, size: int, checksum: str) -> None:
        c = (await self.target()).client
        head = await self.call("HeadObject", key, c.head_object, Key=key, ChecksumMode="ENABLED")
        where = self.url_of(key)
        if head.get("ContentLength") != size:
            raise ExportError(f"verify {where}: holds {head.get('ContentLength')} bytes, sent {size}")
        got = str(head.get("ChecksumSHA256") or "")
        value, _, parts = got.partition("-")
        want, _, want_parts = checksum.partition("-")
        if not got or value != want or (parts and parts != want_parts):
            raise ExportError(f"verify {where}: checksum {got or 'missing'}, sent {checksum}")
        if self.opts.sse and head.get("ServerSideEncryption") != self.opts.sse:
            raise ExportError(f"verify {where}: stored with encryption {head.get('ServerSideEncryption')}, "
                              f"asked for {self.opts.sse}")

    async def close(self) -> None:
        await self._client.close()


class _Upload:
    """One object written as a stream (plumbing.s3.StreamingUpload: a single PutObject if it stays under
    one part, else multipart with SHA-256 per part). Nothing exists at the key until `finish`; `abort`
    drops an unfinished upload. Errors are ExportErrors."""

    def __init__(self, dest: _Dest, key: str, content_type: str, part_size: int) -> None:
        self.dest, self.key, self.content_type, self.part_size = dest, key, content_type, part_size
        self._up: s3io.StreamingUpload | None = None

    async def _stream(self) -> s3io.StreamingUpload:
        if self._up is None:
            self._up = s3io.StreamingUpload(await self.dest.target(), self.key, self.part_size,
                                            {"ContentType": self.content_type, **self.dest.sse_args()})
        return self._up

    async def write(self, data: bytes) -> None:
        up = await self._stream()
        try:
            await up.write(data)
        except s3io.S3Error as e:
            raise ExportError(str(e)) from None

    async def finish(self) -> tuple[int, str]:
        """(bytes stored, the checksum S3 should report: base64 SHA-256, or the composite `...-N`)."""
        up = await self._stream()
        try:
            return await up.finish()
        except s3io.S3Error as e:
            raise ExportError(str(e)) from None

    async def abort(self) -> None:
        if self._up is not None:
            await self._up.abort()


# -- helpers -----------------------------------------------------------------------------------------


def _key_facts(key: str) -> tuple[str, dt.date | None, str] | None:
    """(kind, date, recording id) from a key in the agent's layout, else None."""
    found = RepositoryKey.find(key)
    if found is None:
        return None
    k = found[1]
    return k.kind, k.date, k.recording_id


def _date_of(captured_at: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(captured_at[:10])
    except ValueError:
        return None


def _extension(m: codec.Metadata) -> str:
    """From the original file name, else the content type; `bin` when neither says."""
    suffix = PurePosixPath(m.original_name.replace("\\", "/")).suffix.lstrip(".")
    if _EXT.fullmatch(suffix):
        return suffix.lower()
    guessed = (mimetypes.guess_extension(m.content_type.split(";")[0].strip()) or "").lstrip(".")
    return guessed if _EXT.fullmatch(guessed) else "bin"


def parse_ids(text: str) -> frozenset[str]:
    """Recording ids, one per line; blank lines and `#` comments ignored."""
    return frozenset(s for line in text.splitlines() if (s := line.split("#", 1)[0].strip()))
