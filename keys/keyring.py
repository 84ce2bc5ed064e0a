"""The managed keyring: mediaseal's own KEKs in a directory, private halves encrypted at rest.

>>> kr = Keyring.init(Path("keyring"), passphrase_from(os.environ, None))   # RSA-3072 KEK + Ed25519 signer
>>> kr = Keyring.open(Path("keyring"))          # public side only: what the encrypting agent uses
>>> header, keys = codec.new_package(metadata, [kr.recipient()])
>>> kr.rotate(passphrase)                       # new current key; the old one becomes decrypt-only
>>> reader = codec.open_package(f, kr.unlock(passphrase))
>>> document = kr.publish(passphrase, ttl_seconds=86400)   # the signed key set for agents

On disk (directories 0700, files 0600, every write atomic: temp file, fsync, rename, fsync directory):
    keyring.json          key records, the current kid, protection mode, signer id, last key set serial
    public/<kid>.pem      RSA public keys (SubjectPublicKeyInfo)
    private/<kid>.json    protected PKCS#8 DER private keys (envelopes from keys.protect)
    private/signer.json   the protected Ed25519 signing key;  signer.pem: its public key
    master.key            32 random bytes, only when no passphrase was given at init
    keyring.lock          flock'ed by every change, so two custodians can't lose each other's update
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mediaseal.codec import (
    RSA_OAEP_256,
    WRAP_ALGORITHMS,
    AuthenticationError,
    NoMatchingKeyError,
    Recipient,
    Wrap,
    unwrap_dek,
)
from mediaseal.keys.errors import (
    KeyringExistsError,
    KeyringFormatError,
    KeyringLockedError,
    KeyringNotFoundError,
    KeyStateError,
    PassphraseRequiredError,
    PassphraseSourceError,
    UnknownKeyError,
)
from mediaseal.keys.jwk import KID_PATTERN, thumbprint
from mediaseal.keys.keyset import (
    ACTIVE,
    DECRYPT_ONLY,
    DEFAULT_TTL_SECONDS,
    ENCRYPTABLE_STATES,
    PENDING,
    RETIRED,
    STATES,
    KeySetKey,
    build_keyset,
    format_time,
    parse_time,
    signer_id,
)
from mediaseal.keys.kms import KmsOptions, KmsProtector
from mediaseal.keys.protect import MASTER_KEY_SIZE, MasterKeyProtector, PassphraseProtector, Protector, key_aad
from mediaseal.plumbing.durable import fsync_dir, write_atomic

FORMAT = "mediaseal-keyring/1"
PASSPHRASE, MASTER_KEY, KMS = "passphrase", "master-key", "kms"
PROTECTIONS = (PASSPHRASE, MASTER_KEY, KMS)
# Rotation schedule (keys.rotation acts on it): nominal shortest length of each period, in seconds.
SCHEDULE_PERIODS: dict[str, int] = {"daily": 86400, "weekly": 7 * 86400, "monthly": 28 * 86400,
                                    "yearly": 365 * 86400, "disabled": 0}
_OPTIONAL_MEMBERS = {"kms", "schedule"}  # keyring.json members that only some keyrings have
PASSPHRASE_ENV = "MEDIASEAL_KEYRING_PASSPHRASE"  # noqa: S105  # a variable name, not a secret
KEK_BITS, KEK_EXPONENT = 3072, 65537
KEK_PURPOSE, SIGNER_PURPOSE = "kek", "signer"

_KEYRING_JSON, _MASTER_KEY, _SIGNER_PEM, _LOCK = "keyring.json", "master.key", "signer.pem", "keyring.lock"
_PUBLIC, _PRIVATE, _SIGNER_PRIVATE = "public", "private", "signer.json"
_TIMES = ("activated_at", "deactivated_at", "retired_at")


@dataclass(frozen=True)
class KeyRecord:
    """One KEK's record in keyring.json. Timestamps are RFC 3339 UTC strings."""

    kid: str
    alg: str
    state: str
    created_at: str
    activated_at: str | None = None
    deactivated_at: str | None = None  # when it became decrypt-only
    retired_at: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"kid": self.kid, "alg": self.alg, "state": self.state, "created_at": self.created_at}
        out.update({name: value for name in _TIMES if (value := getattr(self, name)) is not None})
        return out

    @classmethod
    def from_json(cls, d: object) -> KeyRecord:
        if not isinstance(d, dict) or not {"kid", "alg", "state", "created_at"} <= set(d) <= {
            "kid", "alg", "state", "created_at", *_TIMES,
        }:
            raise KeyringFormatError("keyring.json: a key record has missing or unknown members")
        kid = d["kid"]
        # kids become file names: only a thumbprint-shaped kid may reach the file system.
        if not isinstance(kid, str) or not KID_PATTERN.fullmatch(kid):
            raise KeyringFormatError(f"keyring.json: kid {kid!r} is not a SHA-256 JWK thumbprint")
        if d["alg"] not in WRAP_ALGORITHMS or d["state"] not in STATES:
            raise KeyringFormatError(f"keyring.json: key {kid} has alg {d['alg']!r}, state {d['state']!r}")
        try:
            for name in ("created_at", *_TIMES):
                if name in d:
                    parse_time(d[name])
        except ValueError:
            raise KeyringFormatError(f"keyring.json: key {kid} has a malformed timestamp") from None
        return cls(**d)


