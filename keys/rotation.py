"""Key rotation: the schedule, and the key-side rules of retiring a key and re-wrapping a package.

>>> ring.set_schedule(RotationSchedule.make("monthly", grace_seconds=86400))
>>> print(rotate_if_due(ring, passphrase))          # from a systemd timer or the LKM's own loop
created pending key 3kz...; it becomes current after 2031-02-02T00:00:00Z (a later run activates it)
>>> print(retire_checked(ring, old_kid, usage, url))    # KeyInUseError while packages need it

Scheduled rotation is two-step so agents are warm: when the current key has been current for the
schedule's period minus the grace, a new key is added as `pending` (publish the key set: agents
fetch it and verify it while they still encrypt to the current key); a run at least `grace_seconds`
later makes it current, and the previous key becomes decrypt-only. `Keyring.rotate` ("rotate now")
stays immediate. The anchor is the current key's activation, so a manual rotation restarts the
period. A pending key older than the current key's activation (left behind by a manual rotation) is
superseded: made decrypt-only, never activated over a newer key.

Repositories are not read here (keys must not import the uploader): `export.rewrap` composes the
uploader's read side with these rules (`mediaseal keys retire` / `keys rewrap`). `rewrap_plan` says
which wraps a package keeps when it moves to the current key (wraps for keys this keyring does not
hold are kept), and `rewrapped_header` unwraps the DEK, checks it against the header's commitment in
memory and re-wraps it; the body is never touched. No plaintext and no DEK is ever written anywhere.
"""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from mediaseal import codec
from mediaseal.keys.errors import KeysError, KeyStateError
from mediaseal.keys.keyring import KeyRecord, Keyring, RotationSchedule
from mediaseal.keys.keyset import DECRYPT_ONLY, PENDING, RETIRED, format_time, parse_time

__all__ = [
    "KeyInUseError", "KeyUsage", "PackageRef", "RepositoryScanError", "RewrapReport", "RotationSchedule", "add_period",
    "check_retirable", "next_rotation", "retire_checked", "rewrap_plan", "rewrapped_header", "rotate_if_due",
    "usable_kids",
]


class KeyInUseError(KeyStateError):
    """Packages in the repository still need the key (no other usable wrap): it can't be retired unforced."""


class RepositoryScanError(KeysError):
    """A repository could not be listed or read (bad URL, missing directory, S3 error)."""


# -- the schedule ----------------------------------------------------------------------------------


def add_period(t: datetime, every: str) -> datetime:
    """`t` plus one period: a day, a week, a calendar month or year (the day clamped to the month's end)."""
    if every == "daily":
        return t + timedelta(days=1)
    if every == "weekly":
        return t + timedelta(days=7)
    if every in ("monthly", "yearly"):
        if every == "yearly":
            year, month = t.year + 1, t.month
        else:
            year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
        return t.replace(year=year, month=month, day=min(t.day, calendar.monthrange(year, month)[1]))
    raise ValueError(f"no period for schedule {every!r}")


def _activated(rec: KeyRecord) -> datetime:
    return parse_time(rec.activated_at or rec.created_at)


def next_rotation(ring: Keyring) -> datetime | None:
    """When the scheduler next adds a pending key (None: schedule disabled)."""
    schedule = ring.schedule
    if schedule.every == "disabled":
        return None
    anchor = _activated(ring.current())
    return max(anchor, add_period(anchor, schedule.every) - timedelta(seconds=schedule.grace_seconds))


