"""Hostile bytes at the codec's readers: only CodecError subclasses come out, in bounded time
(hypothesis deadline) and bounded memory (tracemalloc peak per example)."""

from __future__ import annotations

import contextlib
import io
import random
import secrets
import signal
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import independent_decoder as spec
import pytest
import reliability_support
from conftest import CodecTestKeyring
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import sized

from mediaseal import codec

CS = 256
MAX_PEAK = 4 << 20  # bytes: a reader holds a header and a few chunks, never what a length field claims
FUZZ = settings(max_examples=500, deadline=1000)


@contextmanager
def bounded_memory(limit: int = MAX_PEAK) -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak allocation {peak} bytes"


@pytest.fixture(scope="module")
def valid(codec_kek, codec_kek2, codec_keyring):
    """A valid 3-chunk package with two wraps, and a keyring for its first KEK."""
    header, keys = codec.new_package(
        codec.Metadata("fuzz-1", "digital", "video/mp4", "f.mp4", "2026-01-01T00:00:00Z", "agent"),
        [
            codec.Recipient(codec_kek.kid, codec_kek.public_key),
            codec.Recipient(codec_kek2.kid, codec_kek2.public_key, codec.RSA_OAEP),
        ],
        CS,
    )
    out = io.BytesIO()
    codec.seal(io.BytesIO(secrets.token_bytes(2 * CS + 77)), out, header, keys)
    return out.getvalue(), header, codec_keyring(codec_kek)


def only_codec_errors(fn: Callable[[], object]) -> None:
    with contextlib.suppress(codec.CodecError):  # anything else propagates and fails the test
        fn()


def read_all(package: bytes, keyring) -> None:
    """Every reading path over the same bytes."""
    only_codec_errors(lambda: codec.parse_header(package))
    only_codec_errors(lambda: codec.read_header(io.BytesIO(package)))
    only_codec_errors(lambda: codec.open_package(io.BytesIO(package), keyring).verify())
    only_codec_errors(lambda: codec.open_package(io.BytesIO(package), keyring).decrypt_to(io.BytesIO(), 100, 300))
    only_codec_errors(lambda: codec.decrypt_stream(io.BytesIO(package), io.BytesIO(), keyring))


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(valid, data):
    _, _, keyring = valid
    with bounded_memory():
        read_all(data, keyring)


@FUZZ
@given(
    log2=st.integers(0, 255),
    reserved=st.sampled_from([0, 0, 0, 1, 255]),
    core_len=st.one_of(st.integers(0, 0xFFFF), st.integers(0, 300)),
    rest=st.binary(max_size=3000),
)
def test_random_bytes_behind_a_plausible_prefix(valid, log2, reserved, core_len, rest):
    _, _, keyring = valid
    data = struct.pack(">5sBBBH", b"MSEAL", 1, log2, reserved, core_len) + rest
    with bounded_memory():
        read_all(data, keyring)


