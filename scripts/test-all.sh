#!/usr/bin/env bash
# All set-up, then every test: Node deps, the real local stack (Temporal, libvirt/QEMU, Ceph radosgw,
# nfs-ganesha), lint, typecheck, unit tests, integration tests against the real stack; then the unit tests
# and an integration subset again on Node 22.
# Re-runnable; used as-is by .ci/run.
#
# VMBACKUP_TEST_ORDER=reverse runs the test files in reverse path order; =random shuffles the files and the
# tests inside each file (jest --randomize) by VMBACKUP_TEST_SEED (default: a new seed, printed). A red run
# in another order is an order dependence: rerun it with the printed seed.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)

order=()
case "${VMBACKUP_TEST_ORDER:-default}" in
  default | reverse) ;;
  random)
    export VMBACKUP_TEST_SEED="${VMBACKUP_TEST_SEED:-$(( RANDOM * 32768 + RANDOM ))}"
    order=(--randomize --seed="$VMBACKUP_TEST_SEED")
    echo "== test order: random, seed $VMBACKUP_TEST_SEED (VMBACKUP_TEST_SEED=$VMBACKUP_TEST_SEED repeats it)" >&2
    ;;
  *) echo "VMBACKUP_TEST_ORDER must be default, reverse or random, not '$VMBACKUP_TEST_ORDER'" >&2; exit 2 ;;
esac
export VMBACKUP_TEST_ORDER="${VMBACKUP_TEST_ORDER:-default}"

bash scripts/node-deps.sh
bash scripts/stack.sh up
eval "$(bash scripts/stack.sh env)"

echo "== lint" >&2
npm run --silent lint
echo "== typecheck" >&2
npm run --silent typecheck

results=$(mktemp -d)
status=0
echo "== unit tests" >&2
npx jest "${order[@]}" --selectProjects unit --json --outputFile "$results/unit.json" || status=1
echo "== integration tests (real Temporal, libvirt/QEMU, radosgw, ganesha)" >&2
npx jest "${order[@]}" --selectProjects integration --runInBand --json --outputFile "$results/integration.json" || status=1

# Node 22 as well (the AWS SDK's releases after January 2027 need it): the unit tests and a representative
# integration subset (the CLI and a worker backing up to S3 and restoring, the CLI's own suite with the embedded
# default), on the same node_modules. Node from the npm registry (scripts/node22.sh); bin/vmbackup takes the
# first `node` on PATH.
echo "== Node 22: unit tests and an integration subset" >&2
if node22=$(bash scripts/node22.sh); then
  (
    export PATH="${node22%/*}:$PATH" VMBACKUP_TEST_NODE_MAJOR=22
    rc=0
    node node_modules/jest/bin/jest.js "${order[@]}" --selectProjects unit --json \
      --outputFile "$results/unit-node22.json" || rc=1
    node node_modules/jest/bin/jest.js "${order[@]}" --selectProjects integration --runInBand --json \
      --outputFile "$results/integration-node22.json" test/integration/node-runtime.test.ts test/integration/cli.test.ts ||
      rc=1
    exit $rc
  ) || status=1
else
  echo "vmbackup: could not install Node 22 (scripts/node22.sh)" >&2
  status=1
fi

# One plain summary line over all runs.
node -e '
  let p = 0, f = 0;
  for (const file of process.argv.slice(1)) {
    try { const r = require(file); p += r.numPassedTests; f += r.numFailedTests + (r.numRuntimeErrorTestSuites || 0); }
    catch { f += 1; }
  }
  console.log(`tests: ${p} passed, ${f} failed`);
' "$results/unit.json" "$results/integration.json" "$results/unit-node22.json" "$results/integration-node22.json"
echo "vmbackup: tests took $(( $(date +%s) - t0 ))s" >&2
exit $status
