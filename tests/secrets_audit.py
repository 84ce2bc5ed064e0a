"""Suite-wide secrets and file-mode audit (issue 9): no secret the test knows in anything the product said
or left behind, and every file the agent made is 0600 (directories 0700).

What a test registers, as it runs (hooks in agent_harness.py and conftest.py):
- every agent subprocess's log lines (registered when agent_harness reaps it) and its Setup: spool,
  filesystem repository or S3 bucket, keyring, and the passphrases or credentials in its environment;
- /metrics, /readyz and /healthz of an agent with a metrics listener, scraped as the harness stops it;
- every output a test captures from the product's command line through subprocess.run (stdout, stderr,
  and the secrets its environment and arguments carry: passphrases, passphrase files, keyrings, key
  files, packages), and the in-process output pytest captured for the test (stdout, stderr, log);
- at the end: the spool's manifests and every other non-package file of spool and filesystem repository,
  the headers of the packages, and the *.log / *.jsonl files under the test's tmp_path.

The secrets it knows: the harness passphrase and any passphrase or credential a test handed the product,
every private key of every keyring involved (RSA KEKs and the Ed25519 key set signer: PEM lines, and
d, p, q, dp, dq, qi in raw, hex, decimal, base64 and base64url) and of every PEM key file under tmp_path,
a master.key, the DEK (and the payload and header-MAC keys derived from it) of every package the spool
and repository hold at the end (unwrapped with the keyring: the test knows them; at most MAX_DEKS a test,
spread evenly), the AWS credentials of the moto fixture (tests/s3_support.aws_test_env), and the LKM
client secrets by their shape (lkm_support.secret).

    report = audit(registry, tmp_path=..., moto_url=...)   # what the conftest fixture does after a test
    report.findings                                         # ["agent #1 log line 7: DEK of ... (hex)", ...]

A finding fails the test naming where; TOTALS sums what was covered for the session summary line.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import re
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent_harness import Agent

MAX_DEKS = 24  # packages whose DEK is unwrapped per test (an RSA decrypt each), spread evenly over them all
MAX_TEXT = 16 << 20  # bytes of one captured output scanned (a decrypted recording on stdout is cut here)
MAX_FILE = 1 << 20  # bytes of one spool or repository file scanned
MAX_KEY_FILE = 32 << 10  # a PEM private key file is smaller than this
S3_HEAD = 64 << 10  # bytes fetched from the start of an S3 package: its header
MAX_FINDINGS_SHOWN = 12
MIN_SECRET = 8  # shorter values are not looked for (they would match by chance)
SECRET_ENV = re.compile(r"PASSPHRASE|SECRET|PASSWORD|TOKEN|CREDENTIAL")
NOT_A_VALUE = re.compile(r"(_FILE|_PATH|_DIR|_URL)$")
# Secrets recognised by their shape: the tests' LKM client secrets (HMAC and Hawk keys), lkm_support.secret.
PATTERNS = {"LKM client secret": re.compile(rb"test-secret-[\w.-]{1,64}-x{32}")}


# -- secrets and the forms they are looked for in ---------------------------------------------------------------


@dataclass(frozen=True)
class Secret:
    label: str
    needles: tuple[tuple[str, bytes], ...]  # (encoding, bytes)


def encodings(label: str, value: bytes, *, prefix: int | None = None, raw: bool = True,
              upper: bool = True) -> Secret:
    """`value` raw, in hex (both cases), base64 and base64url (unpadded); with `prefix`, the first
    `prefix` bytes of each form (a long value leaks from its start)."""
    forms: list[tuple[str, bytes]] = [("raw", value)] if raw else []
    forms.append(("hex", value.hex().encode()))
    if upper:
        forms.append(("HEX", value.hex().upper().encode()))
    forms += [("base64", base64.b64encode(value).rstrip(b"=")),
              ("base64url", base64.urlsafe_b64encode(value).rstrip(b"="))]
    seen: set[bytes] = set()
    needles: list[tuple[str, bytes]] = []
    for name, form in forms:
        form = form[:prefix] if prefix else form
        if len(form) >= MIN_SECRET and form not in seen:
            seen.add(form)
            needles.append((name, form))
    return Secret(label, tuple(needles))


def text_secret(label: str, value: str | bytes) -> Secret | None:
    """A passphrase or credential: as given, and hex / base64 of it."""
    raw = value.encode() if isinstance(value, str) else value
    raw = raw.strip()
    return encodings(label, raw, upper=False) if len(raw) >= MIN_SECRET else None


def _uint(n: int) -> bytes:
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")


def private_key_secrets(label: str, key: Any) -> list[Secret]:
    """Needles for one private key (RSA, EC or Ed25519): PEM lines of its PKCS#8 and traditional forms
    (they hold the secret at every position) and its secret numbers in every common encoding."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    pem_lines: list[bytes] = []
    formats = [ser.PrivateFormat.PKCS8]
    if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        formats.append(ser.PrivateFormat.TraditionalOpenSSL)
    for fmt in formats:
        body = key.private_bytes(ser.Encoding.PEM, fmt, ser.NoEncryption()).splitlines()[1:-1]
        # The lines that hold private numbers: an RSA key's after its modulus (the first quarter, public),
        # an EC or Ed25519 key's first (the scalar or seed; the public point follows).
        pem_lines += body[len(body) // 4:-1] if isinstance(key, rsa.RSAPrivateKey) else body[:1]
    out = [Secret(f"{label} (PEM)", tuple(("PEM line", line) for line in pem_lines if len(line) >= 40))]
    numbers: list[tuple[str, int]] = []
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        numbers = [("d", n.d), ("p", n.p), ("q", n.q), ("dp", n.dmp1), ("dq", n.dmq1), ("qi", n.iqmp)]
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        numbers = [("d", key.private_numbers().private_value)]
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        out.append(encodings(f"{label} (seed)", key.private_bytes_raw()))
    for name, value in numbers:
        raw = _uint(value)
        s = encodings(f"{label} ({name})", raw, prefix=48)
        # Raw bytes from inside the number (a DER blob holds them at any offset), and its decimal digits.
        extra = (("raw", raw[8:40]),) if len(raw) >= 40 else ()
        out.append(Secret(s.label, s.needles + extra + (("decimal", str(value)[:48].encode()),)))
    return out


# -- what one test registers -----------------------------------------------------------------------------------------


@dataclass
class Tree:
    """A directory the agent owns: checked for modes (and its files for secrets)."""

    root: Path
    include_root: bool  # the spool root is the agent's; a configured repository's root is the operator's
    planted: set[tuple[str, int]] | None = None  # (path, inode) present before the first agent of the test


@dataclass
class Registry:
    texts: list[tuple[str, bytes]] = field(default_factory=list)  # (where, content)
    secrets: list[Secret] = field(default_factory=list)
    trees: dict[Path, Tree] = field(default_factory=dict)
    keyrings: dict[Path, list[bytes | None]] = field(default_factory=dict)  # path -> passphrases to try
    key_files: set[Path] = field(default_factory=set)
    packages: set[Path] = field(default_factory=set)  # package files named on a command line
    buckets: set[tuple[str, str, str]] = field(default_factory=set)  # (endpoint, bucket, prefix)
    agents: int = 0
    cli_runs: int = 0
    scrapes: int = 0
    log_lines: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- the agent (agent_harness) ---------------------------------------------------------------------

    def agent_started(self, agent: Agent) -> int:
        """Before the process starts: the set-up's trees (and what the test put there itself), keyring,
        repository and secrets. Returns the agent's number in this test."""
        import agent_harness

        setup = agent.setup
        spool = Path(setup.buffer.get("path", setup.spool))
        url = str(setup.repo.get("url", f"file://{setup.repository}"))
        with self._lock:
            self.agents += 1
            number = self.agents
            self.tree(spool, include_root=True)
            if url.startswith("file://"):
                self.tree(Path(url.removeprefix("file://")), include_root=False)
            elif url.startswith("s3://"):
                bucket, _, prefix = url.removeprefix("s3://").partition("/")
                self.buckets.add((str(setup.repo.get("endpoint_url", "")), bucket, prefix))
        passphrases: list[bytes | None] = [agent_harness.PASSPHRASE]
        for name, value in (agent.env or {}).items():
            self.env_secret(name, value, f"agent #{number}")
            if name == "MEDIASEAL_KEYRING_PASSPHRASE" and value:
                passphrases.insert(0, value.encode())
        self.keyring(Path(setup.keyring), passphrases)
        return number

    def agent_reaped(self, agent: Agent, number: int) -> None:
        lines = list(agent.lines)
        with self._lock:
            self.log_lines += len(lines)
        self.text(f"agent #{number} log", "\n".join(lines).encode(errors="replace"))

    def scrape(self, number: int, address: str) -> None:
        """/metrics, /readyz and /healthz of a running agent (before the harness stops it)."""
        for path in ("/metrics", "/readyz", "/healthz"):
            try:
                # 30 s: a loaded machine answers slowly, and a scrape cut short would go unaudited.
                with urllib.request.urlopen(f"http://{address}{path}", timeout=30) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as e:  # /readyz answers 503 with its reasons
                body = e.read()
            except OSError:
                return
            with self._lock:
                self.scrapes += 1
            self.text(f"agent #{number} {path}", body)

    # -- generic -----------------------------------------------------------------------------------------

    def text(self, where: str, data: bytes | str | None) -> None:
        if data:
            blob = data.encode(errors="replace") if isinstance(data, str) else bytes(data)
            with self._lock:
                self.texts.append((where, blob))

    def secret(self, secret: Secret | None) -> None:
        if secret is not None and secret.needles:
            with self._lock:
                self.secrets.append(secret)

    def env_secret(self, name: str, value: str, whose: str) -> None:
        if SECRET_ENV.search(name) and not NOT_A_VALUE.search(name):
            self.secret(text_secret(f"{name} given to {whose}", value))

    def tree(self, root: Path, *, include_root: bool) -> None:
        """Called with the lock held. The first registration of a root in a test snapshots what is there."""
        if root not in self.trees:
            self.trees[root] = Tree(root, include_root, set(_inodes(root, include_root)))

    def keyring(self, path: Path, passphrases: Sequence[bytes | None]) -> None:
        with self._lock:
            known = self.keyrings.setdefault(path, [])
            known += [p for p in passphrases if p not in known]

    # -- the command line (subprocess.run) ---------------------------------------------------------------

    def cli_run(self, argv: Sequence[str], env: dict[str, str] | None, cwd: str | None,
                stdout: bytes | str | None, stderr: bytes | str | None) -> None:
        with self._lock:
            self.cli_runs += 1
            n = self.cli_runs
        cli = "mediaseal.agent.cli"
        shown = " ".join(a for a in argv[argv.index(cli) + 1:][:3]) if cli in argv else argv[0]
        where = f"`mediaseal {shown}` (command {n})"
        self.text(f"{where} stdout", stdout[:MAX_TEXT] if stdout else None)
        self.text(f"{where} stderr", stderr[:MAX_TEXT] if stderr else None)
        passphrases: list[bytes | None] = [None]
        for name, value in (os.environ if env is None else env).items():
            if name.startswith(("MEDIASEAL_", "AWS_")):
                self.env_secret(name, value, where)
            if name == "MEDIASEAL_KEYRING_PASSPHRASE" and value:
                passphrases.insert(0, value.encode())
        base = Path(cwd) if cwd else Path.cwd()
        paths = [base / a for a in argv[1:] if a and not a.startswith("-") and len(a) < 4096]
        for flag, value in itertools.pairwise(argv):
            if flag == "--passphrase-file":
                with contextlib.suppress(OSError):
                    pp = (base / value).read_bytes().strip()
                    passphrases.insert(0, pp)
                    self.secret(text_secret(f"passphrase file {value}", pp))
        for flag, value in itertools.pairwise(argv):
            if flag == "--keyring":
                self.keyring(base / value, passphrases)
        with self._lock:
            for p in paths:
                if p.suffix == ".mseal":
                    self.packages.add(p)
                elif p.suffix in (".key", ".pem"):
                    self.key_files.add(p)


REGISTRY = Registry()  # what the running test registered; emptied after its audit


def _inodes(root: Path, include_root: bool) -> Iterator[tuple[str, int]]:
    for p, st in _walk(root, include_root):
        yield str(p), st.st_ino


def _walk(root: Path, include_root: bool) -> Iterator[tuple[Path, os.stat_result]]:
    """(path, lstat) of everything under root (and root itself if asked); nothing if root is absent."""
    try:
        st = os.lstat(root)
    except OSError:
        return
    if include_root:
        yield root, st
    if not stat.S_ISDIR(st.st_mode):
        return
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            p = Path(dirpath) / name
            with contextlib.suppress(OSError):
                yield p, os.lstat(p)


# -- key material (cached for the session: RSA keys are slow to open) ------------------------------------------------


_KEYS: dict[str, Any] = {}  # kid -> RSA private key
_KEY_SECRETS: dict[str, list[Secret]] = {}  # kid or signer id or file -> needles
_KEY_FILES: dict[tuple[str, int, int], str | None] = {}  # (path, mtime_ns, size) -> cache id (None: not a key)


def _keyring_secrets(path: Path, passphrases: Sequence[bytes | None], moto_url: str | None,
                     counts: Counter[str]) -> tuple[list[Secret], dict[str, Any]]:
    """Needles for a keyring's private keys (KEKs and signer) and master.key, and kid -> private key."""
    from mediaseal.keys.keyring import KMS, MASTER_KEY, Keyring
    from mediaseal.keys.kms import KmsOptions

    try:
        ring = Keyring.open(path)
    except Exception:  # not a keyring (any more): nothing to know
        counts["keyrings unreadable"] += 1
        return [], {}
    kids = [r.kid for r in ring.records()]
    secrets: list[Secret] = []
    if ring.protection == MASTER_KEY:
        with contextlib.suppress(OSError):
            secrets.append(encodings(f"master.key of {path}", (path / "master.key").read_bytes()))
    if any(k not in _KEYS for k in kids) or ring.signer_id not in _KEY_SECRETS:
        if ring.protection == KMS:
            if moto_url is None:
                counts["keyrings not opened"] += 1
                return secrets, {}
            ring = Keyring.open(path, kms=KmsOptions(endpoint_url=moto_url, connect_timeout=2, read_timeout=5,
                                                     max_attempts=1, cache_seconds=0))
            candidates: Sequence[bytes | None] = [None]
        else:
            candidates = [p for p in passphrases if p] if ring.protection != MASTER_KEY else [None]
        for pp in candidates:
            try:
                protector = ring._protector(pp)
                unwrapper = ring.unlock(pp)
                for kid in kids:
                    if kid not in _KEYS:
                        with contextlib.suppress(Exception):  # a destroyed key has no private part
                            _KEYS[kid] = unwrapper.private_key(kid)
                            _KEY_SECRETS[kid] = private_key_secrets(f"private KEK {kid[:12]}", _KEYS[kid])
                if ring.signer_id not in _KEY_SECRETS:
                    signer = ring._open_signer(protector)
                    _KEY_SECRETS[ring.signer_id] = private_key_secrets(f"key set signer {ring.signer_id[:12]}",
                                                                       signer)
                counts["keyrings opened"] += 1
                break
            except Exception:
                continue
        else:
            counts["keyrings not opened"] += 1
    for k in (*kids, ring.signer_id):
        secrets += _KEY_SECRETS.get(k, [])
    return secrets, {k: _KEYS[k] for k in kids if k in _KEYS}


def _key_file_secrets(path: Path) -> list[Secret]:
    from cryptography.hazmat.primitives import serialization

    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_KEY_FILE:
            return []
        ident = (str(path), st.st_mtime_ns, st.st_size)
        if ident not in _KEY_FILES:
            _KEY_FILES[ident] = None
            data = path.read_bytes()
            if b"PRIVATE KEY-----" in data and b"ENCRYPTED" not in data:
                key = serialization.load_pem_private_key(data, password=None)
                _KEY_FILES[ident] = f"file:{ident}"
                _KEY_SECRETS[f"file:{ident}"] = private_key_secrets(f"private key {path.name}", key)
    except (OSError, ValueError, TypeError):
        return []
    cache = _KEY_FILES.get(ident)
    return _KEY_SECRETS.get(cache, []) if cache else []


# -- packages: their DEKs ----------------------------------------------------------------------------------------------


def _spread(items: Sequence[Any], n: int) -> list[Any]:
    if len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def _dek_secrets(name: str, head: bytes, keys: dict[str, Any], counts: Counter[str]) -> list[Secret]:
    """The DEK of the package whose first bytes are `head`, and the body and header-MAC keys derived from it."""
    from mediaseal import codec

    try:
        header = codec.parse_header(head)
    except codec.CodecError:
        counts["package headers unreadable"] += 1
        return []
    for w in header.wraps:
        if w.kid in keys:
            try:
                dek = codec.unwrap_dek(w, keys[w.kid])
                derived = header.open(dek)
            except codec.CodecError:
                continue
            counts["DEKs"] += 1
            return [encodings(f"DEK of {name}", dek),
                    encodings(f"payload key of {name}", derived.payload, upper=False),
                    encodings(f"header MAC key of {name}", derived.mac, upper=False)]
    counts["packages without a known key"] += 1
    return []


def _local_packages(walked: Iterable[tuple[Path, os.stat_result]], named: Iterable[Path]) -> list[Path]:
    found = set(named)
    found.update(p for p, st in walked if stat.S_ISREG(st.st_mode) and ".mseal" in p.name)
    return sorted(found)


_S3: dict[str, Any] = {}


def _s3_heads(endpoint: str, bucket: str, prefix: str, limit: int, counts: Counter[str]) -> list[tuple[str, bytes]]:
    import s3_support

    try:
        client = _S3.get(endpoint) or _S3.setdefault(endpoint, s3_support.boto3_client(endpoint, validate=False))
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", []) if o["Key"].endswith(".mseal")]
        counts["packages"] += len(keys)
        return [(f"s3://{bucket}/{k}", client.get_object(Bucket=bucket, Key=k, Range=f"bytes=0-{S3_HEAD - 1}")
                 ["Body"].read()) for k in _spread(sorted(keys), limit)]
    except Exception:
        counts["buckets unreadable"] += 1
        return []


# -- the audit ---------------------------------------------------------------------------------------------------


@dataclass
class Report:
    findings: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def message(self, test: str = "this test") -> str:
        shown = self.findings[:MAX_FINDINGS_SHOWN]
        more = len(self.findings) - len(shown)
        return (f"secrets audit: {len(self.findings)} problem(s) in what {test} left behind:\n  "
                + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""))