@dataclass(frozen=True)
class RotationSchedule:
    """keyring.json's "schedule": how often a new KEK is made, and how long it stays pending first."""

    every: str = "disabled"  # daily | weekly | monthly | yearly | disabled
    grace_seconds: int = 86400  # pending -> current after this long (agents fetch it meanwhile)

    @classmethod
    def make(cls, every: str, grace_seconds: int | None = None) -> RotationSchedule:
        """Validated; the default grace is a day, or a quarter of the period if that is shorter."""
        if every not in SCHEDULE_PERIODS:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULE_PERIODS)} (got {every!r})")
        period = SCHEDULE_PERIODS[every]
        grace = min(86400, period // 4 or 86400) if grace_seconds is None else grace_seconds
        if isinstance(grace, bool) or not isinstance(grace, int) or grace < 0:
            raise ValueError("grace_seconds must be a whole number >= 0")
        if period and grace >= period:
            raise ValueError(f"grace_seconds must be shorter than the {every} period ({period} s)")
        return cls(every, grace)

    def to_json(self) -> dict[str, object]:
        return {"every": self.every, "grace_seconds": self.grace_seconds}


def generate_kek() -> rsa.RSAPrivateKey:
    """A new RSA-3072 (e=65537) key-encryption key."""
    return rsa.generate_private_key(public_exponent=KEK_EXPONENT, key_size=KEK_BITS)


def passphrase_from(env: Mapping[str, str], passphrase_file: Path | None) -> bytes | None:
    """The keyring passphrase: from `passphrase_file` if given, else $MEDIASEAL_KEYRING_PASSPHRASE, else None.

    One trailing newline in the file is dropped (editors add it). An empty file is an error; an empty
    variable counts as unset.
    """
    if passphrase_file is not None:
        try:
            data = passphrase_file.read_bytes()
        except OSError as e:
            raise PassphraseSourceError(f"can't read passphrase file {passphrase_file}: {e.strerror}") from None
        data = data.removesuffix(b"\n").removesuffix(b"\r")
        if not data:
            raise PassphraseSourceError(f"passphrase file {passphrase_file} is empty")
        return data
    value = env.get(PASSPHRASE_ENV)
    return value.encode("utf-8", "surrogateescape") if value else None


class Keyring:
    """A keyring directory. `open` reads only public material; secrets are needed only to change or use keys."""

    def __init__(self, path: Path, *, kms: KmsOptions | None = None) -> None:
        """Open the keyring at `path` (same as `Keyring.open`)."""
        self.path = Path(path)
        self.kms_options = kms or KmsOptions()  # used only by a KMS-protected keyring's private side
        self._load()

    @classmethod
    def open(cls, path: Path, *, kms: KmsOptions | None = None) -> Keyring:
        """Load keyring.json and the public keys. Never needs, or reads, a secret (nor calls KMS)."""
        return cls(path, kms=kms)

    def reload(self) -> None:
        """Re-read keyring.json (a long-lived holder: another process may have changed it)."""
        self._load()

    @classmethod
    def init(cls, path: Path, passphrase: bytes | None, *, alg: str = RSA_OAEP_256, kms_key_id: str | None = None,
             kms: KmsOptions | None = None) -> Keyring:
        """Create a keyring with one RSA-3072 KEK (current, active) and an Ed25519 key set signer.

        With `passphrase` None the keys are protected by a random master.key inside the keyring,
        which protects them only as well as that file is protected. With `kms_key_id` (a KMS key id,
        ARN, alias or alias ARN) they are sealed by KMS Encrypt instead (keys.kms), and no passphrase
        is taken.
        """
        if alg not in WRAP_ALGORITHMS:
            raise ValueError(f"alg must be one of {', '.join(WRAP_ALGORITHMS)}")
        if kms_key_id is not None and passphrase is not None:
            raise ValueError("a KMS-protected keyring takes no passphrase")
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise KeyringExistsError(f"{path} exists and is not an empty directory; refusing to create a keyring")
        signer = ed25519.Ed25519PrivateKey.generate()
        sid = signer_id(signer.public_key())
        extra: dict[str, Any] = {}
        if kms_key_id is not None:
            kms_protector = KmsProtector(kms_key_id, kms)
            # Sealed before anything is on disk: if KMS refuses, init leaves nothing behind.
            signer_envelope = kms_protector.seal(_pkcs8(signer), key_aad(SIGNER_PURPOSE, sid))
            extra["kms"] = {"key_id": kms_key_id, "key_arn": kms_protector.key_arn}
        for d in (path, path / _PUBLIC, path / _PRIVATE):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask
        protector: Protector
        if kms_key_id is not None:
            protector, protection = kms_protector, KMS
        elif passphrase is not None:
            protector, protection = PassphraseProtector(passphrase), PASSPHRASE
        else:
            master = secrets.token_bytes(MASTER_KEY_SIZE)
            write_atomic(path / _MASTER_KEY, master)
            protector, protection = MasterKeyProtector(master), MASTER_KEY
        if kms_key_id is None:
            signer_envelope = protector.seal(_pkcs8(signer), key_aad(SIGNER_PURPOSE, sid))
        _write_json(path / _PRIVATE / _SIGNER_PRIVATE, signer_envelope)
        write_atomic(path / _SIGNER_PEM, _spki_pem(signer.public_key()))
        kek = generate_kek()
        kid = thumbprint(kek.public_key())
        _store_kek(path, kid, kek, protector)
        now = _now()
        doc = {
            "format": FORMAT,
            "protection": protection,
            "current": kid,
            "serial": 0,
            "keys": [KeyRecord(kid, alg, ACTIVE, now, activated_at=now).to_json()],
            "signer": {"id": sid, "alg": "Ed25519", "created_at": now},
            **extra,
        }
        # keyring.json last: it is the commit point; a crash before it leaves no keyring, only files.
        _write_json(path / _KEYRING_JSON, doc)
        fsync_dir(path.parent)
        return cls(path, kms=kms)

    # -- public side ---------------------------------------------------------------------------

    @property
    def protection(self) -> str:
        """"passphrase", "master-key" or "kms": what the private side needs."""
        return self._protection

    @property
    def kms_key_arn(self) -> str | None:
        """The KMS key the private side is sealed under (KMS protection only)."""
        kms = self._optional.get("kms")
        return str(kms["key_arn"]) if kms else None

    @property
    def schedule(self) -> RotationSchedule:
        """The rotation schedule (disabled unless set); keys.rotation.rotate_if_due acts on it."""
        raw = self._optional.get("schedule")
        return RotationSchedule(**raw) if raw else RotationSchedule()

    def set_schedule(self, schedule: RotationSchedule) -> RotationSchedule:
        """Store the rotation schedule (no secret needed: it changes no key)."""
        schedule = RotationSchedule.make(schedule.every, schedule.grace_seconds)
        with self._locked():
            self._optional["schedule"] = schedule.to_json()
            self._commit(list(self._records.values()), current=self._current)
        return schedule

    @property
    def signer(self) -> ed25519.Ed25519PublicKey:
        """The key set signer's public key (what agents pin; also in signer.pem)."""
        return self._signer

    @property
    def signer_id(self) -> str:
        return self._signer_id

    @property
    def serial(self) -> int:
        """The serial of the last key set published from this keyring (0: none yet)."""
        return self._serial

    def signer_pem(self) -> bytes:
        """The signer's public key as SubjectPublicKeyInfo PEM (the bytes agents pin)."""
        return _spki_pem(self._signer)

    def records(self) -> list[KeyRecord]:
        """All key records, oldest first."""
        return list(self._records.values())

    def record(self, kid: str) -> KeyRecord:
        try:
            return self._records[kid]
        except KeyError:
            raise UnknownKeyError(f"no key {kid} in keyring {self.path}") from None

    def current(self) -> KeyRecord:
        """The one current (active) key: the one new packages are sealed to."""
        return self._records[self._current]

    def public_key(self, kid: str) -> rsa.RSAPublicKey:
        self.record(kid)
        return self._public[kid]

    def recipient(self, kid: str | None = None) -> Recipient:
        """The codec recipient for the current key, or for `kid` (pending or active only)."""
        rec = self.record(self._current if kid is None else kid)
        if rec.state not in ENCRYPTABLE_STATES:
            raise KeyStateError(f"key {rec.kid} is {rec.state}: nothing new may be sealed to it")
        return Recipient(kid=rec.kid, public_key=self._public[rec.kid], alg=rec.alg)

    # -- changes (each under the keyring lock, each ending in one atomic keyring.json write) ----

    def rotate(self, passphrase: bytes | None, *, pending: bool = False, alg: str | None = None,
               at: datetime | None = None) -> KeyRecord:
        """Add a new RSA-3072 KEK (alg defaults to the current key's).

        Immediate: it becomes current and active, the previous current becomes decrypt-only.
        `pending=True`: it is only added as pending (publish, let agents warm up, then `activate`).
        `at`: the time recorded (default now; keys.rotation passes its clock).
        """
        if alg is not None and alg not in WRAP_ALGORITHMS:
            raise ValueError(f"alg must be one of {', '.join(WRAP_ALGORITHMS)}")
        protector = self._protector(passphrase)
        # Check the secret before sealing anything under it: a mistyped passphrase must not
        # become the only one that opens the new key.
        self._open_signer(protector)
        kek = generate_kek()  # slow; outside the lock
        kid = thumbprint(kek.public_key())
        with self._locked():
            if kid in self._records:
                raise KeyStateError(f"key {kid} is already in keyring {self.path}")
            _store_kek(self.path, kid, kek, protector)  # files first; keyring.json commits them
            now = _now(at)
            new = KeyRecord(kid, alg or self.current().alg, PENDING if pending else ACTIVE, now,
                            activated_at=None if pending else now)
            records = list(self._records.values())
            if not pending:
                records = [self._demoted(r, now) if r.kid == self._current else r for r in records]
            self._commit([*records, new], current=self._current if pending else kid)
        return new

    def activate(self, kid: str, passphrase: bytes | None, *, at: datetime | None = None) -> KeyRecord:
        """Make a pending (or decrypt-only: roll back) key current; the old current becomes decrypt-only.

        Needs the secret because the key's private half is opened first: a key nobody can
        decrypt with must never become the one new packages are sealed to.
        """
        protector = self._protector(passphrase)
        with self._locked():
            rec = self.record(kid)
            if kid == self._current:
                return rec
            if rec.state not in (PENDING, DECRYPT_ONLY):
                raise KeyStateError(f"key {kid} is {rec.state}; retired keys can't come back")
            self._load_private(kid, protector)
            now = _now(at)
            new = replace(rec, state=ACTIVE, activated_at=now, deactivated_at=None)
            records = [new if r.kid == kid else self._demoted(r, now) if r.kid == self._current else r
                       for r in self._records.values()]
            self._commit(records, current=kid)
        return new

    def set_state(self, kid: str, state: str) -> KeyRecord:
        """Move a non-current key to decrypt-only or retired. Retired is final; use `activate` for active."""
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}")
        with self._locked():
            rec = self.record(kid)
            if rec.state == state:
                return rec
            if rec.state == RETIRED:
                raise KeyStateError(f"key {kid} is retired; retired keys can't come back")
            if kid == self._current:
                raise KeyStateError(f"key {kid} is current; activate another key first")
            if state == ACTIVE:
                raise KeyStateError(f"key {kid}: use activate() to make a key current")
            if state == PENDING:
                raise KeyStateError(f"key {kid} is {rec.state}; a key can't go back to pending")
            now = _now()
            new = replace(rec, state=RETIRED, retired_at=now) if state == RETIRED else self._demoted(rec, now)
            self._commit([new if r.kid == kid else r for r in self._records.values()], current=self._current)
        return new

    def publish(self, passphrase: bytes | None, *, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> bytes:
        """The signed key set document (retired keys left out), with the next serial."""
        signer = self._open_signer(self._protector(passphrase))
        with self._locked():
            keys = [KeySetKey(r.kid, r.alg, r.state, self._public[r.kid])
                    for r in self._records.values() if r.state != RETIRED]
            serial = self._serial + 1
            document = build_keyset(keys, self._current, serial, signer, ttl_seconds=ttl_seconds)
            # The serial is stored before the document leaves, so no two documents share one.
            self._commit(list(self._records.values()), current=self._current, serial=serial)
        return document

    def unlock(self, passphrase: bytes | None) -> KeyringUnwrapper:
        """An Unwrapper over this keyring's private keys. Checks the secret now, on the current key."""
        unwrapper = KeyringUnwrapper(self, self._protector(passphrase))
        unwrapper.private_key(self._current)
        return unwrapper

    # -- internals -----------------------------------------------------------------------------

    def _protector(self, passphrase: bytes | None) -> Protector:
        if self._protection == KMS:  # a passphrase, if one happens to be set, plays no part
            return KmsProtector(str(self._optional["kms"]["key_arn"]), self.kms_options)
        if self._protection == PASSPHRASE:
            if not passphrase:
                raise PassphraseRequiredError(
                    f"keyring {self.path} is passphrase-protected: set {PASSPHRASE_ENV} or give a passphrase file")
            return PassphraseProtector(passphrase)
        # master-key mode: a passphrase, if one happens to be set, plays no part.
        try:
            master = (self.path / _MASTER_KEY).read_bytes()
        except OSError as e:
            raise KeyringLockedError(f"keyring {self.path}: can't read {_MASTER_KEY}: {e.strerror}") from None
        if len(master) != MASTER_KEY_SIZE:
            raise KeyringLockedError(f"keyring {self.path}: {_MASTER_KEY} is not {MASTER_KEY_SIZE} bytes")
        return MasterKeyProtector(master)

    def _open_signer(self, protector: Protector) -> ed25519.Ed25519PrivateKey:
        envelope = _read_json(self.path / _PRIVATE / _SIGNER_PRIVATE)
        der = self._open(protector, envelope, key_aad(SIGNER_PURPOSE, self._signer_id))
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey) or signer_id(key.public_key()) != self._signer_id:
            raise KeyringFormatError(f"keyring {self.path}: the protected signer key does not match signer.pem")
        return key

    def _load_private(self, kid: str, protector: Protector) -> rsa.RSAPrivateKey:
        envelope = _read_json(self.path / _PRIVATE / f"{kid}.json")
        der = self._open(protector, envelope, key_aad(KEK_PURPOSE, kid))
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key, rsa.RSAPrivateKey) or thumbprint(key.public_key()) != kid:
            raise KeyringFormatError(f"keyring {self.path}: private key for {kid} does not match its kid")
        return key

    def _open(self, protector: Protector, envelope: Any, aad: bytes) -> bytes:
        try:
            return protector.open(envelope, aad)
        except KeyringLockedError as e:
            raise type(e)(f"keyring {self.path}: {e}") from None

    @staticmethod
    def _demoted(rec: KeyRecord, now: str) -> KeyRecord:
        return replace(rec, state=DECRYPT_ONLY, deactivated_at=now)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._load()  # another process may have changed the keyring since we read it
            yield
        finally:
            os.close(fd)  # releases the lock

    def _commit(self, records: Sequence[KeyRecord], *, current: str, serial: int | None = None) -> None:
        _check_records(records, current, self.path)
        doc = {
            "format": FORMAT,
            "protection": self._protection,
            "current": current,
            "serial": self._serial if serial is None else serial,
            "keys": [r.to_json() for r in records],
            "signer": self._signer_doc,
            **self._optional,
        }
        _write_json(self.path / _KEYRING_JSON, doc)
        self._load()

    def _load(self) -> None:
        try:
            raw = (self.path / _KEYRING_JSON).read_bytes()
        except FileNotFoundError:
            raise KeyringNotFoundError(
                f"no keyring at {self.path} (no {_KEYRING_JSON}; if init was interrupted, remove it and init again)"
            ) from None
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise KeyringFormatError(f"{self.path / _KEYRING_JSON} is not valid JSON: {e}") from None
        required = {"format", "protection", "current", "serial", "keys", "signer"}
        if not isinstance(doc, dict) or not required <= set(doc) <= required | _OPTIONAL_MEMBERS:
            raise KeyringFormatError(f"{self.path / _KEYRING_JSON}: missing or unknown members")
        if doc["format"] != FORMAT:
            raise KeyringFormatError(f"{self.path / _KEYRING_JSON}: unknown format {doc['format']!r}")
        if doc["protection"] not in PROTECTIONS:
            raise KeyringFormatError(f"{self.path / _KEYRING_JSON}: unknown protection {doc['protection']!r}")
        serial, signer_doc = doc["serial"], doc["signer"]
        if not isinstance(serial, int) or isinstance(serial, bool) or serial < 0:
            raise KeyringFormatError(f"{self.path / _KEYRING_JSON}: serial must be a non-negative integer")
        if not isinstance(doc["keys"], list):
            raise KeyringFormatError(f"{self.path / _KEYRING_JSON}: keys must be a list")
        records = [KeyRecord.from_json(r) for r in doc["keys"]]
        _check_records(records, doc["current"], self.path)
        if not isinstance(signer_doc, dict) or not isinstance(signer_doc.get("id"), str):
            raise KeyringFormatError(f"{self.path / _KEYRING_JSON}: signer must name its id")
        public = {r.kid: _load_public(self.path / _PUBLIC / f"{r.kid}.pem", r.kid) for r in records}
        signer = _load_signer_pem(self.path / _SIGNER_PEM)
        if signer_id(signer) != signer_doc["id"]:
            raise KeyringFormatError(f"keyring {self.path}: signer.pem does not match the signer id in keyring.json")
        optional = {name: doc[name] for name in _OPTIONAL_MEMBERS if name in doc}
        _check_optional(optional, doc["protection"], self.path / _KEYRING_JSON)
        self._optional: dict[str, Any] = optional
        self._protection: str = doc["protection"]
        self._current: str = doc["current"]
        self._serial: int = serial
        self._records = {r.kid: r for r in records}
        self._public = public
        self._signer = signer
        self._signer_id: str = signer_doc["id"]
        self._signer_doc: dict[str, Any] = signer_doc


