"""agent.config: the TOML file, MEDIASEAL_* overrides, and one-line errors naming the offending key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mediaseal.agent.config import (
    AgentConfig,
    ConfigError,
    MetricsConfig,
    WatchConfig,
    embedded_default,
    load_config,
    parse_size,
)

GiB, MiB = 1 << 30, 1 << 20

MINIMAL = """
[[watch]]
path = "capture"
[buffer]
path = "buffer"
[keys]
keyring = "keyring"
[repository]
url = "file:///srv/mediaseal/repository"
"""

FULL = """
[agent]
id = "edge-7"
concurrency = 8
rescan_seconds = 5
log_format = "json"
stop_timeout_seconds = 2.5

[[watch]]
path = "/data/calls"
kind = "call"
pattern = "*.wav"
recursive = false
completion = "rename"
dispose = "move"
move_to = "/data/calls-sealed"
content_type = "audio/wav"

[[watch]]
path = "screens"
kind = "screen"
completion = "marker"
marker_suffix = ".ready"
quiet_seconds = 0
dispose = "keep"
force_polling = true

[buffer]
path = "/var/spool/mediaseal"
max_bytes = "512MiB"

[keys]
keyset = "https://keys.example.com/keyset.json"
signer = "signer.pub"
refresh_seconds = 5
max_staleness_seconds = 3600

[repository]
url = "s3://media-archive/recordings"
concurrency = 16
endpoint_url = "http://127.0.0.1:9000"
region = "eu-west-1"
profile = "archive"
storage_class = "STANDARD_IA"
sse = "aws:kms"
sse_kms_key_id = "alias/media"
part_size = "32MiB"
put_threshold = 100000000

[metrics]
listen = "0.0.0.0:9100"
enabled = false
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mediaseal.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env or {})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config: ")
    return message


def test_full_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL), {})
    assert cfg.agent == AgentConfig("edge-7", 8, 5.0, "json", 2.5)
    assert isinstance(cfg.agent.rescan_seconds, float)
    calls, screens = cfg.watch
    assert calls == WatchConfig(Path("/data/calls"), "call", "*.wav", False, "rename", 2.0, ".done", "move",
                                Path("/data/calls-sealed"), False, "audio/wav")
    assert screens.path == tmp_path / "screens"
    assert screens.completion == "marker"
    assert screens.marker_suffix == ".ready"
    assert screens.quiet_seconds == 0.0
    assert screens.force_polling
    assert cfg.buffer.max_bytes == 512 * MiB
    assert cfg.keys.keyset == "https://keys.example.com/keyset.json"
    assert cfg.keys.keyring is None
    assert cfg.keys.signer == tmp_path / "signer.pub"
    r = cfg.repository
    assert (r.url, r.concurrency, r.sse, r.sse_kms_key_id) == ("s3://media-archive/recordings", 16, "aws:kms",
                                                               "alias/media")
    assert (r.part_size, r.put_threshold, r.storage_class) == (32 * MiB, 100000000, "STANDARD_IA")
    assert cfg.metrics == MetricsConfig("0.0.0.0:9100", False)


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    cfg = load_config(write(sub, MINIMAL), {})
    (w,) = cfg.watch
    assert (w.path, w.kind, w.completion, w.quiet_seconds, w.dispose, w.pattern) == (
        sub / "capture", "call", "close", 2.0, "delete", "*")
    assert cfg.buffer.path == sub / "buffer"
    assert cfg.buffer.max_bytes == 10 * GiB
    assert cfg.keys.keyring == sub / "keyring"
    assert cfg.keys.refresh_seconds == 60.0
    assert cfg.agent.id
    assert cfg.agent.concurrency == 2
    assert cfg.metrics.listen == "127.0.0.1:9464"
    # "../x" is normalised, and a relative keyset file is made absolute too
    text = MINIMAL.replace('keyring = "keyring"', 'keyset = "../keys/set.json"\nsigner = "signer.pub"')
    cfg = load_config(write(sub, text.replace('"buffer"', '"../spool"')), {})
    assert cfg.buffer.path == tmp_path / "spool"
    assert cfg.keys.keyset == str(tmp_path / "keys/set.json")