def _constant_secrets() -> list[Secret]:
    import agent_harness

    out = [text_secret("the harness keyring passphrase", agent_harness.PASSPHRASE)]
    lkm = sys.modules.get("lkm_support")
    if lkm is not None:
        out.append(text_secret("the LKM test passphrase", lkm.PASSPHRASE))
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        if os.environ.get(name):
            out.append(text_secret(f"{name} (moto's credentials)", os.environ[name]))
    return [s for s in out if s is not None]


def _find(where: str, blob: bytes, secrets: Sequence[Secret], counts: Counter[str]) -> list[str]:
    counts["texts"] += 1
    counts["bytes scanned"] += len(blob)
    out: list[str] = []
    for s in secrets:
        for encoding, needle in s.needles:
            i = blob.find(needle)
            if i >= 0:
                out.append(f"{where}{_line(blob, i)}: {s.label} ({encoding})")
                break
    for label, pattern in PATTERNS.items():
        m = pattern.search(blob)
        if m:
            out.append(f"{where}{_line(blob, m.start())}: {label} {m.group()[:20].decode(errors='replace')}...")
    return out


def _line(blob: bytes, i: int) -> str:
    newline = b"\n"
    return f" line {blob.count(newline, 0, i) + 1}" if newline in blob else ""


def _mode_problems(tree: Tree, walked: Iterable[tuple[Path, os.stat_result]], counts: Counter[str]) -> list[str]:
    out: list[str] = []
    for p, st in walked:
        if stat.S_ISLNK(st.st_mode):
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        counts["dirs mode-checked" if is_dir else "files mode-checked"] += 1
        want = 0o700 if is_dir else 0o600
        mode = stat.S_IMODE(st.st_mode)
        if mode != want:
            if tree.planted and (str(p), st.st_ino) in tree.planted:
                counts["planted by the test, not checked"] += 1
                continue
            out.append(f"mode {mode:04o} (want {want:04o}) on {'directory' if is_dir else 'file'} {p}")
    return out


