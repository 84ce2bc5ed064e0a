"""A real, small filesystem for tests that fill a disk (a tmpfs: needs root to mount).

>>> with tmpfs(tmp_path / "spoolfs", 24 << 20) as mnt: ...   # TmpfsUnavailable(reason) where it cannot
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


class TmpfsUnavailable(Exception):
    """The tmpfs could not be mounted here; the message is the reason (for a skip)."""


@contextlib.contextmanager
def tmpfs(where: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a `size_bytes` tmpfs (mode 0700) at `where` (made), and unmount it (lazily) afterwards."""
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(where)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise TmpfsUnavailable(f"cannot mount a tmpfs here ({r.stderr.strip()}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