@pytest.mark.parametrize(("text", "named"), [
    # unknown sections and keys (typos) are named, with a suggestion
    ("[agnet]\nid = 'x'", "config: agnet: unknown section (did you mean agent?)"),
    ("[[watch]]\npath = '/w'\nqiuet_seconds = 3",
     "config: watch[0].qiuet_seconds: unknown key (did you mean quiet_seconds?)"),
    ("[metrics]\nport = 1", "config: metrics.port: unknown key"),
    # types: bools strict, ints where ints, ints accepted for floats
    ("[agent]\nconcurrency = 'two'", "config: agent.concurrency: expected an integer (got 'two')"),
    ("[agent]\nconcurrency = 2.0", "config: agent.concurrency: expected an integer (got 2.0)"),
    ("[agent]\nrescan_seconds = true", "config: agent.rescan_seconds: expected a number (got True)"),
    ("[[watch]]\npath = '/w'\nrecursive = 1", "config: watch[0].recursive: expected true or false (got 1)"),
    ("[[watch]]\npath = 3", "config: watch[0].path: expected a path (a non-empty string) (got 3)"),
    ("[buffer]\npath = '/b'\nmax_bytes = '12 parsecs'", "config: buffer.max_bytes: expected a size such as"),
    ("[buffer]\npath = '/b'\nmax_bytes = 1.5", "config: buffer.max_bytes: expected a size such as 512MiB or an"),
    # values
    ("[[watch]]\npath = '/w'\ncompletion = 'qiuet'",
     "config: watch[0].completion: must be one of close, quiet, rename, marker (got 'qiuet')"),
    ("[[watch]]\npath = '/w'\nkind = 'video'",
     "config: watch[0].kind: must be one of call, screen, digital, transcript"),
    ("[[watch]]\npath = '/w'\ndispose = 'shred'", "config: watch[0].dispose: must be one of delete, keep, move"),
    ("[[watch]]\npath = '/w'\ndispose = 'move'", 'config: watch[0].move_to: required with dispose = "move"'),
    ("[[watch]]\npath = '/w'\nmove_to = '/m'", 'config: watch[0].move_to: only used with dispose = "move"'),
    ("[[watch]]\npath = '/w'\ndispose = 'move'\nmove_to = '/w'", "config: watch[0].move_to: must lie outside path"),
    ("[[watch]]\npath = '/w'\ndispose = 'move'\nmove_to = '/w/done'", "config: watch[0].move_to: must lie outside"),
    ("[[watch]]\npath = '/w'\nquiet_seconds = -1", "config: watch[0].quiet_seconds: must be >= 0"),
    ("[[watch]]\npath = '/w'\nmarker_suffix = ''", "config: watch[0].marker_suffix: must be a non-empty"),
    ("[[watch]]\npath = '/w'\ncontent_type = 'wav'", "config: watch[0].content_type: must be a media type"),
    ("[[watch]]\npath = '/w'\n[[watch]]\npath = '/w/sub'", "config: watch[1].path: overlaps watch[0].path (/w)"),
    ("[[watch]]\npath = '/w/a'\n[[watch]]\npath = '/w/a'", "config: watch[1].path: overlaps watch[0].path"),
    ("[[watch]]\npath = '/w'\n[[watch]]\npath = '/v'\ndispose = 'move'\nmove_to = '/w/done'",
     "config: watch[1].move_to: is inside watch[0].path"),
    ("[agent]\nconcurrency = 0", "config: agent.concurrency: must be between 1 and 64 (got 0)"),
    ("[agent]\nconcurrency = 65", "config: agent.concurrency: must be between 1 and 64 (got 65)"),
    ("[agent]\nlog_format = 'xml'", "config: agent.log_format: must be one of text, json (got 'xml')"),
    ("[agent]\nrescan_seconds = 0", "config: agent.rescan_seconds: must be > 0"),
    ("[buffer]\npath = '/b'\nmax_bytes = 0", "config: buffer.max_bytes: must be > 0 (got 0)"),
    ("[buffer]\npath = '/srv/capture/spool'", "config: buffer.path: overlaps watch[0].path"),
    ("[keys]\nkeyring = '/k'\nkeyset = '/s.json'", "config: keys: set exactly one of keyring, keyset"),
    ("[keys]\nkeyset = '/s.json'", "config: keys.signer: required with keys.keyset"),
    ("[keys]\nkeyring = '/k'\nsigner = '/s.pub'", "config: keys.signer: only used with keys.keyset"),
    ("[keys]\nkeyset = 'http://k/set.json'\nsigner = '/s'", "config: keys.keyset: must be a file path, https://"),
    ("[keys]\nkeyring = '/k'\nrefresh_seconds = 0", "config: keys.refresh_seconds: must be > 0"),
    ("[repository]\nurl = 'ftp://x/y'", "config: repository.url: must be file:///... or s3://bucket/prefix"),
    ("[repository]\nurl = 'file://repo'", "config: repository.url: file:// needs an absolute path"),
    ("[repository]\nurl = 'file:repo'", "config: repository.url: file:// needs an absolute path"),
    ("[repository]\nurl = 's3:///prefix'", "config: repository.url: s3:// needs a valid bucket name (got '')"),
    ("[repository]\nurl = 's3://bkt/p'\nsse = 'aes'", "config: repository.sse: must be one of AES256, aws:kms"),
    ("[repository]\nurl = 's3://bkt/p'\nsse_kms_key_id = 'k'", 'config: repository.sse_kms_key_id: only used with'),
    ("[repository]\nurl = 's3://bkt/p'\npart_size = '0MiB'", "config: repository.part_size: must be > 0"),
    ("[repository]\nurl = 's3://bkt/p'\nendpoint_url = 'localhost:9000'", "config: repository.endpoint_url:"),
    ("[repository]\nurl = 's3://bkt/p'\nconcurrency = 100", "config: repository.concurrency: must be between"),
    ("[metrics]\nlisten = '9464'", "config: metrics.listen: must be HOST:PORT (got '9464')"),
    ("[repository]\nurl = 'file:///srv/capture/repo'", "config: repository.url: overlaps watch[0].path"),
    ("watch = 3", "config: watch: must be an array of tables ([[watch]])"),
    ("agent = 3", "config: agent: must be a table ([agent])"),
])
def test_bad_values_are_named(tmp_path: Path, text: str, named: str) -> None:
    # Later tables of the same name replace the baseline's, so each case overrides just one thing.
    base = {
        "watch": "[[watch]]\npath = '/srv/capture'\n",
        "buffer": "[buffer]\npath = '/srv/buffer'\n",
        "keys": "[keys]\nkeyring = '/srv/keyring'\n",
        "repository": "[repository]\nurl = 's3://bucket/prefix'\n",
    }
    for section in list(base):
        if f"[{section}]" in text or f"{section} =" in text:
            del base[section]
    assert named in error_of(tmp_path, text + "\n" + "".join(base.values()))


