"""A recording's manifest: its durable state in the spool, and the identity of the source it came from.

    spooled --record_upload--> uploading --record_verified--> verified --release--> (gone)
       └──────────────────record_verified──────────────────────┘

The states are closed (`ManifestState`): a manifest naming any other state does not parse, so no
component ever acts on a state it does not know. Only the spool (`buffer/spool.py`) changes a
manifest's state, each change written before its side effect; everyone else reads.

`SourceIdentity` is the one comparison of "the same source file" (device, inode, size, mtime): the
watcher's candidate against the opened file, the file after sealing, the file about to be disposed,
and recovery's "is the source still there unchanged". The ctime is kept but never compared: the
disposal's own rename of the source (and any link count change) moves it, while the bytes that were
sealed stay the same.

Non-secret metadata only: a manifest never holds key material or plaintext.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

__all__ = ["DISPOSE_MODES", "MAX_SIDECARS", "RECORDING_ID", "STATES", "DisposeMode", "Manifest", "ManifestState",
           "SourceIdentity", "canonical_json", "sidecar_id"]

MAX_SIDECARS = 8  # per recording (`[[watch]] sidecars`)
# The ids the agent makes (agent/intake.py `recording_id`): the capture time, a hash, and for a sidecar
# its place among the watch's templates. Manifests, private disposal names and repository keys carry them.
RECORDING_ID = re.compile(rf"(?P<date>[0-9]{{8}})T[0-9]{{6}}Z-[0-9a-f]{{20}}(?:\.sidecar[1-{MAX_SIDECARS}])?")


def sidecar_id(recording_id: str, n: int) -> str:
    """The id of the `n`-th (1-based) sidecar of `recording_id`: its package lies beside the recording's."""
    return f"{recording_id}.sidecar{n}"


class ManifestState(enum.StrEnum):
    SPOOLED = "spooled"  # committed in the spool; the source may be disposed
    UPLOADING = "uploading"  # delivery under way (resumable progress in `Manifest.upload`)
    VERIFIED = "verified"  # the repository confirmed size and SHA-256; the spool copy can go


STATES: tuple[ManifestState, ...] = tuple(ManifestState)

# What happens to the source once its package is committed (a watch's `dispose`).
DisposeMode = Literal["delete", "keep", "move"]
DISPOSE_MODES: tuple[DisposeMode, ...] = get_args(DisposeMode)


@dataclass(frozen=True)
class SourceIdentity:
    """The source file a package was sealed from, as `stat` saw it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> SourceIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @classmethod
    def of_path(cls, path: str | os.PathLike[str]) -> SourceIdentity | None:
        """The identity of the file at `path` (never through a symlink), or None if it cannot be stat'ed."""
        try:
            return cls.of(os.stat(path, follow_symlinks=False))
        except OSError:
            return None

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> SourceIdentity | None:
        """The identity a manifest recorded, or None where it recorded none (or an incomplete one)."""
        try:
            return cls(d["dev"], d["ino"], d["size"], d["mtime_ns"], d.get("ctime_ns", 0))
        except (KeyError, TypeError):
            return None

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def same_file(self, other: SourceIdentity | None) -> bool:
        """The same file with the same content as far as stat can tell (ctime excluded: see above)."""
        return other is not None and (self.dev, self.ino, self.size, self.mtime_ns) == (
            other.dev, other.ino, other.size, other.mtime_ns)


@dataclass
class Manifest:
    """One recording's durable state. Fields are read by anyone; `state`, `sha256`, `upload`,
    `attempts` and `last_error` are changed only through the spool's transitions."""

    recording_id: str
    kind: str
    repo_key: str
    package_size: int
    sha256: str | None  # the package's SHA-256, computed before the first delivery that needs it
    kid: str
    source: str
    identity: dict[str, int]  # SourceIdentity.to_dict() of the source (on disk as a plain object)
    dispose: DisposeMode
    move_to: str | None = None
    marker: str | None = None  # the completion marker file to remove with the source
    state: ManifestState = ManifestState.SPOOLED
    created_at: float = 0.0
    attempts: int = 0
    last_error: str = ""
    upload: dict[str, Any] = field(default_factory=dict)

    @property
    def source_identity(self) -> SourceIdentity | None:
        return SourceIdentity.from_dict(self.identity)

    def to_json(self) -> bytes:
        return canonical_json(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse a manifest; ValueError for one in an unknown state or with an unknown dispose mode."""
        return cls.from_dict(json.loads(data))

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Manifest:
        """`from_json` of a document parsed already; members it does not know (the spool's `mac`) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        m = cls(**{k: v for k, v in doc.items() if k in names})
        m.state = ManifestState(m.state)
        if m.dispose not in DISPOSE_MODES:
            raise ValueError(f"manifest {m.recording_id}: unknown dispose mode {m.dispose!r}")
        return m


def canonical_json(doc: dict[str, Any]) -> bytes:
    """The one serialisation of a manifest document (sorted keys, no spaces): what its MAC covers."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
