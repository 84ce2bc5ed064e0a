"""The agent's configuration: one TOML file, every key overridable by `MEDIASEAL_*` variables.

>>> cfg = load_config(Path("/etc/mediaseal.toml"), os.environ)     # or None: the embedded default
>>> cfg.watch[0].completion, cfg.buffer.max_bytes
('close', 10737418240)

Sections `[agent]`, `[[watch]]` (one or more), `[buffer]`, `[keys]`, `[repository]`, `[metrics]`; the
keys are the fields of the dataclasses below. `MEDIASEAL_<SECTION>__<KEY>` overrides one key,
`MEDIASEAL_WATCH__<INDEX>__<KEY>` one key of one watch (INDEX == number of watches appends one).
An empty variable unsets an optional key (e.g. `MEDIASEAL_KEYS__KEYRING=` to switch to a keyset).
Relative paths resolve against the config file's directory (the working directory without a file).
Anything wrong raises ConfigError with one line naming the key (and the variable, if it came from one).
Pure: reads the file, never touches the filesystem otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import mimetypes
import os
import re
import socket
import string
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from mediaseal.buffer.manifest import DISPOSE_MODES, MAX_SIDECARS, DisposeMode
from mediaseal.codec import KINDS
from mediaseal.plumbing.media import is_passive, passive_or_octet

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "AgentConfig", "BufferConfig", "Config", "ConfigError", "check_layout", "KeysConfig", "MetricsConfig",
    "RepositoryConfig", "WatchConfig", "embedded_default", "load_config", "parse_size", "sidecar_shape",
]

GiB = 1 << 30
MiB = 1 << 20
COMPLETIONS = ("close", "quiet", "rename", "marker")
TEMP_PATTERNS = (".*", "*.part", "*.tmp", "*~")  # names producers write under before renaming
MARKER_FIELDS = ("path", "dir", "name", "stem")  # what a marker template may name
LOG_FORMATS = ("text", "json")
SSE_MODES = ("AES256", "aws:kms")
_SIZE = {"size": True}  # field metadata: accepts "512MiB", "1GB", ... as well as an int


class ConfigError(Exception):
    """An invalid configuration; str() is one line naming the offending key."""


@dataclass(frozen=True)
class WatchConfig:
    """One capture directory (`[[watch]]`)."""

    path: Path
    kind: str = "call"  # codec.KINDS
    pattern: str = "*"  # fnmatch on the file name (case-sensitive)
    recursive: bool = True
    completion: str = "close"  # close | quiet | rename | marker (agent/watcher.py)
    quiet_seconds: float = 2.0
    marker_suffix: str = ".done"
    dispose: DisposeMode = "delete"
    move_to: Path | None = None  # required iff dispose == "move"; outside every watch (check_layout)
    force_polling: bool = False  # network filesystems, where inotify sees nothing
    content_type: str | None = None  # None: guessed from the extension, else application/octet-stream
    marker: str | None = None  # template, e.g. "{dir}/../metadata/{stem}.txt"; None: "{path}" + marker_suffix
    temp_patterns: tuple[str, ...] = TEMP_PATTERNS  # fnmatch on names (files and directories): never candidates
    # Templates like `marker` for files carried with the recording, each as its own package linked by
    # id (`<recording id>.sidecar<n>`), e.g. ("{dir}/{stem}.xml",). Never sealed on their own.
    sidecars: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentConfig:
    id: str = field(default_factory=socket.gethostname)
    concurrency: int = 2
    rescan_seconds: float = 30.0
    log_format: str = "text"
    stop_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class BufferConfig:
    path: Path
    max_bytes: int = field(default=10 * GiB, metadata=_SIZE)
    min_free_bytes: int = field(default=64 * MiB, metadata=_SIZE)  # keep this much free on the spool's filesystem
    # The key the spool's manifests are authenticated under (made at first start, 0600), outside the spool
    # so that a file planted in the spool cannot carry a valid MAC. None: `<path>.key` beside the spool.
    manifest_key: Path | None = None

    @property
    def manifest_key_path(self) -> Path:
        return self.manifest_key or self.path.with_name(self.path.name + ".key")


@dataclass(frozen=True)
class KeysConfig:
    keyring: Path | None = None
    keyset: str | None = field(default=None, metadata={"source": True})  # file path (made absolute), https://, s3://
    signer: Path | None = None  # the pinned Ed25519 public key; required with keyset
    ca_bundle: Path | None = None  # PEM CA certificates for an https:// keyset (instead of the system CAs)
    refresh_seconds: float = 60.0
    max_staleness_seconds: float = 7 * 86400.0
    min_serial: int = 0  # key sets with a lower serial are refused, even by a fresh agent (raise it at rotations)


@dataclass(frozen=True)
class RepositoryConfig:
    url: str  # file:///abs/path or s3://bucket/prefix
    concurrency: int = 4
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    storage_class: str | None = None
    sse: str | None = None  # None | "AES256" | "aws:kms"
    sse_kms_key_id: str | None = None
    part_size: int = field(default=16 * MiB, metadata=_SIZE)
    put_threshold: int = field(default=64 * MiB, metadata=_SIZE)
    connect_timeout: float = 10.0  # S3: seconds to connect
    read_timeout: float = 60.0  # S3: a silent peer for this long fails the request (transient, retried)
    quarantine_seconds: float = 60.0  # re-probe interval for a package that failed permanently


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9464"
    enabled: bool = True


@dataclass(frozen=True)
class Config:
    agent: AgentConfig
    watch: tuple[WatchConfig, ...]
    buffer: BufferConfig
    keys: KeysConfig
    repository: RepositoryConfig
    metrics: MetricsConfig


def load_config(path: Path | None, env: Mapping[str, str]) -> Config:
    """Read, override from `env`, validate. path None: the embedded default under ./mediaseal-data."""
    if path is None:
        raw = _embedded_raw(Path("mediaseal-data").absolute())
        base = Path.cwd()
    else:
        raw = _read_toml(path)
        base = path.absolute().parent
    _check_shape(raw)
    origins = _apply_env(raw, env)
    return _Builder(base, origins).config(raw)


def embedded_default(base: Path) -> Config:
    """The no-config layout under `base` (absolute): capture/, buffer/, repository/, keyring/."""
    return _Builder(base, {}).config(_embedded_raw(base))


def content_type_for(name: str, configured: str | None = None) -> str:
    """The media type a recording is sealed with: `[[watch]] content_type` if set, else guessed from the file
    name's extension, else application/octet-stream. The agent and `mediaseal encrypt` both ask this."""
    return passive_or_octet(configured or mimetypes.guess_type(name)[0])  # never an active type (plumbing/media.py)