def test_missing_required(tmp_path: Path) -> None:
    assert error_of(tmp_path, MINIMAL.replace('[buffer]\npath = "buffer"', "")) == "config: buffer.path: required"
    assert error_of(tmp_path, MINIMAL.replace('[[watch]]\npath = "capture"', "")).startswith(
        "config: watch: at least one [[watch]]")
    assert error_of(tmp_path, MINIMAL.replace('keyring = "keyring"', "")) == (
        "config: keys: set exactly one of keyring, keyset")


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: .*nope.toml: no such file$"):
        load_config(tmp_path / "nope.toml", {})
    assert "invalid TOML" in error_of(tmp_path, "[agent\nid=1")


def test_env_overrides(tmp_path: Path) -> None:
    env = {
        "MEDIASEAL_KEYS__REFRESH_SECONDS": "5",
        "MEDIASEAL_BUFFER__MAX_BYTES": "1GiB",
        "MEDIASEAL_AGENT__ID": "1234",  # a string field stays a string
        "MEDIASEAL_AGENT__CONCURRENCY": "3",
        "MEDIASEAL_WATCH__0__COMPLETION": "rename",
        "MEDIASEAL_WATCH__0__RECURSIVE": "false",
        "MEDIASEAL_WATCH__1__PATH": "screens",  # index == len appends a watch; relative to the file
        "MEDIASEAL_WATCH__1__KIND": "screen",
        "MEDIASEAL_METRICS__ENABLED": "false",
        "MEDIASEAL_KEYRING_PASSPHRASE": "not a config key",  # no "__": ignored
        "MEDIASEAL_CRASH_AT": "mid-encrypt",
        "OTHER__THING": "x",
    }
    cfg = load_config(write(tmp_path, MINIMAL), env)
    assert cfg.keys.refresh_seconds == 5.0
    assert cfg.buffer.max_bytes == GiB
    assert cfg.agent.id == "1234"
    assert cfg.agent.concurrency == 3
    assert not cfg.metrics.enabled
    assert cfg.watch[0].completion == "rename"
    assert cfg.watch[0].recursive is False
    assert cfg.watch[1] == WatchConfig(tmp_path / "screens", kind="screen")
    # an empty value unsets an optional key: switch the keyring for a keyset
    env = {"MEDIASEAL_KEYS__KEYRING": "", "MEDIASEAL_KEYS__KEYSET": "s3://keys/set.json",
           "MEDIASEAL_KEYS__SIGNER": "/etc/signer.pub"}
    keys = load_config(write(tmp_path, MINIMAL), env).keys
    assert (keys.keyring, keys.keyset, keys.signer) == (None, "s3://keys/set.json", Path("/etc/signer.pub"))


