"""Files that hold secrets (the playback server's tokens, the LKM's clients file, an LKM client's secret).

>>> raw = read_credentials_file(path, "tokens file", forbidden=0o077, fix="make it 0600")

Such a file is refused, not just warned about, when its mode has a forbidden bit (others may read it,
or the group may write it): a secret others could read is no longer one, and a service that starts
anyway teaches operators to ignore the warning. The message is one line naming the file, its mode
and the fix. No heavy imports: the command line's option modules load this.
"""

from __future__ import annotations

import stat
from pathlib import Path

__all__ = ["CredentialsFileError", "read_credentials_file"]


class CredentialsFileError(Exception):
    """A credentials file can't be read, or others may read it (one line, naming the file and its mode)."""


def read_credentials_file(path: Path, what: str, *, forbidden: int, fix: str) -> bytes:
    """The bytes of a file that holds secrets, refused if its mode has any of the `forbidden` bits.

    `what` names it in the message ("tokens file"), `fix` says what to do ("chmod 0600").
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except OSError as e:
        raise CredentialsFileError(f"can't read {what} {path}: {e.strerror}") from None
    if mode & forbidden:
        raise CredentialsFileError(f"{what} {path} holds secrets but is mode {mode:04o}: {fix}")
    return data
