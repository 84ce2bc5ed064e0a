"""(Re)create tests/vectors/mseal-v1-kat.json: known-answer vectors for the .mseal version-1 format.

    .venv/bin/python tests/vectors/generate.py            # rewrite the file (keeps its RSA keys)
    .venv/bin/python tests/vectors/generate.py --check    # exit 1 if the file is not what this makes
    .venv/bin/python tests/vectors/generate.py --new-keys # also make new RSA-3072 test keys

How the vectors are made, so that they are a check on the codec and not a copy of it:

* Every input is fixed. DEKs and salts are SHA-256 of a label naming the case; long plaintexts come
  from a counter-mode SHA-256 generator (described in the file). The only inputs that are not derived
  from labels are the two RSA-3072 **test-only** keys, which live in the file and are reused on every
  run (use --new-keys to replace them; then every wrap and package changes).
* RSA-OAEP is randomized, so wraps are inputs to an encoder. To keep this script reproducible, it
  encodes OAEP itself (RFC 8017, 7.1.1) with a seed derived from the case name and checks that the
  `cryptography` library decrypts the result. A deterministic OAEP seed is acceptable only for test
  vectors; real wraps use the library's random seed.
* Packages are built here by a small encoder written from docs/FORMAT.md (independent of codec/),
  then decoded by tests/independent_decoder.py; the negative cases are checked against that decoder
  too. tests/test_codec_vectors.py then holds codec/ to the file, in both directions.

The file is JSON; byte strings are lowercase hex. Run from anywhere; it needs only `cryptography`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HERE = Path(__file__).resolve().parent
KAT_PATH = HERE / "mseal-v1-kat.json"


def _independent_decoder() -> ModuleType:
    """tests/independent_decoder.py: the module already imported (under pytest, tests/ is on sys.path), or
    loaded from its file when this runs as a script from anywhere (without editing sys.path)."""
    if (module := sys.modules.get("independent_decoder")) is not None:
        return module
    found = importlib.util.spec_from_file_location("independent_decoder", HERE.parent / "independent_decoder.py")
    assert found is not None and found.loader is not None
    module = importlib.util.module_from_spec(found)
    sys.modules["independent_decoder"] = module  # (its dataclasses look their module up there)
    found.loader.exec_module(module)
    return module


spec = _independent_decoder()

LABEL_PREFIX = b"mediaseal-kat/v1 "
TEST_KEY_NOTE = "TEST ONLY - published in the repository; never use this key for real recordings"
CHUNK = 256
DEFAULT_CHUNK = 1 << 20
CAPTURED_AT = "2026-01-02T03:04:05Z"
AGENT_ID = "kat-agent-01"

PLAINTEXT_GENERATOR = {
    "name": "sha256-counter",
    "rule": (
        "plaintext(n) = the first n bytes of SHA-256(P || u32be(0)) || SHA-256(P || u32be(1)) || ..., "
        "where P is the ASCII string 'mediaseal-kat/v1 plaintext' and u32be(i) is i as 4 bytes big-endian"
    ),
    "first_32_bytes": "",  # filled in below, as a check for implementers
}

# name, chunk size, plaintext length, kind, recipients [(key name, alg)], plaintext form, extra metadata
CASES: list[dict[str, Any]] = [
    {"name": "empty", "chunk_size": CHUNK, "length": 0, "kind": "call"},
    {"name": "one-byte", "chunk_size": CHUNK, "length": 1, "kind": "screen"},
    {"name": "chunk-minus-1", "chunk_size": CHUNK, "length": CHUNK - 1, "kind": "digital"},
    {"name": "chunk", "chunk_size": CHUNK, "length": CHUNK, "kind": "transcript"},
    {"name": "chunk-plus-1", "chunk_size": CHUNK, "length": CHUNK + 1, "kind": "call"},
    {"name": "several-chunks", "chunk_size": CHUNK, "length": 4 * CHUNK + 100, "kind": "call", "generator": True},
    {
        "name": "two-wraps",
        "chunk_size": CHUNK,
        "length": 2 * CHUNK + 7,
        "kind": "call",
        "recipients": [("kek-a", "RSA-OAEP-256"), ("kek-b", "RSA-OAEP")],
        # Non-ASCII and characters that must be escaped: exercises the canonical JSON rule (§2.3).
        "original_name": 'Réunion "Q3" \u2013 会議\n.wav',
        "generator": True,
    },
    {"name": "default-chunk-size", "chunk_size": DEFAULT_CHUNK, "length": 50, "kind": "screen"},
]


def label(*parts: str) -> bytes:
    return hashlib.sha256(LABEL_PREFIX + " ".join(parts).encode()).digest()


def plaintext(n: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"mediaseal-kat/v1 plaintext" + i.to_bytes(4, "big")).digest()
        i += 1
    return bytes(out[:n])


# --- deterministic RSA-OAEP (RFC 8017 7.1.1), test vectors only -----------------------------------


def _mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def oaep_encrypt(public_key: rsa.RSAPublicKey, message: bytes, alg: str, seed_label: str) -> bytes:
    hash_name = {"RSA-OAEP-256": "sha256", "RSA-OAEP": "sha1"}[alg]
    h_len = hashlib.new(hash_name).digest_size
    nums = public_key.public_numbers()
    k = (nums.n.bit_length() + 7) // 8
    l_hash = hashlib.new(hash_name, b"").digest()
    db = l_hash + bytes(k - len(message) - 2 * h_len - 2) + b"\x01" + message
    seed = label("oaep-seed", seed_label)[:h_len]
    masked_db = bytes(a ^ b for a, b in zip(db, _mgf1(seed, k - h_len - 1, hash_name), strict=True))
    masked_seed = bytes(a ^ b for a, b in zip(seed, _mgf1(masked_db, h_len, hash_name), strict=True))
    em = b"\x00" + masked_seed + masked_db
    return pow(int.from_bytes(em, "big"), nums.e, nums.n).to_bytes(k, "big")


# --- an encoder written from docs/FORMAT.md ------------------------------------------------------


def encode_wraps(wraps: list[tuple[str, str, bytes]]) -> bytes:
    block = bytearray([len(wraps)])
    for kid, alg, wrapped in wraps:
        block += bytes([len(kid)]) + kid.encode() + bytes([len(alg)]) + alg.encode()
        block += len(wrapped).to_bytes(2, "big") + wrapped
    return len(block).to_bytes(2, "big") + bytes(block)


def encode_package(
    core: bytes,
    dek: bytes,
    salt: bytes,
    wraps: list[tuple[str, str, bytes]],
    chunk_size: int,
    pt: bytes,
    empty_last: bool = False,
) -> tuple[bytes, spec.Derived, bytes]:
    """A package per §2-§5. `empty_last` breaks §5 on purpose (for a negative case): every chunk is
    sealed as not-last and an empty last-flagged chunk follows, as a careless writer might do."""
    prefix = b"MSEAL" + bytes([1, chunk_size.bit_length() - 1, 0]) + len(core).to_bytes(2, "big")
    authenticated = prefix + salt + core
    d = spec.derive(dek, salt, authenticated)
    header = authenticated + d.commitment + d.header_mac + encode_wraps(wraps)
    aead = AESGCM(d.payload_key)
    n = max(1, -(-len(pt) // chunk_size))
    body = b"".join(
        aead.encrypt(spec.nonce(i, i == n - 1 and not empty_last), pt[i * chunk_size : (i + 1) * chunk_size], None)
        for i in range(n)
    )
    if empty_last:
        body += aead.encrypt(spec.nonce(n, True), b"", None)
    return header + body, d, authenticated


# --- the document --------------------------------------------------------------------------------


def load_keys(doc: dict[str, Any]) -> dict[str, rsa.RSAPrivateKey]:
    keys = {}
    for entry in doc["keys"]:
        key = serialization.load_pem_private_key(entry["private_key_pem"].encode(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        keys[entry["name"]] = key
    return keys


def new_keys() -> dict[str, rsa.RSAPrivateKey]:
    return {name: rsa.generate_private_key(public_exponent=65537, key_size=3072) for name in ("kek-a", "kek-b")}


def _b64u_int(value: int) -> str:
    import base64

    return base64.urlsafe_b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


def build(keys: dict[str, rsa.RSAPrivateKey]) -> dict[str, Any]:
    kids = {name: spec.thumbprint(key.public_key()) for name, key in keys.items()}
    by_kid = {kids[name]: key for name, key in keys.items()}
    doc: dict[str, Any] = {
        "title": "mediaseal .mseal format version 1: known-answer vectors",
        "spec": "docs/FORMAT.md",
        "generated_by": "tests/vectors/generate.py",
        "warning": "Every key in this file is a TEST-ONLY key published in the repository. Never use them.",
        "encoding": "byte strings are lowercase hex; metadata is given as JSON values and as the exact core bytes",
        "keys": [],
        "plaintext_generator": dict(PLAINTEXT_GENERATOR, first_32_bytes=plaintext(32).hex()),
        "cases": [],
        "negative": [],
    }
    for name, key in keys.items():
        nums = key.public_key().public_numbers()
        doc["keys"].append(
            {
                "name": name,
                "note": TEST_KEY_NOTE,
                "kid": kids[name],
                "public_jwk": {"e": _b64u_int(nums.e), "kty": "RSA", "n": _b64u_int(nums.n)},
                "private_key_pem": key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ).decode(),
            }
        )

    packages: dict[str, bytes] = {}
    wraps_of: dict[str, list[tuple[str, str, bytes]]] = {}
    cores: dict[str, bytes] = {}
    for case in CASES:
        name, cs, n = case["name"], case["chunk_size"], case["length"]
        dek, salt, pt = label("dek", name), label("salt", name), plaintext(n)
        metadata = {
            "recording_id": f"kat-{name}",
            "kind": case["kind"],
            "content_type": "audio/wav" if case["kind"] == "call" else "application/octet-stream",
            "original_name": case.get("original_name", f"{name}.bin"),
            "captured_at": CAPTURED_AT,
            "agent_id": AGENT_ID,
        }
        core = spec.canonical_core(metadata)
        wraps = []
        for i, (key_name, alg) in enumerate(case.get("recipients", [("kek-a", "RSA-OAEP-256")])):
            wrapped = oaep_encrypt(keys[key_name].public_key(), dek, alg, f"{name}/{i}")
            assert keys[key_name].decrypt(wrapped, spec.oaep(alg)) == dek  # the library agrees with our OAEP
            wraps.append((kids[key_name], alg, wrapped))
        package, d, authenticated = encode_package(core, dek, salt, wraps, cs, pt)
        decoded = spec.decrypt(package, by_kid)  # the spec decoder round-trips it
        assert decoded.plaintext == pt
        assert decoded.derived == d
        packages[name], wraps_of[name], cores[name] = package, wraps, core
        plaintext_field: dict[str, Any] = (
            {"generator": "sha256-counter", "length": n} if case.get("generator") else {"hex": pt.hex()}
        )
        doc["cases"].append(
            {
                "name": name,
                "inputs": {
                    "chunk_size": cs,
                    "dek": dek.hex(),
                    "salt": salt.hex(),
                    "metadata": metadata,
                    "plaintext": plaintext_field,
                    "plaintext_sha256": hashlib.sha256(pt).hexdigest(),
                    "wraps": [
                        {"key": _key_name(kids, kid), "kid": kid, "alg": alg, "wrapped": w.hex()}
                        for kid, alg, w in wraps
                    ],
                },
                "expected": {
                    "core": core.hex(),
                    "authenticated": authenticated.hex(),
                    "info": d.info.hex(),
                    "payload_key": d.payload_key.hex(),
                    "mac_key": d.mac_key.hex(),
                    "commitment": d.commitment.hex(),
                    "header_mac": d.header_mac.hex(),
                    "header_size": decoded.header.size,
                    "chunks": decoded.chunks,
                    "plaintext_size": n,
                    "package_size": len(package),
                    "package_sha256": hashlib.sha256(package).hexdigest(),
                    "package": package.hex(),
                },
            }
        )

    # The inputs of case "chunk" (exactly one full chunk), sealed the way §5 forbids: the full chunk as
    # not-last, then an empty last chunk. Made with the right keys, so only the layout rule rejects it.
    chunk_case = next(c for c in doc["cases"] if c["name"] == "chunk")["inputs"]
    non_canonical, _, _ = encode_package(
        cores["chunk"],
        label("dek", "chunk"),
        label("salt", "chunk"),
        wraps_of["chunk"],
        CHUNK,
        bytes.fromhex(chunk_case["plaintext"]["hex"]),
        empty_last=True,
    )
    # Cores that JSON parsers disagree about, in otherwise valid packages made with case one-byte's
    # keys (so the header checks pass and only the metadata rules of §2.3 can reject them).
    one = cores["one-byte"]
    bad_cores = {
        "metadata-duplicate-member": (
            "a second recording_id member, in a package that authenticates",
            one.replace(b"{", b'{"recording_id":"kat-evil",', 1),
        ),
        "metadata-lone-surrogate": (
            "original_name holds the escape \\ud800 (an unpaired surrogate), in a package that authenticates",
            one.replace(b'"original_name":"one-byte.bin"', b'"original_name":"\\ud800.bin"'),
        ),
    }
    extra = [
        {
            "name": "empty-last-chunk-after-full",
            "description": "case chunk's inputs sealed as a full not-last chunk plus an empty last chunk (§5 forbids)",
            "package": non_canonical,
            "error": "TruncatedPackageError",
        }
    ]
    for name, (description, core) in bad_cores.items():
        assert core != one
        package, _, _ = encode_package(
            core, label("dek", "one-byte"), label("salt", "one-byte"), wraps_of["one-byte"], CHUNK, plaintext(1)
        )
        extra.append({"name": name, "description": description, "package": package, "error": "MalformedPackageError"})
    for neg in negative_cases(packages, wraps_of, cores, kids) + extra:
        try:
            spec.decrypt(neg["package"], by_kid)
        except spec.CodecError as e:
            got = type(e).__name__
        else:
            got = "no error"
        if got != neg["error"]:
            raise SystemExit(f"negative case {neg['name']}: the spec decoder says {got}, expected {neg['error']}")
        doc["negative"].append(dict(neg, package=neg["package"].hex()))
    return doc


def _key_name(kids: dict[str, str], kid: str) -> str:
    return next(name for name, k in kids.items() if k == kid)


def negative_cases(
    packages: dict[str, bytes],
    wraps_of: dict[str, list[tuple[str, str, bytes]]],
    cores: dict[str, bytes],
    kids: dict[str, str],
) -> list[dict[str, Any]]:
    """Altered packages; the reader holds both test keys. Each names the error §6/§8 require."""
    base_name = "several-chunks"  # 5 chunks at C = 256: 4 full, the last holds 100 bytes
    base = packages[base_name]
    core_len = len(cores[base_name])
    hdr = spec.parse_header(base).size
    stride = CHUNK + 16
    wraps_at = 106 + core_len  # wraps_len field
    chunk = [base[hdr + i * stride : hdr + (i + 1) * stride] for i in range(5)]
    head = base[:hdr]

    def flip(data: bytes, pos: int, bit: int = 0) -> bytes:
        return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :]

    def with_byte(data: bytes, pos: int, value: int) -> bytes:
        return data[:pos] + bytes([value]) + data[pos + 1 :]

    def rebuild(core: bytes | None = None, wraps: list[tuple[str, str, bytes]] | None = None) -> bytes:
        """The base package with another core (same salt and checks) or other wraps, lengths fixed up."""
        c = cores[base_name] if core is None else core
        w = wraps_of[base_name] if wraps is None else wraps
        prefix = base[:8] + len(c).to_bytes(2, "big")
        checks = base[42 + core_len : 106 + core_len]
        return prefix + base[10:42] + c + checks + encode_wraps(w) + b"".join(chunk)

    (kid, alg, wrapped) = wraps_of[base_name][0]
    other = packages["chunk-plus-1"]  # same chunk size, same KEK, another DEK
    other_hdr = spec.parse_header(other).size
    cases: list[tuple[str, str, bytes, str]] = [
        ("bad-magic", "byte 0 changed: 'LSEAL'", flip(base, 0), "MalformedPackageError"),
        ("version-2", "version byte 2", with_byte(base, 5, 2), "UnsupportedVersionError"),
        ("reserved-flag", "reserved byte 1", with_byte(base, 7, 1), "UnsupportedVersionError"),
        ("chunk-size-too-small", "log2_chunk 7", with_byte(base, 6, 7), "MalformedPackageError"),
        (
            "chunk-size-changed",
            "log2_chunk 9 (in range, but authenticated)",
            with_byte(base, 6, 9),
            "AuthenticationError",
        ),
        ("core-len-zero", "core_len 0", base[:8] + b"\x00\x00" + base[10:], "MalformedPackageError"),
        ("salt-flipped", "one bit of the salt", flip(base, 10), "AuthenticationError"),
        (
            "metadata-edited",
            "recording_id changed, still valid JSON of the same length",
            rebuild(core=cores[base_name].replace(b"kat-several-chunks", b"kat-several-chunkz")),
            "AuthenticationError",
        ),
        (
            "metadata-extra-member",
            "a seventh member in the core",
            rebuild(core=cores[base_name][:-1] + b',"note":"x"}'),
            "MalformedPackageError",
        ),
        ("metadata-not-json", "the core's first byte changed", flip(base, 42, 1), "MalformedPackageError"),
        ("commitment-flipped", "one bit of the commitment", flip(base, 42 + core_len), "AuthenticationError"),
        (
            "header-mac-flipped",
            "one bit of the header MAC (commitment intact)",
            flip(base, 74 + core_len, 7),
            "AuthenticationError",
        ),
        (
            "wraps-len-zero",
            "wraps_len 0",
            base[:wraps_at] + b"\x00\x00" + base[wraps_at + 2 :],
            "MalformedPackageError",
        ),
        (
            "wraps-trailing-byte",
            "one byte left over after the last wrap",
            head[:wraps_at]
            + (int.from_bytes(head[wraps_at : wraps_at + 2], "big") + 1).to_bytes(2, "big")
            + head[wraps_at + 2 :]
            + b"\x00"
            + b"".join(chunk),
            "MalformedPackageError",
        ),
        ("wrap-count-zero", "wrap count 0", with_byte(base, wraps_at + 2, 0), "MalformedPackageError"),
        (
            "unknown-alg",
            "alg 'RSA-OAEP-384'",
            rebuild(wraps=[(kid, "RSA-OAEP-384", wrapped)]),
            "UnsupportedVersionError",
        ),
        (
            "unknown-kid",
            "a well-formed kid the reader does not hold",
            rebuild(wraps=[("A" * 43, alg, wrapped)]),
            "NoMatchingKeyError",
        ),
        (
            "wrap-from-other-package",
            "the wrap of case chunk-plus-1 (same KEK, another DEK): fails the commitment",
            rebuild(wraps=wraps_of["chunk-plus-1"]),
            "AuthenticationError",
        ),
        (
            "wrapped-flipped",
            "one bit of the RSA ciphertext",
            rebuild(wraps=[(kid, alg, flip(wrapped, 200))]),
            "AuthenticationError",
        ),
        ("header-truncated", "only the first 50 bytes", base[:50], "TruncatedPackageError"),
        ("no-body", "the header alone", head, "TruncatedPackageError"),
        ("truncated-at-chunk-boundary", "the last chunk dropped", head + b"".join(chunk[:4]), "TruncatedPackageError"),
        ("truncated-inside-last-chunk", "the last 5 bytes dropped", base[:-5], "AuthenticationError"),
        (
            "last-chunk-shorter-than-tag",
            "4 chunks and 5 bytes of the last",
            head + b"".join(chunk[:4]) + chunk[4][:5],
            "TruncatedPackageError",
        ),
        ("trailing-byte", "one byte appended", base + b"\x00", "AuthenticationError"),
        (
            "empty-chunk-appended",
            "case chunk (one full chunk) plus 16 bytes",
            packages["chunk"] + bytes(16),
            "TruncatedPackageError",
        ),
        ("chunk-flipped", "one bit of chunk 1's ciphertext", flip(base, hdr + stride + 3), "AuthenticationError"),
        ("tag-flipped", "one bit of chunk 2's tag", flip(base, hdr + 3 * stride - 1), "AuthenticationError"),
        ("last-chunk-flipped", "one bit of the last chunk", flip(base, len(base) - 20), "AuthenticationError"),
        (
            "chunks-swapped",
            "chunks 1 and 2 swapped",
            head + chunk[0] + chunk[2] + chunk[1] + chunk[3] + chunk[4],
            "AuthenticationError",
        ),
        ("chunk-duplicated", "chunk 1 twice", head + chunk[0] + chunk[1] + b"".join(chunk[1:]), "AuthenticationError"),
        ("chunk-dropped", "chunk 1 missing", head + chunk[0] + b"".join(chunk[2:]), "AuthenticationError"),
        (
            "chunk-spliced",
            "chunk 0 from case chunk-plus-1 (same KEK, same chunk size)",
            head + other[other_hdr : other_hdr + stride] + b"".join(chunk[1:]),
            "AuthenticationError",
        ),
        (
            "header-swapped",
            "the header of case chunk-plus-1 over this body",
            other[:other_hdr] + b"".join(chunk),
            "AuthenticationError",
        ),
    ]
    return [{"name": n, "description": d, "package": p, "error": e} for n, d, p, e in cases]


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    parser.add_argument("--new-keys", action="store_true", help="make new RSA-3072 test keys")
    args = parser.parse_args(argv)
    keys = new_keys() if args.new_keys or not KAT_PATH.exists() else load_keys(json.loads(KAT_PATH.read_text("utf-8")))
    text = render(build(keys))
    if args.check:
        same = KAT_PATH.exists() and KAT_PATH.read_text("utf-8") == text
        out("up to date" if same else f"{KAT_PATH} differs from what generate.py makes")
        return 0 if same else 1
    KAT_PATH.write_text(text, "utf-8")
    out(f"wrote {KAT_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
