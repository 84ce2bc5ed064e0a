"""Recorders as they really write, each run as its own child process (`python tests/producers.py RECIPE ...`).

>>> p = start("mixmonitor", capture / "call-1.wav", hook="marker")   # a real child process
>>> p.wait_done()                                                    # -> SHA-256 of the file as closed

Each recipe reproduces one recorder's write pattern, pauses included, because the pauses are what cut
recordings short: a writer holding its file open and silent looks finished to any judgement by time.
- mixmonitor: Asterisk MixMonitor. Writes the final name in place, continuously (20 ms frames, here
  in 32 KiB bursts), holds it open through a hold pause, patches the WAV header at close; then the
  `command` hook runs: `marker` touches `<file>.done`, `rename` moves it from a dot-directory
  inside the watch to its final name. `--sidecar`: before the hook, a SIPREC-style `<stem>.xml` metadata
  file is written in place beside it (in two pieces, a pause between).
- freeswitch: `record_session` in place (a pause for PCI secure mode), then `record_post_process_exec_api`
  runs `system:mv` from a staging directory outside the watch into it (`rename`) or nothing (`close`).
- rtpengine-pcap: rtpengine's pcap mode: `pcaps/<call>.pcap` written in place, and at the end of the call
  the metadata file, written as `metadata/.<call>.txt.tmp`, renamed to `metadata/<call>.txt`.
- rtpengine-wav: rtpengine-recording's WAV output: buffered, so bursts of 64 KiB with gaps, header at close.
- obs: OBS-style fragmented MP4: ftyp/moov up front, fragments, a pause (the pause button), fragments,
  and at close the moov box is rewritten in place with the final duration.
- paused: the issue's observations: N pieces of `--size` bytes written in place, `--pause` seconds
  apart, the file open throughout.
- ffmpeg (not here: a real ffmpeg, see tests/test_producers.py) writing a WAV from a stalling stdin.

The child prints the SHA-256 of the file's final content on stdout when done (after any hook); a
package must decrypt to exactly that. `--pause` sets the longest pause (seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RECIPES = ("paused", "mixmonitor", "freeswitch", "rtpengine-pcap", "rtpengine-wav", "obs")


def wav_header(data_size: int, rate: int = 8000) -> bytes:
    return (b"RIFF" + struct.pack("<I", 36 + data_size) + b"WAVE" + b"fmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", data_size))


def _noise(n: int, seed: int) -> bytes:
    out, block = bytearray(), hashlib.sha256(seed.to_bytes(8, "big")).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


class _File:
    """The file being recorded and an exact model of its bytes (so the final SHA-256 is known)."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "wb", buffering=0)  # noqa: SIM115 - held open across pauses on purpose
        self.model = bytearray()

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.model += data

    def patch(self, offset: int, data: bytes) -> None:
        self.f.seek(offset)
        self.f.write(data)
        self.f.seek(0, os.SEEK_END)
        self.model[offset:offset + len(data)] = data

    def close(self) -> str:
        os.fsync(self.f.fileno())
        self.f.close()
        return hashlib.sha256(self.model).hexdigest()


def paused(path: Path, pieces: int, size: int, pause: float) -> str:
    f = _File(path)
    for i in range(pieces):
        if i:
            time.sleep(pause)
        f.write(_noise(size, 500 + i))
    return f.close()


def sidecar_text(recording: Path) -> bytes:
    """The metadata `--sidecar` writes as `<stem>.xml` beside `recording` (a test computes its digest)."""
    return (f'<?xml version="1.0"?>\n<recording xmlns="urn:ietf:params:xml:ns:recording:1">'
            f'<session>{recording.stem}</session><participant>+15550100</participant></recording>\n').encode()


def write_sidecar(recording: Path, pause: float) -> None:
    """A recorder's metadata file, written in place in two pieces with a pause, after the recording closed."""
    text = sidecar_text(recording)
    with open(recording.with_name(recording.stem + ".xml"), "wb") as f:
        f.write(text[:40])
        f.flush()
        time.sleep(min(pause, 1.0))
        f.write(text[40:])


def mixmonitor(path: Path, hook: str, pause: float, sidecar: bool = False) -> str:
    target = path
    if hook == "rename":
        path = path.parent / ".mixmonitor" / path.name  # records in a dot-directory the watch ignores
        path.parent.mkdir(exist_ok=True)
    f = _File(path)
    f.write(wav_header(0))
    for i in range(24):  # ~0.75 MiB of audio in 32 KiB bursts, a hold pause in the middle
        f.write(_noise(32 * 1024, i))
        time.sleep(pause if i == 11 else 0.02)
    f.patch(0, wav_header(len(f.model) - 44))
    digest = f.close()
    if sidecar:
        write_sidecar(target, pause)
    if hook == "marker":
        (target.parent / (target.name + ".done")).touch()
    elif hook == "rename":
        os.rename(path, target)
    return digest