def parse_size(value: int | str) -> int:
    """Bytes from an int or "512MiB" / "1.5GiB" / "1GB" (SI units are powers of ten). ValueError if not."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]i?b|b)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(f"expected a size such as 512MiB, 10GiB or 1GB (got {value!r})")
    unit = (m.group(2) or "b").lower()
    power = "bkmgtp".index(unit[0])
    scale = 1024**power if "i" in unit else 1000**power
    return int(Fraction(m.group(1)) * scale)


# -- reading and overriding ------------------------------------------------------------------------

_SECTIONS: dict[str, type[Any]] = {
    "agent": AgentConfig, "watch": WatchConfig, "buffer": BufferConfig, "keys": KeysConfig,
    "repository": RepositoryConfig, "metrics": MetricsConfig,
}


def _embedded_raw(base: Path) -> dict[str, Any]:
    return {
        "watch": [{"path": str(base / "capture"), "kind": "call"}],
        "buffer": {"path": str(base / "buffer")},
        # Spelled literally rather than Path.as_uri(): a percent-encoded path would surprise readers.
        "repository": {"url": f"file://{base}/repository"},
        "keys": {"keyring": str(base / "keyring")},
    }


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: {path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path}: invalid TOML: {e}") from None


def _suggest(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _check_shape(raw: dict[str, Any]) -> None:
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"config: {name}: unknown section{_suggest(name, _SECTIONS)}")
        if name == "watch":
            if not isinstance(value, list) or not all(isinstance(w, dict) for w in value):
                raise ConfigError("config: watch: must be an array of tables ([[watch]])")
        elif not isinstance(value, dict):
            raise ConfigError(f"config: {name}: must be a table ([{name}])")


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Apply MEDIASEAL_<SECTION>__<KEY> variables to raw; returns {"section.key": variable} for errors."""
    origins: dict[str, str] = {}
    found: list[tuple[str, int, str, str]] = []  # (section, index, key, variable)
    for var in env:
        if not var.startswith("MEDIASEAL_") or "__" not in var:
            continue  # not a config key (MEDIASEAL_KEYRING_PASSPHRASE, MEDIASEAL_CRASH_AT, ...)
        parts = var.removeprefix("MEDIASEAL_").lower().split("__")
        section = parts[0]
        if section not in _SECTIONS:
            raise ConfigError(f"config: {var}: unknown section {section!r}{_suggest(section, _SECTIONS)}")
        if section == "watch":
            if len(parts) != 3 or not parts[1].isdigit():
                raise ConfigError(f"config: {var}: expected MEDIASEAL_WATCH__<INDEX>__<KEY>")
            index, key = int(parts[1]), parts[2]
        elif len(parts) != 2:
            raise ConfigError(f"config: {var}: expected MEDIASEAL_{section.upper()}__<KEY>")
        else:
            index, key = -1, parts[1]
        known = {f.name: f for f in dataclasses.fields(_SECTIONS[section])}
        if key not in known:
            raise ConfigError(f"config: {var}: unknown key {section}.{key}{_suggest(key, known)}")
        found.append((section, index, key, var))
    # Watch entries in index order, so that INDEX == len appends once and later keys fill it in.
    for section, index, key, var in sorted(found):
        if section == "watch":
            watches = raw.setdefault("watch", [])
            if index > len(watches):
                raise ConfigError(f"config: {var}: watch index {index} skips past the {len(watches)} configured")
            if index == len(watches):
                watches.append({})
            table, where = watches[index], f"watch[{index}].{key}"
        else:
            table, where = raw.setdefault(section, {}), f"{section}.{key}"
        hint = typing.get_type_hints(_SECTIONS[section])[key]
        value = _env_value(env[var], hint)
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
        origins[where] = var
    return origins