class KeyringUnwrapper:
    """codec's Unwrapper over a keyring's private keys, opened on first use and then kept in memory.

    >>> reader = codec.open_package(f, keyring.unlock(passphrase))
    """

    def __init__(self, keyring: Keyring, protector: Protector) -> None:
        self._keyring = keyring
        self._protector = protector
        # A protector's `cache_seconds` (KMS) bounds how long an opened key stays here; then it is
        # opened again, so revoking the protector's access takes effect within that time.
        ttl = protector.cache_seconds
        self._ttl: float | None = float(ttl) if ttl is not None else None
        self._keys: dict[str, tuple[rsa.RSAPrivateKey, float]] = {}  # kid -> (key, monotonic time opened)

    def __repr__(self) -> str:
        return f"KeyringUnwrapper({str(self._keyring.path)!r})"

    def private_key(self, kid: str) -> rsa.RSAPrivateKey:
        """The private KEK `kid` (any state), opening it with the keyring's secret if not yet open."""
        cached = self._keys.get(kid)
        if cached is not None and (self._ttl is None or time.monotonic() - cached[1] < self._ttl):
            return cached[0]
        self._keys.pop(kid, None)  # expired: dropped before asking again, whatever the answer
        self._keyring.record(kid)
        key = self._keyring._load_private(kid, self._protector)
        self._keys[kid] = (key, time.monotonic())
        return key

    def unwrap(self, wraps: Sequence[Wrap]) -> bytes:
        """The DEK from the first wrap for a key held here that is not retired and has the wrap's alg."""
        failure: AuthenticationError | None = None
        notes = []
        for w in wraps:
            rec = self._keyring._records.get(w.kid)
            if rec is None:
                notes.append(w.kid)
            elif rec.state == RETIRED:
                notes.append(f"{w.kid} (retired)")
            elif rec.alg != w.alg:  # a key is only ever used with its own algorithm, never inferred
                notes.append(f"{w.kid} (wrap is {w.alg}, key is {rec.alg})")
            else:
                try:
                    return unwrap_dek(w, self.private_key(w.kid))
                except AuthenticationError as e:
                    failure = e
        if failure is not None:
            raise failure
        raise NoMatchingKeyError(
            f"no usable key in keyring {self._keyring.path} for the package's wraps: {', '.join(notes) or 'none'}")