def audit(reg: Registry, *, tmp_path: Path | None = None, moto_url: str | None = None,
          captured: Sequence[tuple[str, str]] = ()) -> Report:
    """Everything `reg` holds, checked against every secret the test knows; the agent's trees for modes."""
    t0 = time.monotonic()
    r = Report()
    c = r.counts
    secrets = _constant_secrets() + list(reg.secrets)
    keys: dict[str, Any] = {}
    for path, passphrases in reg.keyrings.items():
        found, ring_keys = _keyring_secrets(path, passphrases, moto_url, c)
        secrets += found
        keys.update(ring_keys)
    key_files = set(reg.key_files)
    tmp_files = _files_by_suffix(tmp_path, (".key", ".pem", ".log", ".jsonl")) if tmp_path is not None else []
    key_files.update(p for p in tmp_files if p.suffix in (".key", ".pem"))
    for p in sorted(key_files):
        found = _key_file_secrets(p)
        c["key files"] += bool(found)
        secrets += found
    texts = list(reg.texts) + [(f"captured {what}", body.encode(errors="replace")) for what, body in captured]
    # Packages: their DEKs (the spool's and the repository's, sampled evenly), and their headers as texts.
    walked = {tree.root: list(_walk(tree.root, tree.include_root)) for tree in reg.trees.values()}  # once each
    everything = [entry for entries in walked.values() for entry in entries]
    local = _local_packages(everything, reg.packages)
    c["packages"] += len(local)
    heads: list[tuple[str, bytes]] = []
    for p in _spread(local, MAX_DEKS):
        with contextlib.suppress(OSError), open(p, "rb") as f:
            heads.append((str(p), f.read(S3_HEAD)))
    for endpoint, bucket, prefix in sorted(reg.buckets):
        heads += _s3_heads(moto_url or endpoint, bucket, prefix, max(0, MAX_DEKS - len(heads)), c)
    for name, head in heads:
        for s in _dek_secrets(name, head, keys, c):
            secrets.append(s)
            texts.append((f"header of package {name}", head[:_header_size(head)]))
    # Files the agent left: manifests and anything else that is not a package.
    for p, st in everything:
        if stat.S_ISREG(st.st_mode) and ".mseal" not in p.name:
            with contextlib.suppress(OSError), open(p, "rb") as f:
                texts.append((f"file {p}", f.read(MAX_FILE)))
            c["files scanned"] += 1
    for p in tmp_files:
        if p.suffix in (".log", ".jsonl"):
            with contextlib.suppress(OSError), open(p, "rb") as f:
                texts.append((f"log file {p}", f.read(MAX_TEXT)))
                c["log files"] += 1
    secrets = list({s.needles: s for s in secrets}.values())  # each once (a run registers its env again)
    c["secrets"] += len(secrets)
    c["needles"] += sum(len(s.needles) for s in secrets)
    for where, blob in texts:
        r.findings += _find(where, blob, secrets, c)
    for tree in reg.trees.values():
        r.findings += _mode_problems(tree, walked[tree.root], c)
    c["agents"] += reg.agents
    c["agent log lines"] += reg.log_lines
    c["command outputs"] += reg.cli_runs
    c["metrics scrapes"] += reg.scrapes
    r.seconds = time.monotonic() - t0
    return r


