"""The suite's own support (tests/support): waits fail naming what they waited for, a child's exit ends a
wait at once, the reaper kills what a test left running, and the throwaway CA's certificates verify."""

from __future__ import annotations

import re
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest
from support import process
from support.pki import ThrowawayCA
from support.waits import Deadline, until, wait_until

PY = sys.executable


def test_wait_until_returns_the_value_and_fails_naming_what_it_waited_for() -> None:
    box: list[int] = []
    threading.Timer(0.1, box.append, (7,)).start()
    assert wait_until(lambda: box, what="a value") == [7]
    with pytest.raises(AssertionError, match=r"timed out after 0.2 s waiting for the impossible: state 3"):
        wait_until(lambda: False, what="the impossible", timeout=0.2, detail=lambda: "state 3")


async def test_until_polls_on_the_loop() -> None:
    t0 = time.monotonic()
    assert await until(lambda: time.monotonic() - t0 > 0.05, what="50 ms") is True
    with pytest.raises(AssertionError, match="waiting for never"):
        await until(lambda: None, what="never", timeout=0.1)


def test_deadline_shares_one_ceiling() -> None:
    d = Deadline(60, "x")
    assert 59 < d.left() <= 60 and not d.expired()
    assert "waiting for x: why" in str(d.fail("why"))


def test_child_lines_events_and_exit() -> None:
    script = 'import sys; print("plain", file=sys.stderr); print(\'{"event": "hello", "n": 1}\', file=sys.stderr)'
    child = process.Child([PY, "-c", script], capture_stdout=True)
    (hello,) = child.wait_for("hello")
    assert hello["n"] == 1
    line = child.wait_line(re.compile(r"pl(ai)n"))
    assert line.text == "plain" and line.match.group(1) == "ai" and line.t >= child.started
    assert child.finish() == 0
    assert child.lines == ["plain", '{"event": "hello", "n": 1}'] and child.stderr.startswith("plain\n")
    # An exited child ends every later wait at once, with its last lines, not at the ceiling.
    t0 = time.monotonic()
    for _ in range(2):
        with pytest.raises(AssertionError, match=r"exited \(0\) while waiting for 'never'"):
            child.wait_for("never")
    with pytest.raises(AssertionError, match="a line matching 'never'"):
        child.wait_line(re.compile("never"))
    assert time.monotonic() - t0 < 30


def test_reap_kills_what_a_test_left_running_and_leaves_session_children() -> None:
    left = process.Child([PY, "-c", "import time; time.sleep(600)"])
    kept = process.Child([PY, "-c", "import time; time.sleep(600)"], lifetime="session")
    process.reap("test")
    assert left.proc.returncode is not None and left.proc.returncode < 0
    assert kept.alive()
    assert kept.stop() != 0
    process.reap("session")


def test_child_env_drops_mediaseal_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDIASEAL_AGENT__ID", "from-the-test-runner")
    env = process.child_env({"A": "1"}, B="2")
    assert "MEDIASEAL_AGENT__ID" not in env and env["A"] == "1" and env["B"] == "2"
    assert env["PYTHONUNBUFFERED"] == "1"


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext, hostname: str) -> None:
    """A TLS handshake in memory (no sockets): raises ssl.SSLError if either side refuses the other."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, side in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


def test_throwaway_ca_issues_what_tls_verifies(tmp_path: Path) -> None:
    ca = ThrowawayCA()
    ca_pem = ca.write(tmp_path / "ca.pem")
    server = ca.issue(tmp_path, "server", "localhost", hosts=("localhost", "127.0.0.1"))
    client = ca.issue(tmp_path, "export-1", "export-1", client=True)
    assert oct(server.key.stat().st_mode & 0o777) == "0o600" and oct(ca_pem.stat().st_mode & 0o777) == "0o644"
    srv_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_pem))
    srv_ctx.load_cert_chain(server.cert, server.key)
    srv_ctx.verify_mode = ssl.CERT_REQUIRED
    cli_ctx = ssl.create_default_context(cafile=str(ca_pem))
    cli_ctx.load_cert_chain(client.cert, client.key)
    for hostname in ("localhost", "127.0.0.1"):
        _handshake(cli_ctx, srv_ctx, hostname)
    stranger = ssl.create_default_context(cafile=str(ThrowawayCA("untrusted").write(tmp_path / "other.pem")))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(stranger, srv_ctx, "localhost")
