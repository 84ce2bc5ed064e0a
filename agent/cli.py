"""The `mediaseal` command line. Names are stable: scripts depend on them (DESIGN section 7).

Expected failures (a tampered package, a wrong key, a missing file, bad config) print one line,
`mediaseal: error: ...`, and exit 1; usage errors exit 2. Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import secrets
import sys
import tempfile
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives import serialization

from mediaseal import codec
from mediaseal.agent import argtypes
from mediaseal.keys import keyring as kr
from mediaseal.keys import keyset as ks
from mediaseal.keys.errors import KeysError
from mediaseal.keys.kms import DEFAULT_CACHE_SECONDS, KmsOptions
from mediaseal.keys.lkm import options as lkm_options

EXIT_FAILURE = 1


class CommandError(Exception):
    """An expected failure of a command, reported as one line."""


def new_recording_id(now: dt.datetime | None = None) -> str:
    """A fresh, time-sortable id for a recording that has no stable identity of its own."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(8)}"


def cmd_run(args: argparse.Namespace) -> None:
    from mediaseal.agent.run import run  # the daemon's imports (event loop, watcher) only for this command

    run(args.config, args.log_format)


# -- keys ------------------------------------------------------------------------------------------


def _passphrase(args: argparse.Namespace) -> bytes | None:
    return kr.passphrase_from(os.environ, getattr(args, "passphrase_file", None))


def _kms_options(args: argparse.Namespace) -> KmsOptions:
    seconds = getattr(args, "kms_cache_seconds", None)
    return KmsOptions(cache_seconds=DEFAULT_CACHE_SECONDS if seconds is None else seconds)


def cmd_keys_init(args: argparse.Namespace) -> None:
    if args.kms_key_id:
        if args.passphrase_file:
            raise CommandError("--kms-key-id and --passphrase-file exclude each other: KMS protects the keys")
        ring = kr.Keyring.init(args.keyring, None, alg=args.alg, kms_key_id=args.kms_key_id)
        print(ring.current().kid)
        return
    passphrase = _passphrase(args)
    ring = kr.Keyring.init(args.keyring, passphrase, alg=args.alg)
    if passphrase is None:
        print(
            f"mediaseal: warning: no passphrase given; private keys are protected by {ring.path}/master.key, "
            "which protects them only as well as that file (fine for the embedded default, not for production)",
            file=sys.stderr,
        )
    print(ring.current().kid)


def cmd_keys_rotate(args: argparse.Namespace) -> None:
    ring = kr.Keyring.open(args.keyring, kms=_kms_options(args))
    if args.if_due:  # for a timer: exits 0 whether or not anything was due, saying what it did
        from mediaseal.keys.rotation import rotate_if_due

        print(rotate_if_due(ring, _passphrase(args)))
        return
    print(ring.rotate(_passphrase(args)).kid)


def cmd_keys_schedule(args: argparse.Namespace) -> None:
    from mediaseal.keys.rotation import next_rotation

    ring = kr.Keyring.open(args.keyring)
    if args.set is not None:
        try:
            ring.set_schedule(kr.RotationSchedule.make(args.set, args.grace))
        except ValueError as e:
            raise CommandError(str(e)) from None
    elif args.grace is not None:
        raise CommandError("--grace goes with --set")
    s = ring.schedule
    due = next_rotation(ring)
    print(f"schedule {s.every}, grace {s.grace_seconds} s; next pending key: "
          f"{ks.format_time(due) if due else 'never (disabled)'}")


def cmd_keys_retire(args: argparse.Namespace) -> None:
    from mediaseal.export.rewrap import retire_key

    ring = kr.Keyring.open(args.keyring)
    print(asyncio.run(retire_key(ring, args.kid, args.repository, force=args.force, endpoint_url=args.endpoint_url)))