def _files_by_suffix(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return [Path(d) / n for d, _, names in os.walk(root) for n in names if n.endswith(suffixes)]


def _header_size(head: bytes) -> int:
    from mediaseal import codec

    try:
        return int(codec.parse_header(head).size)
    except codec.CodecError:
        return 0


# -- the hooks' side: one test's audit, the session's totals ---------------------------------------------


@dataclass
class Totals:
    tests: int = 0
    failed: int = 0
    seconds: float = 0.0
    slowest: tuple[float, str] = (0.0, "")
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, report: Report, test: str = "") -> None:
        self.tests += 1
        self.failed += bool(report.findings)
        self.seconds += report.seconds
        self.slowest = max(self.slowest, (report.seconds, test))
        self.counts.update(report.counts)

    def to_dict(self) -> dict[str, Any]:
        """For a pytest-xdist worker to hand its totals to the controller (`workeroutput` takes JSON-able data)."""
        return {"tests": self.tests, "failed": self.failed, "seconds": self.seconds,
                "slowest": list(self.slowest), "counts": dict(self.counts)}

    def merge(self, d: dict[str, Any]) -> None:
        self.tests += d["tests"]
        self.failed += d["failed"]
        self.seconds += d["seconds"]
        self.slowest = max(self.slowest, (float(d["slowest"][0]), str(d["slowest"][1])))
        self.counts.update(d["counts"])

    def summary(self) -> str:
        c = self.counts
        return (f"secrets audit: {self.tests} tests, {self.failed} with findings, {self.seconds:.1f} s"
                f" (slowest {self.slowest[0]:.2f} s: {self.slowest[1]}); "
                f"{c['agents']} agents, {c['agent log lines']} log lines, {c['command outputs']} command outputs, "
                f"{c['metrics scrapes']} scrapes, {c['files scanned']} spool/repository files, "
                f"{c['log files']} log files, {c['texts']} texts ({c['bytes scanned'] / 1e6:.1f} MB) scanned; "
                f"modes of {c['files mode-checked']} files and {c['dirs mode-checked']} directories checked"
                f" ({c['planted by the test, not checked']} planted by tests); "
                f"secrets known: {c['secrets']} ({c['needles']} forms), DEKs {c['DEKs']} of {c['packages']} "
                f"packages, keyrings opened {c['keyrings opened']} / not {c['keyrings not opened']}, "
                f"key files {c['key files']}; not audited: {c['packages without a known key']} packages without a "
                f"known key, {c['buckets unreadable']} buckets, {c['package headers unreadable']} headers")


