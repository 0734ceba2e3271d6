#!/usr/bin/env bash
# bash bench/snapshot-copy-ab.sh --out DIR [--size-mib 1024] [--reps 3] [--baseline DIST]
#
# The snapshot method's copy step alone, A/B in one run on one qcow2 image (half random data, half never
# written), cold page cache before every run (root: drop_caches):
#   cp          cp --sparse=always + sync of the copy (the baseline)
#   own         vmbackup's own single-pass copy (--copy-tool auto: copyImage, holes from qemu-img map), from dist/
#   cp+hashes   --copy-tool cp as copyBaseImages runs it: cp, then SHA-256 of the base and of the copy
#   rsync+hashes --copy-tool rsync likewise
#   own@baseline with --baseline DIST: `own` from another build's dist/ (a checkout of the commit to compare
#               with, `npm run build` there, node_modules reachable from it), to A/B a change of the copy
# The cases take turns within each repetition. Wall and CPU times (user+sys, /usr/bin/time) include
# process start-up; for the Node cases the time inside the copy function (what a running worker
# spends) is recorded too, and beside each sample the load average and the CPU time everything else on the
# machine used meanwhile (/proc/stat minus the case's own): on a shared machine, samples taken while
# others were busy can be told apart.
# Samples: DIR/samples.txt; medians: DIR/results.json. Needs `npm run build` first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT='' SIZE=1024 REPS=3 BASELINE=''
while (($#)); do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    --size-mib) SIZE=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --baseline) BASELINE=$(cd "$2" && pwd); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n $OUT ]] || { echo 'give --out DIR (never bench/results)' >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo 'run as root (drop_caches)' >&2; exit 1; }
[[ -f dist/activities/single-pass-copy.js ]] || { echo 'dist/ is missing: npm run build' >&2; exit 1; }
[[ -z $BASELINE || -f $BASELINE/activities/snapshot-copy.js ]] || { echo "--baseline: no build in $BASELINE" >&2; exit 1; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DIST=$PWD/dist
base=$OUT/base.qcow2
if [[ ! -f $base ]]; then
  head -c $((SIZE / 2))M /dev/urandom >"$OUT/half.raw"
  truncate -s "${SIZE}M" "$OUT/half.raw"
  # preallocation=metadata: the image file is SIZE long, the never-written half a hole
  qemu-img convert -f raw -O qcow2 -o preallocation=metadata "$OUT/half.raw" "$base"
  rm "$OUT/half.raw"
fi

cold() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# The Node cases print the milliseconds spent inside the copy (and hashing) functions.
OWN="
  const [dest, dist] = process.argv.slice(1);
  const { copyImage } = require(dist + '/activities/snapshot-copy.js');
  const t = performance.now();
  copyImage({ source: '$base', dest, tool: 'auto', rsyncPath: 'rsync', signal: new AbortController().signal, onProgress() {} })
    .then(() => console.log(Math.round(performance.now() - t)));"
HASHED="
  const { copyImage, sha256File } = require('$DIST/activities/snapshot-copy.js');
  const [dest, tool] = process.argv.slice(1);
  const signal = new AbortController().signal;
  const t = performance.now();
  copyImage({ source: '$base', dest, tool, rsyncPath: 'rsync', signal, onProgress() {} })
    .then(() => Promise.all([sha256File('$base', signal, () => {}), sha256File(dest, signal, () => {})]))
    .then(([a, b]) => { if (a !== b) throw new Error('copy differs'); console.log(Math.round(performance.now() - t)); });"

# CPU time (ms) all processes used so far: user + nice + system + irq + softirq
busy_ms() { awk -v hz="$(getconf CLK_TCK)" '/^cpu / { printf "%d", ($2 + $3 + $4 + $7 + $8) * 1000 / hz }' /proc/stat; }

# one run of a case: prints "<wall ms> <cpu ms, user+sys, children included> <in-function ms or ->"
run_case() { # $1 case, $2 dest
  local fn
  # shellcheck disable=SC2016 # "$1" and "$2" of the cp line are the inner shell's
  case $1 in
    cp) /usr/bin/time -f '%e %U %S' -o "$OUT/time" sh -c 'cp --sparse=always "$1" "$2" && sync -f "$2"' sh "$base" "$2"; fn=- ;;
    own) fn=$(/usr/bin/time -f '%e %U %S' -o "$OUT/time" node -e "$OWN" "$2" "$DIST") ;;
    own@baseline) fn=$(/usr/bin/time -f '%e %U %S' -o "$OUT/time" node -e "$OWN" "$2" "$BASELINE") ;;
    cp+hashes) fn=$(/usr/bin/time -f '%e %U %S' -o "$OUT/time" node -e "$HASHED" "$2" cp) ;;
    rsync+hashes) fn=$(/usr/bin/time -f '%e %U %S' -o "$OUT/time" node -e "$HASHED" "$2" rsync) ;;
  esac
  awk -v fn="$fn" '{ printf "%d %d %s\n", $1 * 1000, ($2 + $3) * 1000, fn }' "$OUT/time"
}

cases=(cp own cp+hashes rsync+hashes)
[[ -z $BASELINE ]] || cases+=(own@baseline)
: >"$OUT/samples.txt"
for ((r = 1; r <= REPS; r++)); do
  for ((i = 0; i < ${#cases[@]}; i++)); do
    c=${cases[$(((i + r) % ${#cases[@]}))]}
    dest=$OUT/copy.qcow2
    rm -f "$dest"
    cold
    busy=$(busy_ms)
    res=$(run_case "$c" "$dest")
    others=$(($(busy_ms) - busy - $(cut -d' ' -f2 <<<"$res")))
    cmp -s "$base" "$dest" || { echo "$c: the copy differs from the base" >&2; exit 1; }
    echo "$r $c $res $(cut -d' ' -f1 /proc/loadavg) $((others < 0 ? 0 : others))" | tee -a "$OUT/samples.txt" >&2
    rm -f "$dest"
  done
done

node -e "
  const lines = require('fs').readFileSync('$OUT/samples.txt', 'utf8').trim().split('\n').map((l) => l.split(' '));
  const median = (xs) => { const s = xs.filter((x) => !isNaN(x)).sort((a, b) => a - b); return s.length ? s[(s.length - 1) >> 1] : null; };
  const range = (xs) => { const s = xs.filter((x) => !isNaN(x)); return s.length ? [Math.min(...s), Math.max(...s)] : null; };
  const out = {};
  for (const c of '${cases[*]}'.split(' ')) {
    const mine = lines.filter((l) => l[1] === c);
    out[c] = {
      wallMs: median(mine.map((l) => Number(l[2]))),
      wallRangeMs: range(mine.map((l) => Number(l[2]))),
      cpuMs: median(mine.map((l) => Number(l[3]))),
      inFunctionMs: median(mine.map((l) => Number(l[4]))),
      inFunctionRangeMs: range(mine.map((l) => Number(l[4]))),
      othersCpuMs: median(mine.map((l) => Number(l[6]))),
    };
  }
  for (const c of Object.keys(out)) {
    out[c].vsCp = +(out[c].wallMs / out.cp.wallMs).toFixed(2);
    if (out[c].inFunctionMs !== null) out[c].inFunctionVsCp = +(out[c].inFunctionMs / out.cp.wallMs).toFixed(2);
  }
  require('fs').writeFileSync('$OUT/results.json', JSON.stringify({ sizeMiB: $SIZE, reps: $REPS, medians: out }, null, 2));
  console.log(JSON.stringify(out, null, 2));
"
