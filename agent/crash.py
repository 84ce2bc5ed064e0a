"""Named crash points for the crash-safety tests: `MEDIASEAL_CRASH_AT=<point>[:<n>]` makes the agent
`os._exit` the n-th time (default first) it reaches that point, as abruptly as a SIGKILL would.

Points: mid-encrypt, after-staging-fsync, after-commit, after-delivery, after-part-saved (an S3 multipart
upload's state, with its completed parts, was just saved in the manifest), the spool's own steps inside
a transition (`buffer.spool.SpoolStep`, passed in as the spool's `on_step`): mid-commit (package
renamed into place, manifest not yet written), mid-release (one of package and manifest removed), and
each step of a source's disposal (agent/disposal.py): after-dispose-rename (the source taken under its
private `.disposing` name), after-dispose-marker (its completion marker removed), after-dispose-source
(the source deleted or moved, directory fsynced), and after-sidecar-commit (a recording's sidecars
committed, the recording itself not yet: agent/intake.py).
"""

from __future__ import annotations

import os
import threading

CRASH_EXIT = 86
POINTS = ("mid-encrypt", "after-staging-fsync", "after-commit", "after-delivery", "after-part-saved",
          "mid-commit", "mid-release", "after-dispose-rename", "after-dispose-marker", "after-dispose-source",
          "after-sidecar-commit")

_spec = os.environ.get("MEDIASEAL_CRASH_AT", "")
_name, _, _nth = _spec.partition(":")
_remaining = int(_nth) if _nth.isdigit() else 1
_lock = threading.Lock()


def crash_point(name: str) -> None:
    global _remaining
    if name != _name:
        return
    with _lock:
        _remaining -= 1
        if _remaining <= 0:
            os._exit(CRASH_EXIT)
