#!/usr/bin/env bash
# Node 22 for running and testing vmbackup on it, installed from the npm registry: the package
# node-linux-<arch> carries the official Node binary for Linux (nothing is downloaded from anywhere else).
# It goes under the state dir's tools, beside the Temporal CLI:
#
#   scripts/node22.sh     installs it when missing, prints the path of its `node` (stdout only)
#
# Run vmbackup on it with `VMBACKUP_NODE=$(scripts/node22.sh) vmbackup ...`, or by putting its directory first
# on PATH. The same node_modules work on Node 20 and 22: Temporal's core bridge is an N-API addon.
set -euo pipefail

STATE=${VMBACKUP_STATE_DIR:-${HOME:?}/.local/state/vmbackup}
DIR=$(realpath -m -- "$STATE")/tools/node22
MAJOR=22
case $(uname -m) in
  x86_64) ARCH=x64 ;;
  aarch64 | arm64) ARCH=arm64 ;;
  *) echo "node22: no node-linux package for $(uname -m)" >&2; exit 1 ;;
esac
PKG=node-linux-$ARCH
NODE=$DIR/node_modules/$PKG/bin/node

installed() { [[ -x $NODE ]] && [[ $("$NODE" --version 2>/dev/null) == v$MAJOR.* ]]; }

if ! installed; then
  command -v npm >/dev/null || { echo "node22: npm is needed to install $PKG@$MAJOR" >&2; exit 1; }
  mkdir -p "$DIR"
  echo "node22: installing $PKG@$MAJOR from the npm registry into $DIR" >&2
  # --ignore-scripts: the package is the binary itself and needs no install step
  npm install --prefix "$DIR" --no-save --no-package-lock --no-audit --no-fund --ignore-scripts \
    "$PKG@$MAJOR" >&2
  installed || { echo "node22: $NODE is not a working Node $MAJOR after the install" >&2; exit 1; }
fi
echo "$NODE"
