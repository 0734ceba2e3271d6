#!/usr/bin/env bash
# npm run bench [-- --large] [-- --reps N] [-- --only limit,push,...,chunk-repo] [-- --smoke]
# npm run bench -- --only scale [--smoke] [...]   (= npm run bench:scale: how the orchestration scales)
# Brings up the real stack, builds vmbackup and the bench, installs the tools it compares with,
# runs bench/main.ts and renders the chart. Results: bench/results/latest.{json,md}, ratios.png.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'bench: %s\n' "$*" >&2; }
[[ $(id -u) == 0 ]] || { say 'run as root (libvirt system domains, drop_caches)'; exit 1; }
# `npm run bench -- --only scale [bench:scale's arguments]` is the scale bench (bench/scale/run.sh, docs/scale.md)
if [[ ${1:-} == --only && ${2:-} == scale ]]; then
  shift 2
  exec bash bench/scale/run.sh "$@"
fi

missing=()
command -v virtnbdbackup >/dev/null || missing+=(virtnbdbackup)
command -v rsvg-convert >/dev/null || missing+=(librsvg2-bin)
[[ -x /usr/bin/time ]] || missing+=(time)
command -v nfs-cp >/dev/null || missing+=(libnfs-utils)
# the chunk-repo group's peers (issue #15): Debian's restic 0.14 and borg 1.2
command -v restic >/dev/null || missing+=(restic)
command -v borg >/dev/null || missing+=(borgbackup)
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

bash scripts/stack.sh up
eval "$(bash scripts/stack.sh env)"
[[ -d node_modules ]] || npm ci --no-audit --no-fund
npm run --silent build
# compiled outside the tree (lint and prettier never see it); NODE_PATH finds the repo's node_modules
BUILD=$(mktemp -d /tmp/vmbackup-bench.XXXXXX)
trap 'rm -rf "$BUILD"' EXIT
# tsc still emits when another engineer's work in progress has a type error; the run shows if it matters
npx tsc -p bench/tsconfig.json --outDir "$BUILD" || say 'bench/tsconfig.json: type errors (emitted anyway)'
export NODE_PATH=$PWD/node_modules

# the AWS SDK warns on every start that future versions need Node 22; keep the log readable
export NODE_NO_WARNINGS=1
OUT=bench/results
for ((i = 1; i < $#; i++)); do [[ ${!i} == --out ]] && { j=$((i + 1)); OUT=${!j}; }; done
mkdir -p "$OUT"
node "$BUILD/bench/main.js" "$@"
rsvg-convert -w 1000 -b white -o "$OUT/ratios.png" "$OUT/latest.svg"
say "$OUT/latest.md, latest.json, ratios.png"
cat "$OUT/latest.md"
