"""The host tiers build their roots from the mirror this host's apt uses; it must be found."""

from __future__ import annotations

from debian_root import apt_mirror


def test_the_host_tiers_find_a_debian_mirror_in_the_apt_sources() -> None:
    uri = apt_mirror()
    assert uri.startswith(("http://", "https://", "file:/")) and "security" not in uri
