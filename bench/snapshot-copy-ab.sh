#!/usr/bin/env bash
# bash bench/snapshot-copy-ab.sh --out DIR [--size-mib 1024] [--reps 3]
#
# The snapshot method's copy step alone, A/B in one run on one qcow2 image (half random data, half never
# written), cold page cache before every run (root: drop_caches):
#   cp          cp --sparse=always + sync of the copy (the baseline)
#   own         vmbackup's own single-pass copy (--copy-tool auto: copyImage, holes from qemu-img map), from dist/
#   cp+hashes   --copy-tool cp as copyBaseImages runs it: cp, then SHA-256 of the base and of the copy
#   rsync+hashes --copy-tool rsync likewise
# The cases take turns within each repetition. Wall times include process start-up; for the Node cases
# the time inside the copy function (what a running worker spends) is printed too. Medians go to
# DIR/results.json. Needs `npm run build` first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT='' SIZE=1024 REPS=3
while (($#)); do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    --size-mib) SIZE=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n $OUT ]] || { echo 'give --out DIR (never bench/results)' >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo 'run as root (drop_caches)' >&2; exit 1; }
[[ -f dist/activities/single-pass-copy.js ]] || { echo 'dist/ is missing: npm run build' >&2; exit 1; }
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
now() { date +%s%N; }

# each case: prints "<wall ms> <in-function ms or ->"
case_cp() {
  local t0; t0=$(now)
  cp --sparse=always "$base" "$1" && sync -f "$1"
  echo "$((($(now) - t0) / 1000000)) -"
}
case_own() { # copyImage as copyBaseImages calls it for --copy-tool auto (qemu-img map, then the copy)
  local t0; t0=$(now)
  local fn
  fn=$(node -e "
    const { copyImage } = require('$DIST/activities/snapshot-copy.js');
    const t = performance.now();
    copyImage({ source: '$base', dest: '$1', tool: 'auto', rsyncPath: 'rsync', signal: new AbortController().signal, onProgress() {} })
      .then(() => console.log(Math.round(performance.now() - t)));")
  echo "$((($(now) - t0) / 1000000)) $fn"
}
case_hashed() { # $1 dest, $2 tool
  local t0; t0=$(now)
  local fn
  fn=$(node -e "
    const { copyImage, sha256File } = require('$DIST/activities/snapshot-copy.js');
    const signal = new AbortController().signal;
    const t = performance.now();
    copyImage({ source: '$base', dest: '$1', tool: '$2', rsyncPath: 'rsync', signal, onProgress() {} })
      .then(() => Promise.all([sha256File('$base', signal, () => {}), sha256File('$1', signal, () => {})]))
      .then(([a, b]) => { if (a !== b) throw new Error('copy differs'); console.log(Math.round(performance.now() - t)); });")
  echo "$((($(now) - t0) / 1000000)) $fn"
}

cases=(cp own cp+hashes rsync+hashes)
: >"$OUT/samples.txt"
for ((r = 1; r <= REPS; r++)); do
  for ((i = 0; i < ${#cases[@]}; i++)); do
    c=${cases[$(((i + r) % ${#cases[@]}))]}
    dest=$OUT/copy.qcow2
    rm -f "$dest"
    cold
    case $c in
      cp) res=$(case_cp "$dest") ;;
      own) res=$(case_own "$dest") ;;
      cp+hashes) res=$(case_hashed "$dest" cp) ;;
      rsync+hashes) res=$(case_hashed "$dest" rsync) ;;
    esac
    cmp -s "$base" "$dest" || { echo "$c: the copy differs from the base" >&2; exit 1; }
    echo "$r $c $res" | tee -a "$OUT/samples.txt" >&2
    rm -f "$dest"
  done
done

node -e "
  const lines = require('fs').readFileSync('$OUT/samples.txt', 'utf8').trim().split('\n').map((l) => l.split(' '));
  const median = (xs) => { const s = xs.filter((x) => !isNaN(x)).sort((a, b) => a - b); return s.length ? s[(s.length - 1) >> 1] : null; };
  const out = {};
  for (const c of '${cases[*]}'.split(' ')) {
    const mine = lines.filter((l) => l[1] === c);
    out[c] = { wallMs: median(mine.map((l) => Number(l[2]))), inFunctionMs: median(mine.map((l) => Number(l[3]))) };
  }
  for (const c of Object.keys(out)) {
    out[c].vsCp = +(out[c].wallMs / out.cp.wallMs).toFixed(2);
    if (out[c].inFunctionMs !== null) out[c].inFunctionVsCp = +(out[c].inFunctionMs / out.cp.wallMs).toFixed(2);
  }
  require('fs').writeFileSync('$OUT/results.json', JSON.stringify({ sizeMiB: $SIZE, reps: $REPS, medians: out }, null, 2));
  console.log(JSON.stringify(out, null, 2));
"
