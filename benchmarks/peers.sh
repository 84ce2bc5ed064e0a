#!/bin/sh
# Install the peers that benchmarks/test_peers.py compares mediaseal with (called by `make bench-peers`).
# Python peers go into the project's venv, pinned, under constraints.txt (so nothing the agent uses moves);
# the age CLI and rclone (for its crypt remote) come from Debian (apt-get, as root only). A peer that cannot
# be installed is reported and its benchmark skips. Usage: benchmarks/peers.sh PYTHON
set -u
PY=${1:-.venv/bin/python}
PEERS_PIP="pyrage==1.4.0 tink==1.16.1 aws-encryption-sdk==4.0.7"

# shellcheck disable=SC2086
"$PY" -m pip install -q -c constraints.txt $PEERS_PIP \
  || echo "bench-peers: could not install the Python peers ($PEERS_PIP): their benchmarks will skip"

for tool in age gpg rclone; do
  command -v "$tool" >/dev/null 2>&1 && continue
  pkg=$tool; [ "$tool" = gpg ] && pkg=gnupg
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench-peers: installing $tool (Debian package $pkg)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg"; } \
      || echo "bench-peers: could not install $pkg: its benchmark will skip"
  else
    echo "bench-peers: $tool not found (install Debian package $pkg): its benchmark will skip"
  fi
done
exit 0
