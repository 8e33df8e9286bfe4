#!/usr/bin/env bash
# Two builds of realm side by side, in one command on one card: ms/step, tokens/s and the time
# per kernel class of each, with the ratio new/old, then each build's slowest kernels. The way
# to measure a change: run the build before it and the build with it here, never in two calls.
#
#   bash bench/compare.sh OLD/realm NEW/realm [B S]      # default 8 8192 (realm-9m, CUDA)
#   BENCH_STEPS=3 BENCH_BACKEND=opencl BENCH_MODEL=models/tiny.lua bash bench/compare.sh ...
set -u -o pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: bench/compare.sh OLD_BIN NEW_BIN [B S]" >&2; exit 2; }
OLD=$1 NEW=$2 B=${3:-8} S=${4:-8192}
for b in "$OLD" "$NEW"; do [ -x "$b" ] || { echo "bench/compare.sh: $b is not an executable" >&2; exit 2; }; done
MODEL=${BENCH_MODEL:-models/realm-9m.lua} STEPS=${BENCH_STEPS:-3} BACKEND=${BENCH_BACKEND:-cuda}
OUTDIR=${BENCH_OUT:-build/bench}
mkdir -p "$OUTDIR"
i=0
for b in "$OLD" "$NEW"; do
  log="$OUTDIR/compare_$i.log"
  "$b" bench "$MODEL" --backend "$BACKEND" --batch "$B" --seq "$S" --steps "$STEPS" --warmup 1 >"$log" 2>&1 ||
    { echo "bench/compare.sh: $b failed (see $log):" >&2; tail -3 "$log" >&2; exit 1; }
  i=$((i + 1))
done
echo "$MODEL, B=$B S=$S, $BACKEND; old: $OLD, new: $NEW"
# the RESULT lines: key=value fields, the same keys in both
paste -d'\n' <(grep '^RESULT ' "$OUTDIR/compare_0.log" | tail -1) <(grep '^RESULT ' "$OUTDIR/compare_1.log" | tail -1) |
  awk '{ for (f = 2; f <= NF; f++) { split($f, kv, "="); if (NR == 1) { key[f] = kv[1]; old[f] = kv[2] } else new[f] = kv[2] } n = NF }
       END { printf "%-16s %14s %14s %9s\n", "", "old", "new", "new/old"
             for (f = 2; f <= n; f++) {
               k = key[f]; if (k == "backend" || k == "B" || k == "S" || k == "flops_tok" || k == "peak_tflops") continue
               r = old[f] + 0 > 0 ? sprintf("%.3f", new[f] / old[f]) : "-"
               printf "%-16s %14s %14s %9s\n", k, old[f], new[f], r } }'
for i in 0 1; do
  echo
  echo "$([ $i = 0 ] && echo old || echo new):"
  sed -n '/^slowest kernels/,/^$/p' "$OUTDIR/compare_$i.log" | head -12
done