@pytest.mark.parametrize(("env", "named"), [
    ({"MEDIASEAL_KEYS__REFRESH_SECOND": "5"},
     "config: MEDIASEAL_KEYS__REFRESH_SECOND: unknown key keys.refresh_second (did you mean refresh_seconds?)"),
    ({"MEDIASEAL_KEY__KEYRING": "/k"}, "config: MEDIASEAL_KEY__KEYRING: unknown section 'key' (did you mean keys?)"),
    ({"MEDIASEAL_WATCH__PATH": "/w"}, "config: MEDIASEAL_WATCH__PATH: expected MEDIASEAL_WATCH__<INDEX>__<KEY>"),
    ({"MEDIASEAL_AGENT__ID__X": "a"}, "config: MEDIASEAL_AGENT__ID__X: expected MEDIASEAL_AGENT__<KEY>"),
    ({"MEDIASEAL_WATCH__2__PATH": "/w"}, "config: MEDIASEAL_WATCH__2__PATH: watch index 2 skips past the 1"),
    ({"MEDIASEAL_AGENT__CONCURRENCY": "two"},
     "config: agent.concurrency: expected an integer (got 'two') (from MEDIASEAL_AGENT__CONCURRENCY)"),
    ({"MEDIASEAL_WATCH__0__COMPLETION": "qiuet"},
     "config: watch[0].completion: must be one of close, quiet, rename, marker (got 'qiuet') "
     "(from MEDIASEAL_WATCH__0__COMPLETION)"),
    # an appended watch must validate on its own
    ({"MEDIASEAL_WATCH__1__KIND": "screen"}, "config: watch[1].path: required"),
])
def test_bad_env_is_named(tmp_path: Path, env: dict[str, str], named: str) -> None:
    assert named in error_of(tmp_path, MINIMAL, env)


def test_no_file_is_embedded_default_plus_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "mediaseal-data"
    assert load_config(None, {}) == embedded_default(base)
    cfg = load_config(None, {"MEDIASEAL_WATCH__0__COMPLETION": "rename", "MEDIASEAL_BUFFER__PATH": "spool"})
    assert cfg.watch[0].completion == "rename"
    assert cfg.buffer.path == tmp_path / "spool"


def test_embedded_default(tmp_path: Path) -> None:
    cfg = embedded_default(tmp_path)
    (w,) = cfg.watch
    assert (w.path, w.kind, w.completion) == (tmp_path / "capture", "call", "close")
    assert cfg.buffer.path == tmp_path / "buffer"
    assert cfg.repository.url == f"file://{tmp_path}/repository"
    assert cfg.keys.keyring == tmp_path / "keyring"
    assert cfg.keys.keyset is None
    assert not os.listdir(tmp_path)  # pure: nothing created


@pytest.mark.parametrize(("text", "size"), [
    ("512MiB", 512 * MiB), ("10GiB", 10 * GiB), ("1GB", 10**9), ("1.5 KiB", 1536), ("4096", 4096), ("7b", 7),
    ("2tib", 2 << 40),
])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "-1MiB", "1 MiBs", "1e6", "10G"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(text)


