"""Shared pytest fixtures.

tests/ is on sys.path (pyproject.toml's [tool.pytest.ini_options] `pythonpath`), so the support modules
import by name: `support` (the package of shared mechanisms: waits, child processes and their reaper, a
throwaway CA), and the per-area modules built on it (agent_harness, s3_support, lkm_support, ...)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

# --- codec tests: test-only KEKs and an unwrapper over them (independent of keys/) -------------------


@dataclass(frozen=True)
class CodecTestKek:
    """A throwaway RSA KEK: its kid is the RFC 7638 thumbprint, as docs/FORMAT.md §4.3 says."""

    kid: str
    private_key: rsa.RSAPrivateKey

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()


class CodecTestKeyring:
    """codec.Unwrapper over private keys held in memory: the first wrap whose kid it holds."""

    def __init__(self, keys: dict[str, rsa.RSAPrivateKey]) -> None:
        self.keys = keys
        self.calls = 0

    def unwrap(self, wraps: Sequence[object]) -> bytes:
        from mediaseal import codec

        self.calls += 1
        for w in wraps:
            assert isinstance(w, codec.Wrap)
            if w.kid in self.keys:
                return codec.unwrap_dek(w, self.keys[w.kid])
        raise codec.NoMatchingKeyError("no wrap for a key this test keyring holds")


def _new_kek() -> CodecTestKek:
    import independent_decoder

    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return CodecTestKek(independent_decoder.thumbprint(key.public_key()), key)


@pytest.fixture(scope="module")
def codec_kek() -> CodecTestKek:
    """A fresh RSA-3072 KEK, made once per test module (key generation is slow)."""
    return _new_kek()


@pytest.fixture(scope="module")
def codec_kek2() -> CodecTestKek:
    return _new_kek()


@pytest.fixture(scope="module")
def codec_keyring() -> Callable[..., CodecTestKeyring]:
    """make(kek, ...) -> an unwrapper holding those KEKs; `extra` maps more kids to keys (odd pairings)."""

    def make(*keks: CodecTestKek, extra: dict[str, rsa.RSAPrivateKey] | None = None) -> CodecTestKeyring:
        return CodecTestKeyring({k.kid: k.private_key for k in keks} | (extra or {}))

    return make


# --- the agent as a process (tests/agent_harness.py) --------------------------------------------------------


@pytest.fixture(scope="session")
def keyring_template(tmp_path_factory: pytest.TempPathFactory):
    """A passphrase-protected keyring made once per session (RSA keygen is slow): tests copy it."""
    import agent_harness

    return agent_harness.make_keyring(tmp_path_factory.mktemp("kr") / "keyring")


@pytest.fixture
def setup(tmp_path, keyring_template):
    """The usual agent set-up in tmp_path (agent_harness.new_setup): a copy of the template keyring and
    one capture directory of `call` recordings completed by rename."""
    import agent_harness

    return agent_harness.new_setup(tmp_path, keyring_template)


# --- S3: moto's ThreadedMotoServer on loopback, a fault proxy in front of it (tests/s3_support.py) -------


@pytest.fixture(scope="session")
def moto_server():
    """moto on 127.0.0.1:<random port>, with fake AWS credentials in the environment (real ones hidden)."""
    import s3_support

    with s3_support.moto_running() as server:
        yield server


@pytest.fixture
def s3_bucket(moto_server) -> str:
    """A fresh, empty bucket in moto."""
    import s3_support

    return s3_support.make_bucket(moto_server.url)


@pytest.fixture
def fault_proxy(moto_server):
    """A FaultProxy in front of moto (its own thread and loop); `fault_proxy.url` is the endpoint."""
    import s3_support

    proxy = s3_support.FaultProxy(moto_server.host, moto_server.port).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="session", autouse=True)
def _reap_session():
    """No child process outlives the session, even one a module's fixture failed to stop."""
    yield
    from support import process

    process.reap("session")


@pytest.fixture(scope="session", autouse=True)
def _secrets_audit_session():
    """What tests capture from the product's command line (subprocess.run) is registered for the audit."""
    import secrets_audit

    with secrets_audit.recording_subprocess_run():
        yield


@pytest.fixture(autouse=True)
def _secrets_audit(request: pytest.FixtureRequest):
    """After each test: no secret it knows (passphrases, private keys, DEKs, credentials) in any agent log,
    command output, metrics scrape, manifest or log file, and every file and directory of the agent's spool
    and filesystem repository 0600 / 0700 (tests/secrets_audit.py). A finding fails the test naming where."""
    yield
    import secrets_audit
    from support import process

    process.reap("test")  # no child outlives its test; each agent's log lines are registered as it is reaped
    report = secrets_audit.audit_test(request.node)
    if report.findings:
        pytest.fail(report.message(request.node.nodeid), pytrace=False)


def pytest_terminal_summary(terminalreporter) -> None:
    import sys

    audit = sys.modules.get("secrets_audit")
    if audit is not None and audit.TOTALS.tests:
        terminalreporter.write_line(audit.TOTALS.summary())


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A pytest-xdist worker hands its audit totals to the controller (`pytest_testnodedown` there)."""
    import sys

    audit = sys.modules.get("secrets_audit")
    workeroutput = getattr(session.config, "workeroutput", None)
    if audit is not None and workeroutput is not None:
        workeroutput["secrets_audit"] = audit.TOTALS.to_dict()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """The controller under pytest-xdist: one summary line for every worker's audits."""
    totals = getattr(node, "workeroutput", {}).get("secrets_audit")
    if totals is not None:
        import secrets_audit

        secrets_audit.TOTALS.merge(totals)


@pytest.fixture(scope="session", autouse=True)
def _reliability_report():
    """docs/RELIABILITY.md is rewritten from the figures every reliability module collected this session,
    only when MEDIASEAL_RELIABILITY_REPORT=1 (`make soak`, or by hand; see that file's *Regenerating*)."""
    import time

    t0 = time.monotonic()
    yield
    import reliability_support

    reliability_support.write_report(time.monotonic() - t0)


# --- real KEKs without the wait: RSA-3072 generation is slow, so a few are made once per module -------


@pytest.fixture(scope="module")
def kek_pool() -> list[rsa.RSAPrivateKey]:
    from mediaseal.keys.keyring import generate_kek

    return [generate_kek() for _ in range(4)]


@pytest.fixture
def pooled_keks(kek_pool: list[rsa.RSAPrivateKey], monkeypatch: pytest.MonkeyPatch) -> list[rsa.RSAPrivateKey]:
    """Keyrings made in this test get kek_pool[0], kek_pool[1], ... in order (distinct within a test).

    The keys are real RSA-3072 keys from the keyring's own generator; only *when* they are generated
    changes. A test that needs more than the pool holds fails with that reason.
    """
    import mediaseal.keys.keyring

    it = iter(kek_pool)

    def next_kek() -> rsa.RSAPrivateKey:
        kek = next(it, None)
        assert kek is not None, "test needs more pooled KEKs than the pool holds"
        return kek

    monkeypatch.setattr(mediaseal.keys.keyring, "generate_kek", next_kek)
    monkeypatch.delenv("MEDIASEAL_KEYRING_PASSPHRASE", raising=False)
    return kek_pool
