"""Key retirement and re-wrap over a repository: the uploader's read side composed with keys.rotation.

>>> print(await retire_key(ring, old_kid, "file:///srv/recordings"))   # KeyInUseError while packages need it
>>> report = await rewrap_repository(ring, passphrase, "s3://recordings/site-a")
>>> report.summary()

Here because keys must not import the uploader: keys.rotation states the rules (which wraps a package
keeps, whether a key may be retired), the uploader reads and rewrites packages, and this module (on
the composing side, called by `mediaseal keys retire` / `keys rewrap`) walks one with the other.

- Packages are found by the repository's `list` (`*.mseal`, dot-files skipped: temp files) and only
  their headers are read (one ranged read of `HEAD_GUESS` bytes, a second up to the largest possible
  header if it is longer). A package that can't be read or parsed fails the scan (RepositoryScanError
  naming it): a scan that skipped it could retire a key it needs.
- `rewrap_repository` rewrites each package whose wraps name an older key of this keyring so it carries
  a wrap for the current key instead: the DEK is unwrapped and checked against the header's commitment
  in memory, re-wrapped, and the repository's `rewrite_head` replaces the header with the body copied
  byte for byte (a file: temp beside it, fsync, rename, fsync the directory; S3: streamed, single PUT up
  to `part_size`, multipart above, every read pinned to the version whose header was read). One
  package failing is recorded in the report and the rest go on. No plaintext and no DEK is written.
- S3 requests use the command retry policy (plumbing.s3.COMMAND): nothing here backs off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from mediaseal import codec
from mediaseal.codec.header import MAX_HEADER
from mediaseal.keys.errors import KeysError
from mediaseal.keys.keyring import Keyring
from mediaseal.keys.rotation import (
    KeyUsage,
    PackageRef,
    RepositoryScanError,
    RewrapReport,
    check_retirable,
    retire_checked,
    rewrap_plan,
    rewrapped_header,
    usable_kids,
)
from mediaseal.uploader import ReadableRepository, RepositoryError, open_reader

__all__ = ["DEFAULT_PART_SIZE", "key_usage", "retire_key", "rewrap_repository", "scan_repository"]

DEFAULT_PART_SIZE = 16 << 20
HEAD_GUESS = 8192  # one ranged read gets a typical header (about 1 KiB per wrap plus metadata)


def _open(url: str, endpoint_url: str | None) -> ReadableRepository:
    try:
        return open_reader(url, endpoint_url=endpoint_url)
    except RepositoryError as e:
        raise RepositoryScanError(f"repository {url}: {e}") from None


async def _header(repo: ReadableRepository, key: str) -> codec.Header:
    where = repo.location(key)
    try:
        data, size = await repo.read_head(key, HEAD_GUESS)
        try:
            return codec.parse_header(data)
        except codec.TruncatedPackageError:
            if len(data) >= size:
                raise
        data = await repo.read(key, 0, MAX_HEADER)
        return codec.parse_header(data)
    except RepositoryError as e:
        raise RepositoryScanError(f"can't read package {where}: {e}") from None
    except codec.TruncatedPackageError:
        raise RepositoryScanError(f"package {where} ends inside its header") from None
    except codec.CodecError as e:
        raise RepositoryScanError(f"package {where}: {e}") from None


async def _keys(repo: ReadableRepository) -> AsyncIterator[str]:
    try:
        async for obj in repo.list():
            yield obj.key
    except RepositoryError as e:
        raise RepositoryScanError(f"{repo.url}: {e}") from None


async def scan_repository(url: str, *, endpoint_url: str | None = None) -> AsyncIterator[PackageRef]:
    """Every package's header, with its location (a path, or s3://bucket/key)."""
    repo = _open(url, endpoint_url)
    try:
        async for key in _keys(repo):
            yield PackageRef(repo.location(key), await _header(repo, key))
    finally:
        await repo.close()


async def key_usage(keyring: Keyring, kid: str, url: str, *, endpoint_url: str | None = None) -> KeyUsage:
    """Scan the repository's headers for wraps naming `kid`."""
    usable = usable_kids(keyring, kid)
    usage = KeyUsage(kid)
    async for ref in scan_repository(url, endpoint_url=endpoint_url):
        usage.add(ref, usable)
    return usage


async def retire_key(keyring: Keyring, kid: str, url: str, *, force: bool = False,
                     endpoint_url: str | None = None) -> str:
    """Retire `kid` unless packages in `url` still need it (KeyInUseError; `force` retires all the same)."""
    nothing_to_do = check_retirable(keyring, kid)
    if nothing_to_do is not None:
        return nothing_to_do
    usage = await key_usage(keyring, kid, url, endpoint_url=endpoint_url)
    return retire_checked(keyring, kid, usage, url, force=force)


async def rewrap_repository(keyring: Keyring, passphrase: bytes | None, url: str, *, from_kid: str | None = None,
                            endpoint_url: str | None = None, part_size: int = DEFAULT_PART_SIZE,
                            progress: Callable[[str], None] | None = None) -> RewrapReport:
    """Move every package in `url` wrapped to an older key of this keyring (or only `from_kid`) to the current key."""
    if from_kid is not None:
        keyring.record(from_kid)
    unwrapper = await asyncio.to_thread(keyring.unlock, passphrase)
    recipient = keyring.recipient()
    ours = {r.kid for r in keyring.records()}
    report = RewrapReport(recipient.kid)
    repo = _open(url, endpoint_url)
    try:
        async for key in _keys(repo):
            location = repo.location(key)
            try:
                header = await _header(repo, key)
                keep = rewrap_plan(header, ours, recipient.kid, from_kid)
                if keep is None:
                    report.unchanged += 1
                    continue
                new = await asyncio.to_thread(rewrapped_header, header, keep, unwrapper, recipient)
                await repo.rewrite_head(key, header.size, new.encode(), part_size=part_size)
            except (OSError, codec.CodecError, KeysError, RepositoryError) as e:
                report.failed.append((location, " ".join(str(e).split()) or type(e).__name__))
                continue
            report.rewrapped.append(location)
            if progress:
                progress(f"rewrapped {location}")
    finally:
        await repo.close()
    return report