TOTALS = Totals()


def audit_test(node: Any) -> Report:
    """The conftest fixture's call after a test (its agents reaped): audit and empty the registry."""
    global REGISTRY
    reg, REGISTRY = REGISTRY, Registry()
    funcargs = getattr(node, "funcargs", {})
    tmp_path = funcargs.get("tmp_path")
    moto = funcargs.get("moto_server")
    captured = [(f"{when} {key}", body) for when, key, body in getattr(node, "_report_sections", [])]
    report = audit(reg, tmp_path=tmp_path if isinstance(tmp_path, Path) else None,
                   moto_url=getattr(moto, "url", None), captured=captured)
    TOTALS.add(report, getattr(node, "nodeid", ""))
    return report


@contextlib.contextmanager
def recording_subprocess_run() -> Iterator[None]:
    """For the session: what tests capture from the product's command line through subprocess.run is
    registered (the call itself is unchanged)."""
    real = subprocess.run

    def run(*popenargs: Any, **kwargs: Any) -> Any:
        try:
            result = real(*popenargs, **kwargs)
        except subprocess.SubprocessError as e:
            _register_run(popenargs, kwargs, getattr(e, "output", None), getattr(e, "stderr", None))
            raise
        _register_run(popenargs, kwargs, result.stdout, result.stderr)
        return result

    subprocess.run = run
    try:
        yield
    finally:
        subprocess.run = real


def _register_run(popenargs: tuple[Any, ...], kwargs: dict[str, Any], out: Any, err: Any) -> None:
    args = popenargs[0] if popenargs else kwargs.get("args")
    if isinstance(args, (str, bytes, os.PathLike)):
        argv = [os.fsdecode(args)]
    elif args is None:
        return
    else:
        argv = [os.fsdecode(a) for a in args]
    if "mediaseal.agent.cli" not in argv and not Path(argv[0]).name.startswith("mediaseal"):
        return
    with contextlib.suppress(Exception):  # never disturbs the test: a bug here shows as a missing count
        REGISTRY.cli_run(argv, kwargs.get("env"), kwargs.get("cwd") and os.fsdecode(kwargs["cwd"]), out, err)