def cmd_keys_rewrap(args: argparse.Namespace) -> None:
    from mediaseal.export.rewrap import rewrap_repository

    ring = kr.Keyring.open(args.keyring, kms=_kms_options(args))
    report = asyncio.run(rewrap_repository(ring, _passphrase(args), args.repository, from_kid=args.from_kid,
                                           endpoint_url=args.endpoint_url))
    for location, error in report.failed:
        print(f"mediaseal: error: {location}: {error}", file=sys.stderr)
    print(report.summary())
    if report.failed:
        raise CommandError(f"{len(report.failed)} package(s) could not be re-wrapped (listed above)")


def cmd_keys_list(args: argparse.Namespace) -> None:
    ring = kr.Keyring.open(args.keyring)
    records = ring.records()
    current = ring.current().kid
    if args.json:
        print(json.dumps([{**r.to_json(), "current": r.kid == current} for r in records], indent=2))
        return
    for r in records:
        mark = "*" if r.kid == current else " "
        print(f"{mark} {r.kid}  {r.alg:<13} {r.state:<12} {r.created_at}")


def cmd_keys_publish(args: argparse.Namespace) -> None:
    ring = kr.Keyring.open(args.keyring)
    document = ring.publish(_passphrase(args), ttl_seconds=args.ttl)
    out = Path(args.output)
    _atomic_write_bytes(out, document)
    signer_out = Path(args.signer_out) if args.signer_out else out.with_name("signer.pem")
    signer_pem = ring.signer.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _atomic_write_bytes(signer_out, signer_pem)
    print(f"{out} (signer: {signer_out})")


# -- packages --------------------------------------------------------------------------------------


def _recipient(args: argparse.Namespace) -> codec.Recipient:
    if args.keyring:
        return kr.Keyring.open(args.keyring).recipient()
    if args.keyset:
        if not args.signer:
            raise CommandError("--keyset needs --signer (the key set signer's public key)")
        signer = ks.load_signer(_read_file(args.signer))
        return ks.verify_keyset(_read_file(args.keyset), signer).recipient()
    raise CommandError("encrypt needs --keyring DIR or --keyset FILE --signer FILE")


def cmd_encrypt(args: argparse.Namespace) -> None:
    recipient = _recipient(args)
    name = "" if args.input == "-" else Path(args.input).name
    metadata = codec.Metadata(
        recording_id=args.recording_id or new_recording_id(),
        kind=args.kind,
        content_type=args.content_type,
        original_name=name,
        captured_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        agent_id=args.agent_id,
    )
    header, keys = codec.new_package(metadata, [recipient], args.chunk_size)
    with _open_in(args.input) as src, _atomic_out(args.output) as dst:
        codec.seal(src, dst, header, keys)
    print(metadata.recording_id, file=sys.stderr)


def _unwrapper(args: argparse.Namespace) -> codec.Unwrapper:
    if getattr(args, "lkm", None):
        if args.keyring:
            raise CommandError("--lkm and --keyring exclude each other: choose one key provider")
        return lkm_options.client_from_args(args)  # imports aiohttp only for this provider
    if args.keyring:
        return kr.Keyring.open(args.keyring, kms=_kms_options(args)).unlock(_passphrase(args))
    raise CommandError("decrypting needs a key provider: --keyring DIR or --lkm URL")


def cmd_decrypt(args: argparse.Namespace) -> None:
    if args.length is not None and args.offset is None:
        args.offset = 0
    unwrapper = _unwrapper(args)
    if args.input.startswith(("s3://", "file://")):
        _decrypt_url(args, unwrapper)
        return
    with _open_in(args.input) as src:
        if not _seekable(src):
            if args.offset is not None:
                raise CommandError("--offset/--length need a seekable input (a file, not a pipe)")
            with _atomic_out(args.output) as dst:
                codec.decrypt_stream(src, dst, unwrapper)
            return
        reader = codec.open_package(src, unwrapper)
        with _atomic_out(args.output) as dst:
            reader.decrypt_to(dst, args.offset or 0, args.length)


