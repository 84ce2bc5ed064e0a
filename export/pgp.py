"""OpenPGP encryption for export, streamed through GnuPG (`gpg`), which every auditor can decrypt.

>>> recipient = await PgpRecipient.load(Path("auditor.asc"))    # validated, with a test encryption
>>> recipient.fingerprint
>>> async with recipient.encryptor() as enc:                    # one gpg process per recording
...     ...  # write plaintext with `await enc.write(b)`, read ciphertext with `await enc.read()`

Why gpg and not a library: pysequoia 0.1.35 only streams through file paths and holds the GIL
while it does (a writer thread feeding it through a pipe deadlocks), and python-gnupg collects the
output in memory or in a file. `gpg --encrypt` between two pipes is a true stream with bounded
memory, and its output is what GnuPG 2.2 reads: a public-key encrypted session key and a SEIPD v1
packet with MDC. The test encryption at start-up refuses anything else (an AEAD/OCB or SEIPD v2
packet, which a GnuPG 2.2 recipient could not decrypt).

The certificate is checked when loaded: exactly one, not revoked, not expired, with a usable
encryption (sub)key. gpg runs with its own empty home directory holding nothing secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

GPG = "gpg"
_BASE_ARGS = ("--batch", "--no-tty", "--no-options", "--quiet", "--no-auto-key-locate", "--no-auto-key-retrieve")


class PgpError(Exception):
    """The recipient certificate is unusable, or gpg failed."""


@dataclass(frozen=True)
class PgpRecipient:
    cert: Path
    fingerprint: str
    user_id: str
    homedir: Path
    gpg: str = GPG

    @classmethod
    async def load(cls, cert: Path, *, gpg: str | None = None) -> PgpRecipient:
        exe = gpg or shutil.which(GPG)
        if exe is None:
            raise PgpError("gpg is not installed (needed for --pgp-recipient)")
        if not cert.is_file():
            raise PgpError(f"cannot read PGP certificate {cert}")
        home = Path(tempfile.mkdtemp(prefix="mediaseal-gpg-"))
        try:
            rc, out, err = await _run(exe, "--homedir", str(home), "--with-colons", "--fixed-list-mode",
                                      "--show-keys", str(cert))
            if rc != 0:
                raise PgpError(f"{cert} is not an OpenPGP certificate: {_last_line(err)}")
            fpr, uid = _check_colons(cert, out.decode("utf-8", "replace"))
            me = cls(cert.resolve(), fpr, uid, home, exe)
            await me._test_encryption()
        except BaseException:
            shutil.rmtree(home, ignore_errors=True)
            raise
        return me

    def close(self) -> None:
        shutil.rmtree(self.homedir, ignore_errors=True)

    def encrypt_args(self) -> list[str]:
        return [self.gpg, "--homedir", str(self.homedir), *_BASE_ARGS, "--trust-model", "always",
                "--compress-algo", "none", "--recipient-file", str(self.cert), "--output", "-", "--encrypt"]

    async def _test_encryption(self) -> None:
        async with self.encryptor() as enc:
            async def feed() -> None:
                await enc.write(b"mediaseal export: test encryption\n")
                await enc.close_input()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(feed())
                chunks = [c async for c in enc.output(1 << 16)]
        message = b"".join(chunks)
        _rc, out, err = await _run(self.gpg, "--homedir", str(self.homedir), *_BASE_ARGS, "--list-packets",
                                  stdin=message)
        text = out.decode("utf-8", "replace")
        # Without the secret key gpg exits non-zero ("decryption failed: No secret key"); the packets are listed.
        if ":pubkey enc packet:" not in text:
            raise PgpError(f"test encryption to {self.fingerprint} produced no public-key packet: {_last_line(err)}")
        if ":aead encrypted packet:" in text or ":encrypted data packet:" not in text or "mdc_method: 2" not in text:
            raise PgpError(f"test encryption to {self.fingerprint} did not produce a SEIPD v1 (MDC) packet, "
                           "which GnuPG 2.2 needs; this gpg or certificate asks for AEAD")

    @contextlib.asynccontextmanager
    async def encryptor(self) -> AsyncIterator[GpgStream]:
        proc = await asyncio.create_subprocess_exec(
            *self.encrypt_args(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        stream = GpgStream(proc)
        try:
            yield stream
        except BaseException:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            raise
        await stream.finish()


class GpgStream:
    """One `gpg --encrypt` process: plaintext in through stdin, ciphertext out of stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._stdin, self._stdout = proc.stdin, proc.stdout
        self._stderr_task = asyncio.ensure_future(proc.stderr.read(64 * 1024))

    async def write(self, data: bytes | memoryview) -> None:
        try:
            self._stdin.write(data)
            await self._stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise PgpError(f"gpg stopped reading: {await self._stderr()}") from None

    async def close_input(self) -> None:
        self._stdin.close()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await self._stdin.wait_closed()

    async def output(self, block: int) -> AsyncIterator[bytes]:
        while True:
            data = await self._stdout.read(block)
            if not data:
                return
            yield data

    async def _stderr(self) -> str:
        return _last_line(await self._stderr_task)

    async def finish(self) -> None:
        rc = await self._proc.wait()
        err = await self._stderr()
        if rc != 0:
            raise PgpError(f"gpg --encrypt failed (exit {rc}): {err}")


def _check_colons(cert: Path, listing: str) -> tuple[str, str]:
    rows = [line.split(":") for line in listing.splitlines() if line]
    pubs = [r for r in rows if r[0] == "pub"]
    if len(pubs) != 1:
        raise PgpError(f"{cert} must hold exactly one certificate, not {len(pubs)}")
    pub = pubs[0]
    fpr = next((r[9] for r in rows if r[0] == "fpr"), "")
    uid = next((r[9] for r in rows if r[0] == "uid" and r[1] not in ("r", "e")), "")
    if pub[1] == "r":
        raise PgpError(f"PGP certificate {fpr} is revoked")
    if pub[1] == "e":
        raise PgpError(f"PGP certificate {fpr} has expired")
    if len(pub) <= 11 or "E" not in pub[11]:
        raise PgpError(f"PGP certificate {fpr} has no usable encryption subkey (revoked, expired or none)")
    return fpr.lower(), uid


def _last_line(err: bytes) -> str:
    lines = [x for x in err.decode("utf-8", "replace").splitlines() if x.strip()]
    return lines[-1].strip() if lines else "no message"


async def _run(*argv: str, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(stdin)
    return proc.returncode or 0, out, err
