"""One agent owns a spool and a capture directory (DESIGN invariant 10; issue 14 observation 6).

A copy-pasted config started twice delivered 34 of 40 recordings twice, under two agent ids. Now the
first agent holds an flock on `<spool>/agent.lock` and on each capture directory's own descriptor, and
a second one refuses to start: exit 4, one line naming the holder (pid, agent id, config path).
Real processes, real locks; synchronised on the agent's log events.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from agent_harness import Agent, Setup, decrypt_all, drop, make_keyring
from reliability_support import assert_zero, record_run, stamp

EXIT_OWNED = 4  # docs/OPERATIONS.md, "How the service behaves"


@pytest.fixture(scope="module")
def keyring_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keyring(tmp_path_factory.mktemp("kr") / "keyring")


def _setup(root: Path, template: Path, capture: Path) -> Setup:
    root.mkdir(parents=True, exist_ok=True)
    return Setup(root=root, keyring=make_keyring(root / "keyring", template),
                 watches=[{"path": str(capture), "kind": "call", "completion": "rename"}])


def _refusal(agent: Agent) -> str:
    lines = [line for line in agent.lines if "owned by" in line]
    assert len(lines) == 1, agent.lines
    assert not any("Traceback" in line for line in agent.lines), agent.lines
    return lines[0]


def test_a_second_agent_on_the_same_spool_refuses_to_start(tmp_path: Path, keyring_template: Path) -> None:
    setup = _setup(tmp_path, keyring_template, tmp_path / "capture")
    first = Agent(setup)
    first.wait_for("ready")
    second = Agent(setup, env={"MEDIASEAL_AGENT__ID": "copy-of-test-agent"})
    assert second.exited() == EXIT_OWNED, second.lines
    line = _refusal(second)
    cfg = str(setup.root / "mediaseal.toml")
    assert f"pid {first.proc.pid}" in line and "test-agent" in line and cfg in line, line
    assert str(setup.spool) in line, line
    # The first goes on undisturbed.
    sha = drop(setup.capture(), "one.wav", os.urandom(20_000))
    first.wait_for("delivered")
    assert first.stop() == 0
    assert decrypt_all(setup.repository, setup.keyring) == {"one.wav": [sha]}


def test_a_second_agent_on_the_same_capture_directory_refuses_to_start(tmp_path: Path,
                                                                       keyring_template: Path) -> None:
    capture = tmp_path / "shared-capture"
    a = _setup(tmp_path / "a", keyring_template, capture)
    b = _setup(tmp_path / "b", keyring_template, capture)  # its own spool and repository
    first = Agent(a)
    first.wait_for("ready")
    second = Agent(b, env={"MEDIASEAL_AGENT__ID": "agent-b"})
    assert second.exited() == EXIT_OWNED, second.lines
    line = _refusal(second)
    assert str(capture) in line and f"pid {first.proc.pid}" in line and "test-agent" in line, line
    assert str(a.root / "mediaseal.toml") in line, line
    t0 = time.time()
    ledger = {f"r{i}.wav": drop(capture, f"r{i}.wav", os.urandom(5_000)) for i in range(10)}
    times = [stamp(d) - t0 for d in first.wait_for("delivered", count=len(ledger))]
    assert first.stop() == 0
    assert decrypt_all(a.repository, a.keyring) == {n: [h] for n, h in ledger.items()}
    assert not list(b.repository.rglob("*.mseal"))  # delivered once, by one agent
    assert_zero(record_run("two agents on one capture directory (the second refused)", a, ledger,
                           [min(times)], [max(times)]))

    # Once the first has stopped, its locks are gone with it: the second starts.
    again = Agent(b, env={"MEDIASEAL_AGENT__ID": "agent-b"})
    again.wait_for("ready")
    assert again.stop() == 0
    assert not (capture / "agent.lock").exists() and sorted(os.listdir(capture)) == []  # nothing planted there


class _CaptureLater(Setup):
    """The capture directory is not there when the agent starts (a share mounted later)."""

    def config(self) -> Path:
        cfg = super().config()
        if self.capture().exists() and not any(self.capture().iterdir()):
            self.capture().rmdir()
        return cfg


def test_a_capture_directory_that_appears_later_is_sealed_by_one_agent_only(tmp_path: Path,
                                                                             keyring_template: Path) -> None:
    capture = tmp_path / "mnt" / "capture"
    setups = [_CaptureLater(root=tmp_path / n, keyring=make_keyring(tmp_path / n / "keyring", keyring_template),
                            watches=[{"path": str(capture), "kind": "call", "completion": "rename"}])
              for n in ("a", "b")]
    agents = [Agent(s, env={"MEDIASEAL_AGENT__ID": f"agent-{i}"}) for i, s in enumerate(setups)]
    for agent in agents:
        agent.wait_for("ready")
    staging = tmp_path / "mnt" / ".staging"
    staging.mkdir(parents=True)
    ledger = {f"m{i}.wav": drop(staging, f"m{i}.wav", os.urandom(4_000)) for i in range(10)}
    staging.rename(capture)  # "mounted", with recordings already in it
    verdicts = [_verdict(a) for a in agents]  # each agent's probe: ours (watch-ready), or another's
    assert sorted(verdicts) == ["owned-by-another", "watch-ready"], [a.lines[-5:] for a in agents]
    winner = agents[verdicts.index("watch-ready")]
    winner.wait_for("delivered", count=len(ledger), timeout=120)
    for agent in agents:
        assert agent.stop() == 0
    delivered = [decrypt_all(s.repository, s.keyring) for s in setups]
    assert sorted(len(d) for d in delivered) == [0, len(ledger)], delivered
    assert {n: [h] for n, h in ledger.items()} in delivered


def _verdict(agent: Agent) -> str:
    (ev,) = agent.wait_for(("watch-ready", "watch-not-ready"), timeout=60,
                           where=lambda d: d["event"] == "watch-ready" or "owned by" in d.get("reason", ""))
    return "watch-ready" if ev["event"] == "watch-ready" else "owned-by-another"