def rotate_if_due(keyring: Keyring, passphrase: bytes | None, now: datetime | None = None) -> str:
    """Do what the schedule says is due now and describe it in one line.

    The keyring's secret is checked first, on every run. Steps: supersede stale pending keys;
    activate a pending key whose grace has passed; or add a new pending key when the current one is
    due for rotation (with a zero grace it is activated at once). Blocking (RSA key generation, and
    KMS calls for a KMS keyring): call it from a thread in an event loop. Raises KeysError for a
    wrong secret or a refused KMS call, changing nothing.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    # The secret is checked on every run, due or not: a timer with a broken passphrase file (or a
    # revoked KMS grant) must fail now, not silently until the day a rotation is due.
    keyring.reload()  # a long-lived caller (the LKM) may hold it while a custodian changes the schedule
    keyring.unlock(passphrase)
    schedule = keyring.schedule
    grace = timedelta(seconds=schedule.grace_seconds)
    current = keyring.current()
    anchor = _activated(current)
    notes: list[str] = []
    pending: KeyRecord | None = None
    for rec in keyring.records():
        if rec.state != PENDING:
            continue
        if parse_time(rec.created_at) < anchor:  # older than the current key: never activated over it
            keyring.set_state(rec.kid, DECRYPT_ONLY)
            notes.append(f"superseded pending key {rec.kid} (older than current key {current.kid})")
        elif pending is None or rec.created_at >= pending.created_at:
            pending = rec
    prefix = "; ".join(notes) + "; " if notes else ""
    if pending is not None:
        ready_at = parse_time(pending.created_at) + grace
        if now < ready_at:
            return (f"{prefix}pending key {pending.kid} becomes current after {format_time(ready_at)};"
                    " nothing to do now")
        keyring.activate(pending.kid, passphrase, at=now)
        return (f"{prefix}activated key {pending.kid} (pending since {pending.created_at});"
                f" previous key {current.kid} is now decrypt-only")
    due = next_rotation(keyring)
    if due is None:
        return f"{prefix}rotation schedule is disabled; current key {current.kid} stays"
    if now < due:
        return f"{prefix}not due: current key {current.kid} ({schedule.every}); next pending key at {format_time(due)}"
    new = keyring.rotate(passphrase, pending=True, at=now)
    if schedule.grace_seconds == 0:
        keyring.activate(new.kid, passphrase, at=now)
        return f"{prefix}rotated: key {new.kid} is current (no grace period); {current.kid} is now decrypt-only"
    return (f"{prefix}created pending key {new.kid}; it becomes current after {format_time(now + grace)}"
            " (publish the key set now; a later run activates it)")


# -- repositories ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageRef:
    """A package in a repository: where it is (a path, or s3://bucket/key) and its parsed header."""

    location: str
    header: codec.Header


@dataclass
class KeyUsage:
    """Which packages carry a wrap for a kid, and which of them have no other usable wrap (need it)."""

    kid: str
    packages: int = 0
    needed_by: list[str] = field(default_factory=list)

    def add(self, ref: PackageRef, usable: set[str]) -> None:
        """Count one package (`usable`: usable_kids of the keyring)."""
        kids = {w.kid for w in ref.header.wraps}
        if self.kid in kids:
            self.packages += 1
            if not kids & usable:
                self.needed_by.append(ref.location)


def usable_kids(keyring: Keyring, kid: str) -> set[str]:
    """The keys of this keyring that can still unwrap once `kid` is retired."""
    return {r.kid for r in keyring.records() if r.state != RETIRED and r.kid != kid}


def check_retirable(keyring: Keyring, kid: str) -> str | None:
    """None if `kid` may be retired once the repository is checked, else why there is nothing to do."""
    rec = keyring.record(kid)
    if rec.state == RETIRED:
        return f"key {kid} is already retired"
    if kid == keyring.current().kid:
        raise KeyStateError(f"key {kid} is current; rotate first, then rewrap, then retire it")
    return None


def retire_checked(keyring: Keyring, kid: str, usage: KeyUsage, url: str, *, force: bool = False) -> str:
    """Retire `kid` (final: the keyring stops unwrapping with it) unless packages in `url` still need it."""
    if usage.needed_by and not force:
        raise KeyInUseError(
            f"key {kid} is still needed by {len(usage.needed_by)} package(s) in {url} (e.g. {usage.needed_by[0]}):"
            " re-wrap them first, or force")  # the command line adds the exact command (agent/cli/keys_cmd.py)
    keyring.set_state(kid, RETIRED)
    forced = f"; FORCED: {len(usage.needed_by)} package(s) can no longer be decrypted with this keyring" \
        if usage.needed_by else ""
    return f"retired key {kid} ({usage.packages} package(s) in {url} carry a wrap for it){forced}"


# -- rewrap ----------------------------------------------------------------------------------------


@dataclass
class RewrapReport:
    """What a re-wrap did: packages moved to `to_kid`, already fine, and failures (location, error)."""

    to_kid: str
    rewrapped: list[str] = field(default_factory=list)
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"rewrapped {len(self.rewrapped)} package(s) to key {self.to_kid}; {self.unchanged} left as they were;"
                f" {len(self.failed)} failed")


def rewrap_plan(header: codec.Header, ours: set[str], current: str, from_kid: str | None) -> list[codec.Wrap] | None:
    """The wraps to keep if this package should move to the current key, else None."""
    old = [w for w in header.wraps if w.kid in ours and w.kid != current]
    if not old or (from_kid is not None and from_kid not in {w.kid for w in old}):
        return None
    return [w for w in header.wraps if w.kid not in ours]  # other key holders' wraps stay


def rewrapped_header(header: codec.Header, keep: Sequence[codec.Wrap], unwrapper: codec.Unwrapper,
                     recipient: codec.Recipient) -> codec.Header:
    """`header` with `keep` plus a new wrap of its DEK for `recipient` (blocking: RSA; call it in a thread)."""
    dek = unwrapper.unwrap(header.wraps)
    header.open(dek)  # commitment and header MAC: never re-wrap a key that isn't this package's
    wrap = codec.wrap_dek(dek, recipient.public_key, recipient.kid, recipient.alg)
    del dek
    return header.with_wraps((*keep, wrap))