def _decrypt_url(args: argparse.Namespace, unwrapper: codec.Unwrapper) -> None:
    """A package in a repository (s3://bucket/key, file:///path): ranged reads of only the chunks needed."""
    from mediaseal.export.playback import RemotePackage
    from mediaseal.export.source import SourceError, open_source, split_url

    async def run() -> None:
        repository, key = split_url(args.input)
        source = open_source(repository)
        try:
            package = await RemotePackage.open(source, key, unwrapper)
            with _atomic_out(args.output) as dst:
                async for piece in package.iter_range(args.offset or 0, args.length):
                    dst.write(piece)
        finally:
            await source.close()

    try:
        asyncio.run(run())
    except SourceError as e:
        raise CommandError(str(e)) from None


def cmd_verify(args: argparse.Namespace) -> None:
    with _open_in(args.input) as src:
        reader = codec.open_package(src, _unwrapper(args))
        size = reader.verify()
    print(f"ok: {reader.header.metadata.recording_id}, {size} bytes, {reader.layout.chunks} chunks authenticated")


def cmd_serve(args: argparse.Namespace) -> None:
    from mediaseal.export.serve import ServeError, ServeOptions, check_options, run_server

    options = ServeOptions(
        repository=args.repository, audit_log=args.audit_log, host=args.host, port=args.port,
        tokens_file=args.tokens, tls_cert=args.tls_cert, tls_key=args.tls_key, client_ca=args.client_ca,
        s3={"endpoint_url": args.endpoint_url} if args.endpoint_url else {},
    )
    try:
        check_options(options)  # before any key is unlocked
        asyncio.run(run_server(options, _unwrapper(args)))
    except ServeError as e:
        raise CommandError(str(e)) from None


def cmd_export(args: argparse.Namespace) -> None:
    from mediaseal.export.bulk import ExportError, ExportOptions, Selection, parse_ids, run_export
    from mediaseal.export.pgp import PgpError

    ids = parse_ids(_read_file(args.ids).decode("utf-8", "replace")) if args.ids else None
    options = ExportOptions(
        source=args.source, dest=args.dest, sse=args.sse, sse_kms_key_id=args.sse_kms_key_id,
        selection=Selection(prefix=args.prefix, kinds=frozenset(args.kind or ()), since=args.since,
                            until=args.until, ids=ids),
        pgp_recipient=Path(args.pgp_recipient) if args.pgp_recipient else None,
        concurrency=args.concurrency, endpoint_url=args.endpoint_url,
    )
    if args.sse == "aws:kms" and not args.sse_kms_key_id:
        raise CommandError("--sse aws:kms needs --sse-kms-key-id")
    if args.sse_kms_key_id and args.sse != "aws:kms":
        raise CommandError("--sse-kms-key-id goes with --sse aws:kms")
    unwrapper = _unwrapper(args)

    async def run() -> typing.Any:
        try:
            return await run_export(options, unwrapper)
        finally:
            close = getattr(unwrapper, "close", None)
            if close is not None and asyncio.iscoroutinefunction(close):
                await close()

    try:
        report = asyncio.run(run())
    except (ExportError, PgpError) as e:
        raise CommandError(str(e)) from None
    for failure in report.failed:
        print(f"mediaseal: error: {failure.key}: {failure.error}", file=sys.stderr)
    print(report.summary())
    if report.failed:
        raise CommandError(f"{len(report.failed)} recording(s) failed to export (listed above)")


def cmd_lkm_serve(args: argparse.Namespace) -> None:
    from mediaseal.agent.log import setup_logging

    setup_logging(args.log_format)
    lkm_options.serve_command(args)  # keys.lkm.service: runs until SIGTERM/SIGINT