def _mutate(package: bytes, header: codec.Header, draw) -> bytes:
    """One structured mutation of a valid package, mostly aimed at the header."""
    data = bytearray(package)
    L = len(header.core)
    fields = {  # offset, size of each length/count field
        "log2_chunk": (6, 1),
        "core_len": (8, 2),
        "wraps_len": (106 + L, 2),
        "count": (108 + L, 1),
        "kid_len": (109 + L, 1),
    }
    kind = draw(st.sampled_from(["flip", "field", "splice", "truncate", "insert", "delete", "core"]))
    if kind == "flip":
        for pos in draw(st.lists(st.integers(0, header.size + 40), min_size=1, max_size=8)):
            data[pos % len(data)] ^= draw(st.integers(1, 255))
    elif kind == "field":
        off, size = fields[draw(st.sampled_from(sorted(fields)))]
        data[off : off + size] = draw(st.integers(0, (1 << (8 * size)) - 1)).to_bytes(size, "big")
    elif kind == "splice":
        at = draw(st.integers(0, header.size))
        data[at : at + draw(st.integers(0, 64))] = draw(st.binary(max_size=64))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data))) :]
    elif kind == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=32))
    elif kind == "delete":
        at = draw(st.integers(0, len(data) - 1))
        del data[at : at + draw(st.integers(1, 32))]
    else:  # replace the core with other JSON-ish text of the same length (keeps every offset)
        text = draw(
            st.sampled_from(
                [
                    b'{"recording_id":1}',
                    b"[]",
                    b'"x"',
                    b"{}",
                    b'{"a":[[[[[[[[[[]]]]]]]]]]}',
                    b"1e999999",
                    b'{"recording_id":"\\ud800"}',
                    b"\xff\xfe",
                    b"\xef\xbb\xbf{}",
                    b"9" * 5000,
                    b"[" * 5000,
                ]
            )
        )
        data[42 : 42 + L] = (text * (L // len(text) + 1))[:L]
    return bytes(data)


@FUZZ
@given(st.data())
def test_mutated_valid_packages(valid, data):
    package, header, keyring = valid
    bad = _mutate(package, header, data.draw)
    with bounded_memory():
        read_all(bad, keyring)
        with contextlib.suppress(spec.CodecError):  # the decoder written from docs/FORMAT.md, likewise
            spec.decrypt(bad, keyring.keys)


def test_a_hostile_chunk_size_allocates_nothing_before_the_header_check(valid):
    """log2_chunk = 24 (16 MiB chunks) in an otherwise valid package: rejected by the header check,
    before any chunk buffer exists."""
    package, _, keyring = valid
    bad = bytearray(package)
    bad[6] = 24
    with bounded_memory(1 << 20):
        with pytest.raises(codec.AuthenticationError):
            codec.open_package(io.BytesIO(bytes(bad)), keyring)
        with pytest.raises(codec.AuthenticationError):
            codec.decrypt_stream(io.BytesIO(bytes(bad)), io.BytesIO(), keyring)


def test_largest_header_is_bounded(valid):
    """Headers near the bounds parse within the memory bound; one byte more in a length is refused."""
    _, header, _ = valid
    wraps = tuple(codec.Wrap("k" * 64, "X" * 32, b"\x01" * 1024) for _ in range(16))
    with pytest.raises(codec.MalformedPackageError):
        header.with_wraps(wraps)  # 1 + 16 * 1124 bytes > the 16 KiB wraps block
    big_core = (
        b'{"agent_id":"' + b"a" * 4096 + b'","captured_at":"","content_type":"","kind":"call",'
        b'"original_name":"","recording_id":"r"}'
    )
    prefix = struct.pack(">5sBBBH", b"MSEAL", 1, 8, 0, len(big_core))
    block = bytes([1, 1]) + b"k" + bytes([1]) + b"A" + struct.pack(">H", 1024) + b"\x00" * 1024
    data = prefix + bytes(32) + big_core + bytes(64) + struct.pack(">H", len(block)) + block
    with bounded_memory():
        h = codec.parse_header(data)
    assert h.size == len(data)
    assert h.metadata.agent_id == "a" * 4096
    over = data[:8] + struct.pack(">H", 16385) + data[10:]
    with pytest.raises(codec.MalformedPackageError):
        codec.parse_header(over)


@pytest.mark.parametrize("core", [b"[" * 16384, b'{"a":' * 3276 + b"1", b"[" * 1100 + b"]" * 1100])
def test_deeply_nested_metadata_is_malformed(core):
    """JSON nesting deep enough to exhaust the parser's recursion limit is a MalformedPackageError."""
    wraps = bytes([1, 1]) + b"k" + bytes([1]) + b"A" + b"\x00\x01\x00"
    data = struct.pack(">5sBBBH", b"MSEAL", 1, 8, 0, len(core)) + bytes(32) + core + bytes(64)
    data += struct.pack(">H", len(wraps)) + wraps
    with pytest.raises(codec.MalformedPackageError, match="metadata"):
        codec.parse_header(data)


# -- figures (issue 9): the same readers under a counted budget, into docs/RELIABILITY.md -----------------------
#
# Each target below runs `sized(bounded, soak)` hypothesis examples (about 20 s for all three in `make
# test`; MEDIASEAL_SOAK=1 runs 40x more) and records into reliability_support.hostile(): every input
# run, the slowest one, and the distinct failures. A failure is anything but a named codec error: another
# exception, an input that takes longer than HANG_SECONDS (a SIGALRM interrupts it), an allocation peak
# above MEMORY_BOUND (tracemalloc, measured per input), or a package that decrypts to bytes that are not
# the original's (a mutation that got through authentication). A failure is recorded, then re-raised so
# hypothesis shrinks and reports it; the test then fails on the recorded set being non-empty.

HANG_SECONDS = 5.0
MEMORY_BOUND = 4 << 20  # bytes allocated at the peak of one input: a reader holds a header and two chunks


class Hang(Exception):
    """An input ran past HANG_SECONDS (raised from the SIGALRM handler)."""


def _signature(what: str, e: BaseException) -> str:
    """`what: ExceptionType at file:line`, the innermost frame in our own code (codec/, tests/)."""
    where = "?"
    tb = e.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if "/site-packages/" not in name and "/lib/python" not in name:
            parts = name.split("/")
            where = f"{'/'.join(parts[-2:])}:{tb.tb_lineno}"
        tb = tb.tb_next
    return f"{what}: {type(e).__name__} at {where}"


class Guarded:
    """Runs inputs against one hostile() row: counts, times, measures and classifies each one."""

    def __init__(self, row: reliability_support.Hostile, hang_seconds: float = HANG_SECONDS) -> None:
        self.row, self.hang_seconds = row, hang_seconds

    @contextmanager
    def session(self) -> Iterator[Guarded]:
        def alarm(signum: int, frame: object) -> None:
            raise Hang(f"input ran past {self.hang_seconds:g} s")

        # SIGALRM may be pytest-timeout's: its handler and remaining time are put back afterwards.
        previous = signal.signal(signal.SIGALRM, alarm)
        remaining, _ = signal.setitimer(signal.ITIMER_REAL, 0)
        t0 = time.monotonic()
        try:
            yield self
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if remaining:
                signal.setitimer(signal.ITIMER_REAL, max(0.001, remaining - (time.monotonic() - t0)))
        assert not self.row.failures, f"{self.row.target}: {sorted(self.row.failures)}"

    def run(self, what: str, fn: Callable[[], object]) -> object | None:
        """fn() -> its result, or None when it raised a codec error; anything else is a recorded failure."""
        self.row.executions += 1
        tracemalloc.start()  # per input, not across hypothesis's own generation (tracing slows it 10-fold)
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, self.hang_seconds)
        result: object | None = None
        try:
            result = fn()
        except codec.CodecError:
            result = None
        except Hang as e:
            self.row.failures.add(f"{what}: hang (> {self.hang_seconds:g} s)")
            raise AssertionError(str(e)) from None
        except Exception as e:
            self.row.failures.add(_signature(what, e))
            raise
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.row.slowest = max(self.row.slowest, time.perf_counter() - t0)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        if peak > MEMORY_BOUND:
            self.row.failures.add(f"{what}: allocation over {MEMORY_BOUND >> 20} MiB")
            raise AssertionError(f"{what}: peak allocation {peak} bytes")
        return result

    def fail(self, signature: str) -> None:
        self.row.failures.add(signature)
        raise AssertionError(signature)


class CachingUnwrapper:
    """The real RSA keyring, remembering each distinct set of wraps' outcome (DEK or codec error), so the
    budget goes to the parser and the decryptor, not to re-running the same RSA decryption."""

    def __init__(self, inner: CodecTestKeyring) -> None:
        self.inner = inner
        self.cache: dict[tuple[tuple[str, str, bytes], ...], bytes | tuple[type[codec.CodecError], str]] = {}

    def unwrap(self, wraps: Sequence[codec.Wrap]) -> bytes:
        key = tuple((w.kid, w.alg, w.wrapped) for w in wraps)
        hit = self.cache.get(key)
        if hit is None:
            try:
                hit = self.inner.unwrap(wraps)
            except codec.CodecError as e:  # anything else is not cached: it propagates, a failure
                hit = (type(e), str(e))
            if len(self.cache) < 4096:
                self.cache[key] = hit
        if isinstance(hit, tuple):
            raise hit[0](hit[1])
        return hit


@dataclass(frozen=True)
class Valid:
    package: bytes
    header: codec.Header
    plaintext: bytes


@pytest.fixture(scope="module")
def corpus(codec_kek, codec_kek2, codec_keyring) -> tuple[list[Valid], CachingUnwrapper]:
    """Valid packages of several shapes (chunk sizes 256 and 1 KiB; empty, one byte, exact and ragged
    chunk multiples; one wrap or two), and an unwrapper for codec_kek."""
    rng = random.Random(91)
    out = []
    shapes = [(256, 0, 1), (256, 1, 1), (256, 256, 2), (256, 3 * 256 + 77, 2), (1024, 4 * 1024, 1),
              (1024, 2 * 1024 + 1, 2)]
    for cs, size, n_wraps in shapes:
        recipients = [codec.Recipient(codec_kek.kid, codec_kek.public_key)]
        if n_wraps == 2:
            recipients.append(codec.Recipient(codec_kek2.kid, codec_kek2.public_key, codec.RSA_OAEP))
        meta = codec.Metadata(f"fz-{cs}-{size}", "call", "audio/wav", "a.wav", "2026-01-01T00:00:00Z", "agent")
        header, keys = codec.new_package(meta, recipients, cs)
        plaintext = rng.randbytes(size)
        buf = io.BytesIO()
        codec.seal(io.BytesIO(plaintext), buf, header, keys)
        out.append(Valid(buf.getvalue(), header, plaintext))
    return out, CachingUnwrapper(codec_keyring(codec_kek))


def _mutate_body(v: Valid, draw) -> bytes:
    """One mutation anywhere in a valid package, body included: flips, chunk swaps and copies, cuts and
    extensions at chunk boundaries, and the header-aimed ones of _mutate."""
    data = bytearray(v.package)
    hs, st_ = v.header.size, codec.stride(v.header.chunk_size)
    chunks = max(1, -(-(len(data) - hs) // st_))
    kind = draw(st.sampled_from(["header", "flip", "swap", "copy", "cut", "extend", "tail"]))
    if kind == "header":
        return _mutate(v.package, v.header, draw)
    if kind == "flip":
        for pos in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=4)):
            data[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind in ("swap", "copy") and chunks > 1:
        i, j = draw(st.integers(0, chunks - 2)), draw(st.integers(0, chunks - 2))
        a, b = data[hs + i * st_: hs + (i + 1) * st_], data[hs + j * st_: hs + (j + 1) * st_]
        data[hs + j * st_: hs + (j + 1) * st_] = a
        if kind == "swap":
            data[hs + i * st_: hs + (i + 1) * st_] = b
    elif kind == "cut":
        del data[hs + draw(st.integers(0, chunks)) * st_ + draw(st.sampled_from([0, 0, 1, codec.TAG_SIZE])):]
    elif kind == "extend":
        data += draw(st.one_of(st.binary(min_size=1, max_size=64), st.just(bytes(data[hs:hs + st_]))))
    else:  # the final chunk's tag, or the last byte of the package
        data[-1 - draw(st.integers(0, codec.TAG_SIZE - 1))] ^= 0x80
    return bytes(data)


def _check_plaintext(g: Guarded, what: str, got: bytes | None, want: bytes) -> None:
    if got is not None and got != want:
        g.fail(f"{what}: a mutated package decrypted to other bytes")


@pytest.mark.timeout(1800 if reliability_support.SOAK else 300)
def test_figures_header_parser(corpus) -> None:
    """Header parser (parse_header, read_header over a short-reading stream) on random bytes, on random
    bytes behind a plausible prefix, and on mutated valid headers."""
    valid, _ = corpus
    g = Guarded(reliability_support.hostile(
        "codec: header parser", "hypothesis: random, prefixed and mutated headers; tracemalloc per input"))

    class Dribble(io.BytesIO):  # a pipe: short reads
        def read(self, n: int | None = -1, /) -> bytes:
            return super().read(1 if n is None or n < 0 else min(n, 7))

    @settings(max_examples=sized(2000, 80_000), deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(data=st.data())
    def run(data) -> None:
        kind = data.draw(st.sampled_from(["random", "prefixed", "mutated"]))
        if kind == "random":
            blob = data.draw(st.binary(max_size=2048))
        elif kind == "prefixed":
            blob = struct.pack(">5sBBBH", b"MSEAL", 1, data.draw(st.integers(0, 255)),
                               data.draw(st.sampled_from([0, 0, 1])), data.draw(st.integers(0, 0xFFFF)))
            blob += data.draw(st.binary(max_size=2048))
        else:
            v = data.draw(st.sampled_from(valid))
            blob = _mutate(v.package, v.header, data.draw)
        g.run(f"parse_header {kind}", lambda: codec.parse_header(blob))
        g.run(f"read_header {kind} (short reads)", lambda: codec.read_header(Dribble(blob)))

    with g.session():
        run()


@pytest.mark.timeout(1800 if reliability_support.SOAK else 300)
def test_figures_full_decrypt(corpus) -> None:
    """Whole-package decryption (decrypt_stream, and open_package + verify/decrypt_to) of mutated valid
    packages: only codec errors, and whatever decrypts is the original plaintext."""
    valid, unwrapper = corpus
    g = Guarded(reliability_support.hostile(
        "codec: full decrypt of mutated packages",
        "hypothesis: header and body mutations of 6 valid packages; tracemalloc per input"))

    def stream(bad: bytes) -> bytes:
        out = io.BytesIO()
        codec.decrypt_stream(io.BytesIO(bad), out, unwrapper)
        return out.getvalue()

    def seekable(bad: bytes) -> bytes:
        out = io.BytesIO()
        reader = codec.open_package(io.BytesIO(bad), unwrapper)
        reader.verify()
        reader.decrypt_to(out)
        return out.getvalue()

    @settings(max_examples=sized(1500, 60_000), deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(data=st.data())
    def run(data) -> None:
        v = data.draw(st.sampled_from(valid))
        bad = _mutate_body(v, data.draw)
        _check_plaintext(g, "decrypt_stream", g.run("decrypt_stream", lambda: stream(bad)), v.plaintext)
        _check_plaintext(g, "open_package", g.run("open_package+decrypt_to", lambda: seekable(bad)), v.plaintext)

    with g.session():
        run()


@pytest.mark.timeout(1800 if reliability_support.SOAK else 300)
def test_figures_range_decrypt(corpus) -> None:
    """Ranged decryption (PackageReader seeks: decrypt_to / iter_range at an offset) of mutated packages,
    at offsets inside, at the edges of and past the plaintext."""
    valid, unwrapper = corpus
    g = Guarded(reliability_support.hostile(
        "codec: range decrypt of mutated packages",
        "hypothesis: mutated packages, random offsets and lengths; tracemalloc per input"))

    def ranged(bad: bytes, offset: int, length: int | None, pieces: bool) -> bytes:
        reader = codec.open_package(io.BytesIO(bad), unwrapper)
        if pieces:
            return b"".join(reader.iter_range(offset, length))
        out = io.BytesIO()
        reader.decrypt_to(out, offset, length)
        return out.getvalue()

    @settings(max_examples=sized(1500, 60_000), deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(data=st.data())
    def run(data) -> None:
        v = data.draw(st.sampled_from(valid))
        bad = _mutate_body(v, data.draw)
        n = len(v.plaintext)
        offset = data.draw(st.one_of(st.integers(0, n + 2), st.sampled_from([0, n, 2**62])))
        length = data.draw(st.one_of(st.none(), st.integers(0, n + 2), st.just(2**62)))
        pieces = data.draw(st.booleans())
        got = g.run("range decrypt", lambda: ranged(bad, offset, length, pieces))
        want = v.plaintext[offset:] if length is None else v.plaintext[offset:offset + length]
        _check_plaintext(g, "range decrypt", got, want)

    with g.session():
        run()


def test_the_guard_records_what_it_must() -> None:
    """The figures can fail: an unnamed exception, a hang and a large allocation are each a distinct
    failure (on a row of its own, not in the report), and a codec error is not."""
    row = reliability_support.Hostile("self-test", "-")
    g = Guarded(row, hang_seconds=0.2)

    def inputs() -> None:
        with g.session():
            assert g.run("ok", lambda: codec.parse_header(b"nope")) is None
            assert g.run("value", lambda: 7) == 7
            with pytest.raises(ZeroDivisionError):
                g.run("div", lambda: 1 // 0)
            with pytest.raises(AssertionError, match="ran past"):
                g.run("spin", lambda: [None for _ in iter(int, 1)])
            with pytest.raises(AssertionError, match="peak allocation"):
                g.run("big", lambda: bytearray(MEMORY_BOUND + 1))

    with pytest.raises(AssertionError, match="self-test"):  # the session ends by asserting no failures
        inputs()
    assert row.executions == 5
    assert {f.split(":")[0] for f in row.failures} == {"div", "spin", "big"}
    assert any("ZeroDivisionError at tests/test_codec_fuzz.py:" in f for f in row.failures)