def _env_value(text: str, hint: object) -> object:
    """The env text as the target type wants it: strings stay strings, other values parse as TOML."""
    optional = isinstance(hint, types.UnionType) and type(None) in hint.__args__
    if text == "" and optional:
        return None
    if _base_type(hint) in (str, Path):
        return text  # an agent id "1234" or a pattern "true" must not turn into a number or a bool
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text  # e.g. "1GiB": the field's own parser judges it
    return parsed["v"] if list(parsed) == ["v"] else text


def _base_type(hint: object) -> object:
    if isinstance(hint, types.UnionType):
        return next(a for a in hint.__args__ if a is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        return str  # a string here; check() names the allowed values
    if typing.get_origin(hint) is tuple:
        return tuple  # of strings: the only sequences in the config
    return hint


# -- building and validating -----------------------------------------------------------------------

if TYPE_CHECKING:
    _T = TypeVar("_T", bound=DataclassInstance)


class _Builder:
    def __init__(self, base: Path, origins: dict[str, str]) -> None:
        self.base = base
        self.origins = origins

    def error(self, where: str, message: str) -> ConfigError:
        var = self.origins.get(where)
        return ConfigError(f"config: {where}: {message}" + (f" (from {var})" if var else ""))

    def config(self, raw: dict[str, Any]) -> Config:
        watches = raw.get("watch", [])
        if not watches:
            raise ConfigError("config: watch: at least one [[watch]] table is required")
        cfg = Config(
            agent=self.section(AgentConfig, raw.get("agent", {}), "agent"),
            watch=tuple(self.section(WatchConfig, w, f"watch[{i}]") for i, w in enumerate(watches)),
            buffer=self.section(BufferConfig, raw.get("buffer", {}), "buffer"),
            keys=self.section(KeysConfig, raw.get("keys", {}), "keys"),
            repository=self.section(RepositoryConfig, raw.get("repository", {}), "repository"),
            metrics=self.section(MetricsConfig, raw.get("metrics", {}), "metrics"),
        )
        self.check(cfg)
        return cfg

    def section(self, cls: type[_T], raw: Mapping[str, Any], where: str) -> _T:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in fields:
                raise self.error(f"{where}.{key}", f"unknown key{_suggest(key, fields)}")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for name, f in fields.items():
            if name in raw:
                values[name] = self.convert(raw[name], hints[name], f, f"{where}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise self.error(f"{where}.{name}", "required")
        return cls(**values)

    def convert(self, value: object, hint: object, f: dataclasses.Field[Any], where: str) -> object:
        want = _base_type(hint)
        if f.metadata.get("size"):
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise self.error(where, f"expected a size such as 512MiB or an integer (got {value!r})")
            try:
                return parse_size(value)
            except ValueError as e:
                raise self.error(where, str(e)) from None
        checks: dict[object, tuple[Callable[[object], bool], str]] = {
            bool: (lambda v: isinstance(v, bool), "true or false"),
            int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
            float: (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
            str: (lambda v: isinstance(v, str), "a string"),
            Path: (lambda v: isinstance(v, str) and v != "", "a path (a non-empty string)"),
            tuple: (lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v),
                    "an array of non-empty strings"),
        }
        ok, expected = checks[want]
        if not ok(value):
            raise self.error(where, f"expected {expected} (got {value!r})")
        if want is float:
            return float(typing.cast(float, value))
        if want is tuple:
            return tuple(typing.cast(list[str], value))
        if want is Path:
            return self.path(typing.cast(str, value))
        if f.metadata.get("source") and value != "" and "://" not in typing.cast(str, value):
            return str(self.path(typing.cast(str, value)))
        return value

    def path(self, text: str) -> Path:
        # normpath, not resolve(): the config is pure, and operators may point at a symlinked directory.
        return Path(os.path.normpath(self.base / text))

    def check(self, cfg: Config) -> None:
        a, b, k, r, m = cfg.agent, cfg.buffer, cfg.keys, cfg.repository, cfg.metrics
        self.rule("agent.id", a.id.strip() == a.id != "" and a.id.isprintable(), "must be a non-empty printable name")
        self.range("agent.concurrency", a.concurrency, 1, 64)
        self.positive("agent.rescan_seconds", a.rescan_seconds)
        self.choice("agent.log_format", a.log_format, LOG_FORMATS)
        self.rule("agent.stop_timeout_seconds", a.stop_timeout_seconds >= 0, "must be >= 0")
        for i, w in enumerate(cfg.watch):
            at = f"watch[{i}]"
            self.choice(f"{at}.kind", w.kind, KINDS)
            self.rule(f"{at}.pattern", w.pattern != "", "must not be empty (use \"*\")")
            self.choice(f"{at}.completion", w.completion, COMPLETIONS)
            self.rule(f"{at}.quiet_seconds", w.quiet_seconds >= 0, "must be >= 0")
            self.rule(f"{at}.marker_suffix", w.marker_suffix not in ("", ".") and "/" not in w.marker_suffix,
                      "must be a non-empty file-name suffix such as .done")
            self.rule(f"{at}.marker", w.marker is None or _marker_template(w.marker),
                      "must be a path template naming the recording, e.g. \"{path}.done\" or "
                      "\"{dir}/../metadata/{stem}.txt\" (fields: " + ", ".join(MARKER_FIELDS) + ")")
            self.rule(f"{at}.marker", w.marker is None or w.completion == "marker",
                      'only used with completion = "marker"')
            marker = (w.marker or "{path}" + w.marker_suffix) if w.completion == "marker" else None
            for n, template in enumerate(w.sidecars):
                self.rule(f"{at}.sidecars[{n}]", _marker_template(template) and template != marker
                          and sidecar_shape(template) is not None,
                          "must name a file beside the recording by its stem or name, e.g. \"{dir}/{stem}.xml\" "
                          "or \"{path}.meta\"")
            self.rule(f"{at}.sidecars", len(set(w.sidecars)) == len(w.sidecars) and len(w.sidecars) <= MAX_SIDECARS,
                      f"at most {MAX_SIDECARS}, each once")
            self.choice(f"{at}.dispose", w.dispose, DISPOSE_MODES)
            if w.dispose == "move":
                self.rule(f"{at}.move_to", w.move_to is not None, 'required with dispose = "move"')
            else:
                self.rule(f"{at}.move_to", w.move_to is None, 'only used with dispose = "move"')
            self.rule(f"{at}.move_to", w.move_to is None or not _overlap(w.move_to, w.path),
                      "must lie outside path (whoever writes the capture directory must not reach it)")
            self.rule(f"{at}.content_type", w.content_type is None or _MEDIA_TYPE.fullmatch(w.content_type) is not None,
                      "must be a media type such as audio/wav")
            self.rule(f"{at}.content_type", w.content_type is None or is_passive(w.content_type)
                      or _MEDIA_TYPE.fullmatch(w.content_type) is None,
                      f"must be audio/*, video/* or text/plain (got {w.content_type!r}: a browser could run it)")
            for j, other in enumerate(cfg.watch[:i]):
                self.rule(f"{at}.path", not _overlap(w.path, other.path), f"overlaps watch[{j}].path ({other.path})")
            for j, other in enumerate(cfg.watch):
                if j != i and w.move_to is not None:
                    self.rule(f"{at}.move_to", not _inside(w.move_to, other.path), f"is inside watch[{j}].path")
        self.positive("buffer.max_bytes", b.max_bytes)
        self.rule("buffer.min_free_bytes", b.min_free_bytes >= 0, "must be >= 0")
        self.rule("keys", (k.keyring is None) != (k.keyset is None), "set exactly one of keyring, keyset")
        if k.keyset is not None:
            self.rule("keys.signer", k.signer is not None, "required with keys.keyset (the pinned signing key)")
            self.keyset(k.keyset)
        else:
            self.rule("keys.signer", k.signer is None, "only used with keys.keyset")
        self.rule("keys.ca_bundle", k.ca_bundle is None or (k.keyset or "").startswith("https://"),
                  "only used with an https:// keys.keyset")
        self.positive("keys.refresh_seconds", k.refresh_seconds)
        self.positive("keys.max_staleness_seconds", k.max_staleness_seconds)
        self.rule("keys.min_serial", k.min_serial >= 0 and (k.min_serial == 0 or k.keyset is not None),
                  "must be >= 0, and is only used with keys.keyset")
        self.url(r.url)
        self.range("repository.concurrency", r.concurrency, 1, 64)
        self.rule("repository.endpoint_url", r.endpoint_url is None or _http_url(r.endpoint_url),
                  "must be an http:// or https:// URL")
        for name in ("region", "profile", "storage_class"):
            self.rule(f"repository.{name}", getattr(r, name) != "", "must not be empty (leave it out)")
        self.rule("repository.sse", r.sse is None or r.sse in SSE_MODES, f"must be one of {', '.join(SSE_MODES)}"
                  f" (got {r.sse!r})")
        self.rule("repository.sse_kms_key_id", r.sse_kms_key_id is None or r.sse == "aws:kms",
                  'only used with sse = "aws:kms"')
        self.positive("repository.part_size", r.part_size)
        self.positive("repository.put_threshold", r.put_threshold)
        self.positive("repository.quarantine_seconds", r.quarantine_seconds)
        self.positive("repository.connect_timeout", r.connect_timeout)
        self.positive("repository.read_timeout", r.read_timeout)
        self.rule("metrics.listen", _listen(m.listen), f"must be HOST:PORT (got {m.listen!r})")
        for where, p in _owned_paths(cfg).items():  # as written; check_layout judges them by their real paths
            for i, w in enumerate(cfg.watch):
                self.rule(where, not _overlap(p, w.path), f"overlaps watch[{i}].path ({w.path})")

    def keyset(self, source: str) -> None:
        self.rule("keys.keyset", source != "", "must be a file path, https:// or s3:// URL (got '')")
        if "://" not in source:
            return  # a file path, already made absolute
        parts = urlsplit(source)
        self.rule("keys.keyset", parts.scheme in ("https", "s3"), f"must be a file path, https:// or s3:// URL"
                  f" (got {source!r})")
        self.rule("keys.keyset", parts.netloc != "" and parts.path not in ("", "/"), "URL needs a host and a path")

    def url(self, url: str) -> Path | None:
        """Check repository.url; the local directory for file:// URLs."""
        parts = urlsplit(url)
        self.rule("repository.url", parts.scheme in ("file", "s3"), f"must be file:///... or s3://bucket/prefix"
                  f" (got {url!r})")
        self.rule("repository.url", not parts.query and not parts.fragment, "must not have a query or fragment")
        if parts.scheme == "s3":
            self.rule("repository.url", _BUCKET.fullmatch(parts.netloc) is not None,
                      f"s3:// needs a valid bucket name (got {parts.netloc!r})")
            return None
        self.rule("repository.url", parts.netloc == "" and parts.path.startswith("/"),
                  f"file:// needs an absolute path, e.g. file:///var/lib/mediaseal/repository (got {url!r})")
        return Path(os.path.normpath(parts.path))

    def rule(self, where: str, ok: bool, message: str) -> None:
        if not ok:
            raise self.error(where, message)

    def choice(self, where: str, value: str, allowed: tuple[str, ...]) -> None:
        self.rule(where, value in allowed, f"must be one of {', '.join(allowed)} (got {value!r})")

    def range(self, where: str, value: int, low: int, high: int) -> None:
        self.rule(where, low <= value <= high, f"must be between {low} and {high} (got {value})")

    def positive(self, where: str, value: float) -> None:
        self.rule(where, value > 0, f"must be > 0 (got {value})")


_MEDIA_TYPE = re.compile(r"[\w!#$&^.+-]+/[\w!#$&^.+-]+")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _marker_template(template: str) -> bool:
    """Names only known fields, names the recording (not its directory alone) and is not the recording."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        probe = template.format(path="/d/r.wav", dir="/d", name="r.wav", stem="r")
    except (ValueError, KeyError, IndexError):
        return False
    return fields <= set(MARKER_FIELDS) and bool(fields - {"dir"}) and probe != "/d/r.wav"


def sidecar_shape(template: str) -> tuple[str, str, str] | None:
    """(literal prefix, field, literal suffix) of a sidecar template that puts the file beside its
    recording, named by one field: "{dir}/<prefix>{stem|name}<suffix>" or "{path}<suffix>"; else None."""
    if template.startswith("{path}"):
        template = "{dir}/{name}" + template.removeprefix("{path}")
    rest = template.removeprefix("{dir}/")
    if rest == template or "/" in rest:
        return None
    parts = [(lit, f) for lit, f, _, _ in string.Formatter().parse(rest)]
    fields = [f for _, f in parts if f is not None]
    if len(fields) != 1 or fields[0] not in ("stem", "name"):
        return None
    return parts[0][0], fields[0], "".join(lit for lit, _ in parts[1:])


def _owned_paths(cfg: Config) -> dict[str, Path]:
    """The agent's own files and directories (config key -> path), which lie outside every capture
    directory: anything of its own inside one would be picked up, encrypted and disposed of, or reached
    by whoever writes there. (`move_to` has rules of its own.)"""
    k = cfg.keys
    owned = {"buffer.path": cfg.buffer.path, "buffer.manifest_key": cfg.buffer.manifest_key_path}
    owned |= {where: p for where, p in (("keys.keyring", k.keyring), ("keys.signer", k.signer)) if p is not None}
    if k.keyset is not None and "://" not in k.keyset:
        owned["keys.keyset"] = Path(k.keyset)
    parts = urlsplit(cfg.repository.url)
    if parts.scheme == "file":
        owned["repository.url"] = Path(os.path.normpath(parts.path))
    return owned


def check_layout(cfg: Config) -> list[str]:
    """The agent's own directories and files outside every capture directory, judged by where they really
    are (symlinks resolved, once, at start): `load_config` compares the paths as written, and whoever
    writes a capture directory must not reach the spool, the keys or a `move_to` through a link the
    operator made (DESIGN invariant 9). Returns one line per problem."""
    owned = _owned_paths(cfg) | {f"watch[{i}].move_to": w.move_to for i, w in enumerate(cfg.watch)
                                 if w.move_to is not None}
    real = {where: Path(os.path.realpath(p)) for where, p in owned.items()}
    problems = []
    for i, w in enumerate(cfg.watch):
        real_watch = Path(os.path.realpath(w.path))
        for where, p in owned.items():
            if _overlap(real[where], real_watch):
                problems.append(f"{where}: {p} is {real[where]}, which overlaps watch[{i}].path ({w.path} is "
                                f"{real_watch}): keep the agent's own directories outside every capture directory")
    return problems


def unsafe_delete(w: WatchConfig) -> bool:
    """Deleting sources after a judgement by time alone (`quiet`, or `close` whose close events and writer
    check are local to this host): safe only where the open-writer check works (agent/writers.py)."""
    return w.dispose == "delete" and w.completion in ("quiet", "close")


def _inside(p: Path, root: Path) -> bool:
    return p == root or p.is_relative_to(root)


def _overlap(p: Path, q: Path) -> bool:
    return _inside(p, q) or _inside(q, p)


def _http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and parts.netloc != ""


def _listen(listen: str) -> bool:
    host, _, port = listen.rpartition(":")
    return host != "" and port.isdigit() and 0 <= int(port) <= 65535