def test_keys_ca_bundle(tmp_path: Path) -> None:
    base = "[[watch]]\npath = '/srv/capture'\n[buffer]\npath = '/srv/buffer'\n[repository]\nurl = 's3://bucket/p'\n"
    cfg = load_config(write(tmp_path, base + "[keys]\nkeyset = 'https://k.example/set.json'\nsigner = 's.pem'\n"
                                              "ca_bundle = 'ca.pem'\n"), {})
    assert cfg.keys.ca_bundle == tmp_path / "ca.pem"  # relative to the config file, like every path
    assert error_of(tmp_path, base + "[keys]\nkeyset = '/set.json'\nsigner = '/s.pem'\nca_bundle = '/ca.pem'\n") \
        == "config: keys.ca_bundle: only used with an https:// keys.keyset"
    assert "keys.ca_bundle: only used with" in error_of(
        tmp_path, base + "[keys]\nkeyring = '/k'\n", {"MEDIASEAL_KEYS__CA_BUNDLE": "/ca.pem"})


# -- mediaseal config check ----------------------------------------------------------------------------


def _check(cfg: Path | None, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MEDIASEAL_")}
    args = ["--config", str(cfg)] if cfg is not None else []
    return subprocess.run([sys.executable, "-m", "mediaseal.agent.cli", "config", "check", *args, *extra],
                          capture_output=True, text=True, env={**inherited, **(env or {})}, timeout=120, check=False)


@pytest.fixture(scope="module")
def checked_keyring(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mediaseal.keys.keyring import Keyring

    ring = tmp_path_factory.mktemp("ck") / "keyring"
    Keyring.init(ring, b"config check test passphrase")
    return ring


def _site(tmp_path: Path, keyring: Path, **repository: str) -> Path:
    (tmp_path / "capture").mkdir()
    (tmp_path / "repo").mkdir()
    repo = {"url": f"file://{tmp_path / 'repo'}", **repository}
    lines = ["[[watch]]", 'path = "capture"', "[buffer]", 'path = "spool"', "[keys]", f'keyring = "{keyring}"',
             "[repository]", *[f'{k} = "{v}"' for k, v in repo.items()]]
    cfg = tmp_path / "agent.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def test_config_check_passes_a_good_config_and_changes_nothing(tmp_path: Path, checked_keyring: Path) -> None:
    cfg = _site(tmp_path, checked_keyring)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = _check(cfg)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"config {cfg} OK: 1 watch (call: {tmp_path / 'capture'})"), r.stdout
    assert "key " in r.stdout and f"repository file://{tmp_path / 'repo'}" in r.stdout and r.stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no spool created, nothing written


def test_config_check_names_every_problem_on_its_own_line(tmp_path: Path, checked_keyring: Path) -> None:
    cfg = _site(tmp_path, checked_keyring)
    (tmp_path / "capture").rmdir()
    (tmp_path / "repo").rmdir()
    broken = tmp_path / "broken-keyring"
    broken.mkdir()
    (broken / "keyring.json").write_text("{not json")
    r = _check(cfg, env={"MEDIASEAL_KEYS__KEYRING": str(broken)})
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert lines[-1] == f"mediaseal: error: config {cfg}: 3 problems", lines
    problems = lines[:-1]
    assert len(problems) == 3 and all(p.startswith("mediaseal: config check: ") for p in problems), lines
    assert "watch[0].path" in problems[0] and "does not exist" in problems[0]
    assert problems[1].startswith("mediaseal: config check: keys: ")
    assert "repository:" in problems[2] and "not there" in problems[2]
    assert "Traceback" not in r.stderr


def test_config_check_rejects_an_invalid_config_in_one_line_and_usage_errors_with_2(tmp_path: Path,
                                                                                     checked_keyring: Path) -> None:
    cfg = _site(tmp_path, checked_keyring)
    r = _check(cfg, env={"MEDIASEAL_AGENT__CONCURRENCY": "0"})
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "agent.concurrency" in r.stderr, r.stderr
    assert _check(cfg, "--no-such-option").returncode == 2


def test_config_check_probes_the_bucket(tmp_path: Path, checked_keyring: Path, moto_server: Any) -> None:
    from s3_support import make_bucket, unique_bucket

    missing = unique_bucket("nope")
    cfg = _site(tmp_path, checked_keyring, url=f"s3://{missing}/p", endpoint_url=moto_server.url, region="us-east-1")
    r = _check(cfg)
    assert r.returncode == 1 and "repository:" in r.stderr and "NoSuchBucket" in r.stderr, r.stderr
    bucket = make_bucket(moto_server.url)
    cfg.write_text(cfg.read_text().replace(missing, bucket))
    r = _check(cfg)
    assert r.returncode == 0 and f"repository s3://{bucket}/p (the bucket answers)" in r.stdout, r.stderr