def cmd_inspect(args: argparse.Namespace) -> None:
    with _open_in(args.input) as src:
        header = codec.read_header(src)
        size = _size(src)
    layout = codec.Layout(header.size, header.chunk_size, size) if size is not None else None
    doc = {
        "format_version": 1,
        "metadata": header.metadata.__dict__,
        "chunk_size": header.chunk_size,
        "header_size": header.size,
        "package_size": size,
        "plaintext_size": layout.plaintext_size if layout else None,
        "chunks": layout.chunks if layout else None,
        "wraps": [{"kid": w.kid, "alg": w.alg} for w in header.wraps],
        "authenticated": False,  # inspect holds no key: nothing here has been checked
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    m = header.metadata
    print("mediaseal package, format version 1 (unauthenticated view: use 'verify' to check it)")
    print(f"  recording  {m.recording_id}  kind={m.kind}  type={m.content_type}")
    print(f"  original   {m.original_name or '-'}  captured {m.captured_at or '-'}  agent {m.agent_id or '-'}")
    print(f"  chunks     {doc['chunks']} x {header.chunk_size} B, "
          f"plaintext {doc['plaintext_size']} B, package {size} B")
    for w in header.wraps:
        print(f"  wrap       {w.kid}  {w.alg}")


# -- plumbing --------------------------------------------------------------------------------------


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from None


@contextlib.contextmanager
def _open_in(path: str) -> Iterator[io.BufferedReader]:
    if path == "-":
        yield typing.cast(io.BufferedReader, sys.stdin.buffer)
        return
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from None
    with f:
        yield f


@contextlib.contextmanager
def _atomic_out(path: str) -> Iterator[BinaryIO]:
    """Write to a temp file beside `path` and rename it into place only if the block succeeds.

    So a failed decryption (tampered, truncated, wrong key) leaves no output file at all.
    """
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic_out(str(path)) as f:
        f.write(data)


def _seekable(f: BinaryIO) -> bool:
    try:
        return f.seekable()
    except (AttributeError, ValueError):
        return False


def _size(f: BinaryIO) -> int | None:
    try:
        return os.fstat(f.fileno()).st_size if _seekable(f) else None
    except (OSError, ValueError):
        return None


def _kms_opts(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--kms-cache-seconds", type=argtypes.seconds, metavar="S",
                    help=f"KMS keyrings: keep a decrypted private key in memory at most S seconds"
                         f" (default {DEFAULT_CACHE_SECONDS:g})")


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mediaseal", description="Encrypt recordings into .mseal packages.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], None], help_: str,
            parent: argparse._SubParsersAction[argparse.ArgumentParser] = sub) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        return sp

    def keyring_opts(sp: argparse.ArgumentParser, required: bool = True) -> None:
        sp.add_argument("--keyring", required=required, metavar="DIR", help="keyring directory")
        sp.add_argument("--passphrase-file", type=Path, metavar="FILE",
                        help="file holding the keyring passphrase (else $MEDIASEAL_KEYRING_PASSPHRASE)")

    sp = add("run", cmd_run, "run the agent (no --config: embedded default under ./mediaseal-data/)")
    sp.add_argument("--config", type=Path, metavar="FILE", help="TOML config (default: the embedded default)")
    sp.add_argument("--log-format", choices=("text", "json"), help="overrides [agent] log_format")

    keys_p = sub.add_parser("keys", help="manage key-encryption keys (KEKs)")
    ksub = keys_p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    sp = add("init", cmd_keys_init, "create a keyring with a new RSA-3072 KEK; prints its kid", ksub)
    keyring_opts(sp)
    sp.add_argument("--alg", default=codec.RSA_OAEP_256, choices=codec.WRAP_ALGORITHMS)
    sp.add_argument("--kms-key-id", metavar="ARN|ALIAS",
                    help="seal the private keys with this AWS KMS symmetric key instead of a passphrase")
    sp = add("rotate", cmd_keys_rotate, "make a new current KEK now; the previous one becomes decrypt-only", ksub)
    keyring_opts(sp)
    sp.add_argument("--if-due", action="store_true",
                    help="only do what the schedule says is due (add a pending key, or activate one after its"
                         " grace period); prints what it did, exits 0 either way")
    sp = add("schedule", cmd_keys_schedule, "show or set the rotation schedule", ksub)
    keyring_opts(sp)
    sp.add_argument("--set", choices=tuple(kr.SCHEDULE_PERIODS), metavar="EVERY",
                    help="daily | weekly | monthly | yearly | disabled")
    sp.add_argument("--grace", type=argtypes.count, metavar="SECONDS",
                    help="how long a scheduled key stays pending before it becomes current (default: 1 day)")
    sp = add("retire", cmd_keys_retire, "retire a key (final), unless packages in the repository still need it",
             ksub)
    keyring_opts(sp)
    sp.add_argument("kid", metavar="KID")
    sp.add_argument("--repository", required=True, metavar="URL", help="file:///dir or s3://bucket/prefix")
    sp.add_argument("--force", action="store_true", help="retire even if packages still need the key")
    sp.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: the AWS chain)")
    sp = add("rewrap", cmd_keys_rewrap, "re-wrap packages from older keys to the current key (bodies untouched)",
             ksub)
    keyring_opts(sp)
    sp.add_argument("--repository", required=True, metavar="URL", help="file:///dir or s3://bucket/prefix")
    sp.add_argument("--from", dest="from_kid", metavar="KID", help="only packages wrapped to this key")
    sp.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: the AWS chain)")
    sp = add("list", cmd_keys_list, "list the keyring's keys (* marks the current one)", ksub)
    keyring_opts(sp)
    sp.add_argument("--json", action="store_true")
    sp = add("publish", cmd_keys_publish, "write the signed key set document and the signer's public key", ksub)
    keyring_opts(sp)
    sp.add_argument("-o", "--output", required=True, metavar="FILE")
    sp.add_argument("--signer-out", metavar="FILE",
                    help="where the signer's public key goes (default: signer.pem beside -o)")
    sp.add_argument("--ttl", type=int, default=30 * 86400, metavar="SECONDS", help="validity of the key set")

    sp = add("encrypt", cmd_encrypt, "encrypt a file (or - for stdin) into a .mseal package")
    sp.add_argument("input", metavar="IN")
    sp.add_argument("-o", "--output", required=True, metavar="OUT")
    sp.add_argument("--keyring", metavar="DIR", help="encrypt to the keyring's current public key")
    sp.add_argument("--keyset", metavar="FILE", help="encrypt to the current key of a signed key set")
    sp.add_argument("--signer", metavar="FILE", help="the key set signer's public key (PEM), with --keyset")
    sp.add_argument("--recording-id", metavar="ID")
    sp.add_argument("--kind", default="call", choices=codec.KINDS)
    sp.add_argument("--content-type", default="application/octet-stream")
    sp.add_argument("--agent-id", default="")
    sp.add_argument("--chunk-size", type=argtypes.chunk_size, default=codec.DEFAULT_CHUNK_SIZE)

    sp = add("decrypt", cmd_decrypt, "decrypt a package; OUT appears only if every chunk authenticated")
    sp.add_argument("input", metavar="IN",
                    help="a package file, - for stdin, or a repository URL: s3://bucket/key or file:///path"
                         " (S3 endpoint and credentials from the AWS environment, e.g. AWS_ENDPOINT_URL_S3)")
    sp.add_argument("-o", "--output", required=True, metavar="OUT", help="output file, or - for stdout")
    keyring_opts(sp, required=False)
    sp.add_argument("--offset", type=argtypes.count, metavar="N", help="first plaintext byte to decrypt")
    _kms_opts(sp)
    sp.add_argument("--length", type=argtypes.count, metavar="M", help="number of plaintext bytes to decrypt")
    lkm_options.add_client_arguments(sp)

    sp = add("verify", cmd_verify, "authenticate a whole package, writing nothing")
    sp.add_argument("input", metavar="IN")
    keyring_opts(sp, required=False)
    _kms_opts(sp)
    lkm_options.add_client_arguments(sp)

    sp = add("serve", cmd_serve, "serve decrypted recordings over HTTP(S) with Range seeking (authenticated, audited)")
    sp.add_argument("repository", metavar="REPOSITORY", help="file:///dir or s3://bucket/prefix")
    sp.add_argument("--audit-log", required=True, type=Path, metavar="FILE",
                    help="one JSON line per request is appended here (created 0600)")
    sp.add_argument("--tokens", type=Path, metavar="FILE",
                    help="bearer tokens, one per line (name:token or token), file mode 0600")
    sp.add_argument("--tls-cert", type=Path, metavar="FILE")
    sp.add_argument("--tls-key", type=Path, metavar="FILE")
    sp.add_argument("--client-ca", type=Path, metavar="FILE", help="require client certificates from this CA (mTLS)")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sp.add_argument("--port", type=int, default=8750)
    sp.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: the AWS chain)")
    keyring_opts(sp, required=False)
    _kms_opts(sp)
    lkm_options.add_client_arguments(sp)

    sp = add("export", cmd_export, "bulk export: decrypt recordings (optionally OpenPGP-encrypt them) into a bucket")
    sp.add_argument("--source", required=True, metavar="URL", help="the repository: s3://bucket/prefix or file:///dir")
    sp.add_argument("--dest", required=True, metavar="URL", help="s3://bucket/prefix to write to")
    sp.add_argument("--prefix", default="", metavar="P", help="only keys under this prefix of the repository")
    sp.add_argument("--kind", action="append", choices=codec.KINDS, help="only this kind (repeatable)")
    sp.add_argument("--since", type=_date, metavar="YYYY-MM-DD", help="only recordings of this day or later")
    sp.add_argument("--until", type=_date, metavar="YYYY-MM-DD", help="only recordings of this day or earlier")
    sp.add_argument("--ids", metavar="FILE", help="only these recording ids (one per line)")
    sp.add_argument("--pgp-recipient", metavar="CERT", help="encrypt each recording to this OpenPGP certificate")
    sp.add_argument("--sse", choices=("AES256", "aws:kms"), help="server-side encryption of the exported objects")
    sp.add_argument("--sse-kms-key-id", metavar="ID", help="the KMS key for --sse aws:kms")
    sp.add_argument("--concurrency", type=argtypes.positive, default=4, metavar="N",
                    help="recordings in flight (default 4)")
    sp.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint for both buckets (default: the AWS chain)")
    keyring_opts(sp, required=False)
    _kms_opts(sp)
    lkm_options.add_client_arguments(sp)

    lkm_p = sub.add_parser("lkm", help="the Local Key Manager: a key service whose private keys never leave it")
    lsub = lkm_p.add_subparsers(dest="lkm_command", required=True, metavar="ACTION")
    lkm_options.add_serve_arguments(add("serve", cmd_lkm_serve, "run the Local Key Manager HTTPS service", lsub))
    lkm_options.add_audit_verify_arguments(add("audit-verify", lkm_options.audit_verify_command,
                                               "check an LKM audit log's hash chain (exit 1: first bad line)", lsub))

    sp = add("inspect", cmd_inspect, "show a package's header (no keys needed; nothing is authenticated)")
    sp.add_argument("input", metavar="IN")
    sp.add_argument("--json", action="store_true")

    from mediaseal.agent.status import add_parser as add_status  # the spool's state from its manifests

    add_status(sub)
    from mediaseal.agent.bench import add_parser as add_bench  # throughput on this host vs a plain copy

    add_bench(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CommandError, codec.CodecError, KeysError) as e:
        print(f"mediaseal: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
