"""Known-answer vectors (tests/vectors/mseal-v1-kat.json), both directions, for codec/ and for the
independent decoder written from docs/FORMAT.md."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import independent_decoder as spec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mediaseal import codec

VECTORS = Path(__file__).parent / "vectors"
DOC: dict[str, Any] = json.loads((VECTORS / "mseal-v1-kat.json").read_text("utf-8"))
CASES = {c["name"]: c for c in DOC["cases"]}
NEGATIVE = {n["name"]: n for n in DOC["negative"]}
FORMAT_MD = Path(__file__).parent.parent / "docs" / "FORMAT.md"


def generated_plaintext(n: int) -> bytes:
    """The generator rule, implemented from its description in the file."""
    rule = DOC["plaintext_generator"]
    assert rule["name"] == "sha256-counter"
    out = b"".join(
        hashlib.sha256(b"mediaseal-kat/v1 plaintext" + i.to_bytes(4, "big")).digest() for i in range(n // 32 + 1)
    )
    return out[:n]


def plaintext_of(case: dict[str, Any]) -> bytes:
    p = case["inputs"]["plaintext"]
    pt = bytes.fromhex(p["hex"]) if "hex" in p else generated_plaintext(p["length"])
    assert hashlib.sha256(pt).hexdigest() == case["inputs"]["plaintext_sha256"]
    return pt


@pytest.fixture(scope="module")
def private_keys() -> dict[str, rsa.RSAPrivateKey]:
    keys = {}
    for entry in DOC["keys"]:
        key = serialization.load_pem_private_key(entry["private_key_pem"].encode(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        keys[entry["kid"]] = key
    return keys


@pytest.fixture(scope="module")
def keyring(private_keys, codec_keyring):
    return codec_keyring(extra=private_keys)


def wraps_of(case: dict[str, Any]) -> tuple[codec.Wrap, ...]:
    return tuple(codec.Wrap(w["kid"], w["alg"], bytes.fromhex(w["wrapped"])) for w in case["inputs"]["wraps"])


# --- the file itself -----------------------------------------------------------------------------


def test_the_file_covers_the_cases_the_format_needs():
    sizes = {c["name"]: (c["inputs"]["chunk_size"], c["expected"]["plaintext_size"]) for c in DOC["cases"]}
    assert sizes["empty"] == (256, 0)
    assert sizes["one-byte"] == (256, 1)
    assert sizes["chunk-minus-1"] == (256, 255)
    assert sizes["chunk"] == (256, 256)
    assert sizes["chunk-plus-1"] == (256, 257)
    assert CASES["several-chunks"]["expected"]["chunks"] >= 4
    assert sizes["default-chunk-size"][0] == codec.DEFAULT_CHUNK_SIZE
    assert [w["alg"] for w in CASES["two-wraps"]["inputs"]["wraps"]] == ["RSA-OAEP-256", "RSA-OAEP"]
    assert {n["error"] for n in DOC["negative"]} == {
        "MalformedPackageError",
        "UnsupportedVersionError",
        "TruncatedPackageError",
        "NoMatchingKeyError",
        "AuthenticationError",
    }


def test_keys_are_test_only_rsa3072_and_kids_are_rfc7638_thumbprints(private_keys):
    for entry in DOC["keys"]:
        assert "TEST ONLY" in entry["note"]
        key = private_keys[entry["kid"]]
        assert key.key_size == 3072
        assert spec.thumbprint(key.public_key()) == entry["kid"]
        jwk = json.dumps(entry["public_jwk"], sort_keys=True, separators=(",", ":"))
        kid = spec._b64u(hashlib.sha256(jwk.encode()).digest())
        assert kid == entry["kid"]


def test_plaintext_generator_first_bytes():
    assert generated_plaintext(32).hex() == DOC["plaintext_generator"]["first_32_bytes"]


def test_generator_reproduces_the_file_byte_for_byte():
    spec_ = importlib.util.spec_from_file_location("kat_generate", VECTORS / "generate.py")
    assert spec_ is not None
    assert spec_.loader is not None
    gen = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(gen)
    text = gen.render(gen.build(gen.load_keys(DOC)))
    assert text == (VECTORS / "mseal-v1-kat.json").read_text("utf-8")


def test_format_md_worked_example_matches_the_vectors():
    doc = FORMAT_MD.read_text("utf-8")
    case = CASES["one-byte"]
    expected, package = case["expected"], bytes.fromhex(case["expected"]["package"])
    for value in ("payload_key", "mac_key", "commitment", "header_mac"):
        assert expected[value] in doc, value
    assert case["inputs"]["dek"] in doc
    assert case["inputs"]["salt"] in doc
    assert package[expected["header_size"] + 1 :].hex() in doc  # the tag of the only chunk
    assert bytes.fromhex(expected["core"]).decode() in doc


# --- codec: forward direction (encrypt reproduces the package) ------------------------------------


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("overlap", [True, False])
def test_codec_seal_reproduces_package(name, overlap):
    case = CASES[name]
    i, e = case["inputs"], case["expected"]
    header, keys = codec.Header.create(
        codec.Metadata(**i["metadata"]),
        bytes.fromhex(i["dek"]),
        bytes.fromhex(i["salt"]),
        wraps_of(case),
        i["chunk_size"],
    )
    assert header.core.hex() == e["core"]
    assert header.authenticated.hex() == e["authenticated"]
    assert header.size == e["header_size"]
    out = io.BytesIO()
    result = codec.seal(io.BytesIO(plaintext_of(case)), out, header, keys, overlap=overlap, digest=True)
    assert out.getvalue().hex() == e["package"]
    assert result == codec.SealResult(e["plaintext_size"], e["package_size"], e["chunks"], e["package_sha256"])


@pytest.mark.parametrize("name", CASES)
def test_codec_key_schedule(name):
    i, e = CASES[name]["inputs"], CASES[name]["expected"]
    keys = codec.derive_keys(bytes.fromhex(i["dek"]), bytes.fromhex(i["salt"]), bytes.fromhex(e["authenticated"]))
    assert (keys.payload.hex(), keys.mac.hex(), keys.commitment.hex()) == (
        e["payload_key"],
        e["mac_key"],
        e["commitment"],
    )


# --- codec: backward direction (decrypt gives plaintext and derived values) ------------------------


@pytest.mark.parametrize("name", CASES)
def test_codec_open_package(name, keyring):
    case = CASES[name]
    e = case["expected"]
    package = bytes.fromhex(e["package"])
    reader = codec.open_package(io.BytesIO(package), keyring)
    h = reader.header
    assert (h.commitment.hex(), h.mac.hex(), h.core.hex(), h.salt.hex()) == (
        e["commitment"],
        e["header_mac"],
        e["core"],
        case["inputs"]["salt"],
    )
    assert h.wraps == wraps_of(case)
    assert h.metadata == codec.Metadata(**case["inputs"]["metadata"])
    assert (reader.layout.chunks, reader.plaintext_size, h.size) == (e["chunks"], e["plaintext_size"], e["header_size"])
    # The derived values, from the DEK the keyring unwraps.
    dek = keyring.unwrap(h.wraps)
    assert dek.hex() == case["inputs"]["dek"]
    keys = h.open(dek)
    assert (keys.payload.hex(), keys.mac.hex()) == (e["payload_key"], e["mac_key"])
    out = io.BytesIO()
    assert reader.decrypt_to(out) == e["plaintext_size"]
    assert out.getvalue() == plaintext_of(case)
    assert reader.verify() == e["plaintext_size"]


@pytest.mark.parametrize("name", CASES)
def test_codec_decrypt_stream(name, keyring):
    case = CASES[name]
    out = io.BytesIO()
    header, n = codec.decrypt_stream(io.BytesIO(bytes.fromhex(case["expected"]["package"])), out, keyring)
    assert (out.getvalue(), n) == (plaintext_of(case), case["expected"]["plaintext_size"])
    assert header.commitment.hex() == case["expected"]["commitment"]


@pytest.mark.parametrize("key_index", [0, 1])
def test_codec_two_wraps_each_key_alone(key_index, private_keys, codec_keyring):
    case = CASES["two-wraps"]
    kid = DOC["keys"][key_index]["kid"]
    reader = codec.open_package(
        io.BytesIO(bytes.fromhex(case["expected"]["package"])), codec_keyring(extra={kid: private_keys[kid]})
    )
    out = io.BytesIO()
    reader.decrypt_to(out)
    assert out.getvalue() == plaintext_of(case)


# --- the independent decoder ------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_independent_decoder(name, private_keys):
    case = CASES[name]
    e = case["expected"]
    decoded = spec.decrypt(bytes.fromhex(e["package"]), private_keys)
    assert decoded.plaintext == plaintext_of(case)
    assert decoded.header.metadata == case["inputs"]["metadata"]
    assert decoded.header.size == e["header_size"]
    assert decoded.chunks == e["chunks"]
    d = decoded.derived
    assert (d.info.hex(), d.payload_key.hex(), d.mac_key.hex(), d.commitment.hex(), d.header_mac.hex()) == (
        e["info"],
        e["payload_key"],
        e["mac_key"],
        e["commitment"],
        e["header_mac"],
    )
    assert spec.canonical_core(case["inputs"]["metadata"]).hex() == e["core"]


@pytest.mark.parametrize("key_index", [0, 1])
def test_independent_decoder_two_wraps_each_key_alone(key_index, private_keys):
    case = CASES["two-wraps"]
    kid = DOC["keys"][key_index]["kid"]
    decoded = spec.decrypt(bytes.fromhex(case["expected"]["package"]), {kid: private_keys[kid]})
    assert decoded.plaintext == plaintext_of(case)


# --- negative vectors: every reader raises exactly the named error ----------------------------------


def _codec_seekable(package: bytes, keyring) -> None:
    codec.open_package(io.BytesIO(package), keyring).verify()


def _codec_stream(package: bytes, keyring) -> None:
    codec.decrypt_stream(io.BytesIO(package), io.BytesIO(), keyring)


@pytest.mark.parametrize("name", NEGATIVE)
@pytest.mark.parametrize("reader", ["codec-seekable", "codec-stream"])
def test_codec_negative(name, reader, keyring):
    """Failing cases here are codec deviations from docs/FORMAT.md (see the test's id)."""
    neg = NEGATIVE[name]
    run = _codec_seekable if reader == "codec-seekable" else _codec_stream
    with pytest.raises(codec.CodecError) as err:
        run(bytes.fromhex(neg["package"]), keyring)
    assert type(err.value).__name__ == neg["error"], str(err.value)


@pytest.mark.parametrize("name", NEGATIVE)
def test_independent_decoder_negative(name, private_keys):
    neg = NEGATIVE[name]
    with pytest.raises(spec.ERRORS[neg["error"]]) as err:
        spec.decrypt(bytes.fromhex(neg["package"]), private_keys)
    assert type(err.value).__name__ == neg["error"]