def freeswitch(path: Path, hook: str, pause: float, staging: Path | None) -> str:
    record = (staging / path.name) if hook == "rename" and staging is not None else path
    f = _File(record)
    f.write(wav_header(0))
    for i in range(10):
        f.write(_noise(48 * 1024, 100 + i))
        time.sleep(pause if i == 4 else 0.02)  # PCI secure pause: the file stays open, silent
    f.patch(0, wav_header(len(f.model) - 44))
    digest = f.close()
    if record != path:
        os.rename(record, path)  # record_post_process_exec_api=system:mv ...
    return digest


def rtpengine_pcap(path: Path, pause: float) -> str:
    # path: .../pcaps/<call>.pcap; metadata goes to .../metadata/<call>.txt when the call ends
    f = _File(path)
    f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    for i in range(40):
        pkt = _noise(172, 200 + i)
        f.write(struct.pack("<IIII", 1_700_000_000 + i, 0, len(pkt), len(pkt)) + pkt)
        if i % 10 == 9:
            time.sleep(pause)  # silence suppression / hold: nothing to write
    digest = f.close()
    meta = path.parent.parent / "metadata"
    meta.mkdir(exist_ok=True)
    tmp = meta / f".{path.stem}.txt.tmp"
    tmp.write_text(f"call-id: {path.stem}\nparties: 2\n")
    os.rename(tmp, meta / f"{path.stem}.txt")
    return digest


def rtpengine_wav(path: Path, pause: float) -> str:
    f = _File(path)
    f.write(wav_header(0))
    for i in range(8):  # output buffered: bursts of 64 KiB, silence in between
        f.write(_noise(64 * 1024, 300 + i))
        time.sleep(pause if i in (2, 5) else 0.3)
    f.patch(0, wav_header(len(f.model) - 44))
    return f.close()


def obs(path: Path, pause: float) -> str:
    f = _File(path)
    f.write(struct.pack(">I4s4sI", 16, b"ftyp", b"isom", 512))
    moov_at = len(f.model)
    f.write(struct.pack(">I4sI", 12, b"moov", 0))  # duration 0 until the recording stops
    for i in range(12):
        frag = _noise(40 * 1024, 400 + i)
        f.write(struct.pack(">I4s", 8 + len(frag), b"moof") + frag)
        time.sleep(pause if i == 5 else 0.05)  # the pause button: file open, nothing written
    f.patch(moov_at, struct.pack(">I4sI", 12, b"moov", 12))  # rewritten in place at stop
    return f.close()


@dataclass
class Producer:
    """A running recipe (a child process) and where it writes."""

    proc: subprocess.Popen[bytes]
    path: Path

    def wait_done(self, timeout: float = 120.0) -> str:
        out, err = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise AssertionError(f"producer {self.path} failed ({self.proc.returncode}): {err.decode()}")
        return out.decode().strip()


def start(recipe: str, path: Path, *, hook: str = "none", pause: float = 3.0, staging: Path | None = None,
          pieces: int = 2, size: int = 1 << 20, sidecar: bool = False) -> Producer:
    """Run `recipe` as a child process writing `path`."""
    args = [sys.executable, __file__, recipe, str(path), "--hook", hook, "--pause", str(pause),
            "--pieces", str(pieces), "--size", str(size)] + (["--sidecar"] if sidecar else [])
    if staging is not None:
        args += ["--staging", str(staging)]
    return Producer(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE), path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", choices=RECIPES)
    ap.add_argument("path", type=Path)
    ap.add_argument("--hook", choices=("none", "marker", "rename"), default="none")
    ap.add_argument("--pause", type=float, default=3.0)
    ap.add_argument("--staging", type=Path)
    ap.add_argument("--pieces", type=int, default=2)
    ap.add_argument("--size", type=int, default=1 << 20)
    ap.add_argument("--sidecar", action="store_true", help="mixmonitor: write <stem>.xml after close")
    a = ap.parse_args()
    if a.recipe == "paused":
        digest = paused(a.path, a.pieces, a.size, a.pause)
    elif a.recipe == "mixmonitor":
        digest = mixmonitor(a.path, a.hook, a.pause, a.sidecar)
    elif a.recipe == "freeswitch":
        digest = freeswitch(a.path, a.hook, a.pause, a.staging)
    elif a.recipe == "rtpengine-pcap":
        digest = rtpengine_pcap(a.path, a.pause / 3)
    elif a.recipe == "rtpengine-wav":
        digest = rtpengine_wav(a.path, a.pause)
    else:
        digest = obs(a.path, a.pause)
    print(digest, flush=True)


if __name__ == "__main__":
    main()
