#!/bin/sh
# Build the Debian package for premises hosts: dist/mediaseal_<version>_<arch>.deb (`make deb`).
#
#   sh packaging/debian/build-deb.sh WHEEL [OUTDIR]
#
# What the package holds (operators install it with `apt install ./mediaseal_<v>_amd64.deb`):
#   /opt/mediaseal/               a venv: Debian's python3.11, the wheel and its pinned tree (constraints.txt)
#   /lib/systemd/system/          the units of packaging/systemd/, as shipped (installed, never enabled)
#   /usr/lib/sysusers.d/          the `mediaseal` system user (systemd-sysusers, run by postinst)
#   /etc/mediaseal/mediaseal.toml the example config, a conffile (root:mediaseal 0640 by dpkg-statoverride)
#   /usr/share/doc/mediaseal/     copyright, README.Debian, the example config and a site drop-in
#
# Why the venv is built here and not by postinst: dpkg then owns every file (`dpkg -L`, `dpkg -S`,
# `dpkg --verify` and removal all see the whole venv), installing needs no pip and no index, and the
# tree on the host is exactly the tree that was built and tested. A venv is not relocatable, so it is
# built in a staging directory and moved to /opt/mediaseal by rewriting the few places that name its
# path: the `#!` lines pip wrote into bin/, the activate scripts and pyvenv.cfg; bytecode is compiled
# with the final path (compileall -s/-p) and with hash-based invalidation (dpkg may clamp mtimes).
# The build fails if the staging path is left anywhere in the tree. The venv is made with Debian's
# own interpreter (/usr/bin/python3.X, resolved), so its links name a path every bookworm host has,
# and the package depends on exactly that interpreter package (python3.X): a venv is bound to its
# minor version. Compiled dependency wheels (cryptography, uvloop, aiohttp, ...) make it
# architecture-specific: the architecture is this host's (dpkg --print-architecture).
#
# Environment: DEB_PYTHON (default /usr/bin/python3), DEB_MAINTAINER, SOURCE_DATE_EPOCH (default: the
# last commit's time, for reproducible mtimes), PIP_* (the usual pip settings, for the dependency index).
set -eu

WHEEL=${1:?usage: build-deb.sh WHEEL [OUTDIR]}
OUTDIR=${2:-dist}
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
PREFIX=/opt/mediaseal
MAINTAINER=${DEB_MAINTAINER:-mediaseal maintainers <mediaseal@localhost>}

die() { echo "build-deb: $*" >&2; exit 1; }
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (Debian's dpkg package)"
[ -f "$WHEEL" ] || die "no wheel at $WHEEL (make wheel)"

PY=$(readlink -f "${DEB_PYTHON:-/usr/bin/python3}")
[ -x "$PY" ] || die "no interpreter at ${DEB_PYTHON:-/usr/bin/python3}"
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
case "$PY" in
    /usr/bin/python$PYVER) ;;
    *) die "$PY is not Debian's /usr/bin/python$PYVER: the venv must link to the interpreter the target has" ;;
esac
"$PY" -c 'import ensurepip' 2>/dev/null || die "$PY cannot make venvs (apt-get install python$PYVER-venv)"

# Version: pyproject.toml's, in Debian's spelling (a PEP 440 pre-release sorts before the release: ~).
PEP440=$(sed -n 's/^version = "\(.*\)"/\1/p' "$TOP/pyproject.toml")
[ -n "$PEP440" ] || die "no version in pyproject.toml"
VERSION=$(printf '%s' "$PEP440" | sed -E 's/\.?(a|b|rc|dev)([0-9]+)/~\1\2/g; s/\.post([0-9]+)/+post\1/')
ARCH=$(dpkg --print-architecture)
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$TOP" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mediaseal-deb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM
STAGE=$WORK/root
VENV=$STAGE$PREFIX
mkdir -p "$STAGE"

# -- the venv ---------------------------------------------------------------------------------------
"$PY" -m venv "$VENV"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q --no-cache-dir --no-compile \
    -c "$TOP/constraints.txt" "$WHEEL"
"$VENV/bin/python" -c 'import mediaseal.agent.cli, mediaseal.keys.lkm'  # it imports, before it moves

find "$VENV" -name __pycache__ -type d -prune -exec rm -rf {} +
for f in "$VENV"/bin/*; do  # pip's scripts: "#!<staging>/bin/python"
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    if head -n 1 "$f" | grep -q "^#!$VENV/"; then sed -i "1s|^#!$VENV/|#!$PREFIX/|" "$f"; fi
done
sed -i "s|$VENV|$PREFIX|g" "$VENV/pyvenv.cfg" "$VENV"/bin/activate "$VENV"/bin/activate.csh "$VENV"/bin/activate.fish
"$PY" -m compileall -q -j 0 --invalidation-mode unchecked-hash -s "$STAGE" -p / "$VENV/lib" >/dev/null
left=$(grep -rlF "$STAGE" "$STAGE" || true)
[ -z "$left" ] || die "the staging path is still named in: $left"

# -- units, user, config, docs ----------------------------------------------------------------------
install -d "$STAGE/lib/systemd/system" "$STAGE/usr/lib/sysusers.d" "$STAGE/etc/mediaseal" \
    "$STAGE/usr/share/doc/mediaseal/examples" "$STAGE/DEBIAN"
for u in "$TOP"/packaging/systemd/*.service "$TOP"/packaging/systemd/*.timer; do
    install -m 0644 "$u" "$STAGE/lib/systemd/system/"
done
install -m 0644 "$HERE/mediaseal.sysusers" "$STAGE/usr/lib/sysusers.d/mediaseal.conf"
install -m 0640 "$TOP/packaging/mediaseal.example.toml" "$STAGE/etc/mediaseal/mediaseal.toml"
install -m 0644 "$TOP/packaging/mediaseal.example.toml" "$STAGE/usr/share/doc/mediaseal/examples/"
install -m 0644 "$TOP/packaging/systemd/site-paths.conf" "$STAGE/usr/share/doc/mediaseal/examples/"
install -m 0644 "$HERE/copyright" "$HERE/README.Debian" "$STAGE/usr/share/doc/mediaseal/"

# -- control ----------------------------------------------------------------------------------------
for s in postinst prerm postrm; do install -m 0755 "$HERE/$s" "$STAGE/DEBIAN/$s"; done
printf '/etc/mediaseal/mediaseal.toml\n' > "$STAGE/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
sed -e "s|@VERSION@|$VERSION|" -e "s|@ARCH@|$ARCH|" -e "s|@SIZE@|$SIZE|" -e "s|@PYTHON@|python$PYVER|" \
    -e "s|@MAINTAINER@|$MAINTAINER|" "$HERE/control.in" > "$STAGE/DEBIAN/control"
(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
    > "$STAGE/DEBIAN/md5sums"

mkdir -p "$OUTDIR"
OUT=$OUTDIR/mediaseal_${VERSION}_$ARCH.deb
# xz at level 1: measured here, 36 MB in 26 s against 33 MB in 3 min for dpkg's default level 6.
dpkg-deb --root-owner-group -Zxz -z1 --build "$STAGE" "$OUT.partial" >/dev/null
mv "$OUT.partial" "$OUT"
echo "$OUT"