def _check_optional(optional: dict[str, Any], protection: str, path: Path) -> None:
    kms = optional.get("kms")
    if (kms is not None) != (protection == KMS):
        raise KeyringFormatError(f"{path}: a kms member goes with, and only with, protection {KMS!r}")
    if kms is not None and (not isinstance(kms, dict) or set(kms) != {"key_id", "key_arn"}
                            or not all(isinstance(v, str) and v for v in kms.values())):
        raise KeyringFormatError(f"{path}: kms must name key_id and key_arn")
    schedule = optional.get("schedule")
    if schedule is not None:
        if not isinstance(schedule, dict) or set(schedule) != {"every", "grace_seconds"}:
            raise KeyringFormatError(f"{path}: schedule must have exactly every and grace_seconds")
        try:
            RotationSchedule.make(schedule["every"], schedule["grace_seconds"])
        except ValueError as e:
            raise KeyringFormatError(f"{path}: schedule: {e}") from None


def _check_records(records: Sequence[KeyRecord], current: object, path: Path) -> None:
    """The keyring's invariants: unique kids, exactly one active key, and it is the current one."""
    kids = [r.kid for r in records]
    if len(set(kids)) != len(kids):
        raise KeyringFormatError(f"keyring {path}: a kid appears twice")
    active = [r.kid for r in records if r.state == ACTIVE]
    if not isinstance(current, str) or active != [current]:
        raise KeyringFormatError(f"keyring {path}: current {current!r} must be the one active key (active: {active})")


def _load_public(path: Path, kid: str) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise KeyringFormatError(f"public key file {path} is missing") from None
    except ValueError:
        raise KeyringFormatError(f"{path} is not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey) or thumbprint(key) != kid:
        raise KeyringFormatError(f"{path} does not hold the RSA key {kid}")  # the kid is recomputed, never trusted
    return key


def _load_signer_pem(path: Path) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (FileNotFoundError, ValueError):
        raise KeyringFormatError(f"{path} is missing or not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyringFormatError(f"{path} is not an Ed25519 public key")
    return key


def _store_kek(path: Path, kid: str, kek: rsa.RSAPrivateKey, protector: Protector) -> None:
    _write_json(path / _PRIVATE / f"{kid}.json", protector.seal(_pkcs8(kek), key_aad(KEK_PURPOSE, kid)))
    write_atomic(path / _PUBLIC / f"{kid}.pem", _spki_pem(kek.public_key()))


def _pkcs8(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _spki_pem(key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _now(at: datetime | None = None) -> str:
    return format_time(at or datetime.now(UTC))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise KeyringFormatError(f"{path} is missing") from None
    except ValueError:
        raise KeyringFormatError(f"{path} is not valid JSON") from None


def _write_json(path: Path, obj: object) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")
