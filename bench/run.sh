#!/usr/bin/env bash
# realm-9m training throughput on one GPU: realm (CUDA) against the same model in PyTorch,
# eager and torch.compile (bf16 autocast), at the same batch and sequence, in one run on one
# card. Prints one table with ratios; logs go to $BENCH_OUT (default build/bench).
#
#   make bench                                  # or: bash bench/run.sh
#   BENCH_SHAPES="8x8192 64x1024" BENCH_STEPS=10 BENCH_MODES="eager compile" bash bench/run.sh
#
# Needs an NVIDIA GPU, build/realm, and python3 with torch (only torch_ref.py uses Python).
set -u -o pipefail
cd "$(dirname "$0")/.."
REALM=${REALM_BIN:-build/realm}
SHAPES=${BENCH_SHAPES:-"8x8192 64x1024"}
STEPS=${BENCH_STEPS:-10}
WARMUP=${BENCH_WARMUP:-2}
MODES=${BENCH_MODES-"eager compile"}   # "" runs realm alone
BACKEND=${BENCH_BACKEND:-cuda}          # opencl: exercise this script without a GPU
OUTDIR=${BENCH_OUT:-build/bench}   # build/ is ignored by git
mkdir -p "$OUTDIR"
[ -x "$REALM" ] || { echo "bench: $REALM not built (run make)" >&2; exit 2; }

# field NAME LINE: the value of NAME=... in a RESULT line ("" if absent)
field() { printf '%s\n' "$2" | tr ' ' '\n' | sed -n "s|^$1=||p" | head -1; }

declare -A TOK MS CLS FLOPS PEAKTF MEM
rows=()
for shape in $SHAPES; do
  B=${shape%x*} S=${shape#*x}
  rows+=("$B $S")
  log="$OUTDIR/realm_B${B}_S${S}.log"
  echo "== realm bench B=$B S=$S" >&2
  "$REALM" bench "${BENCH_MODEL:-models/realm-9m.lua}" --backend "$BACKEND" --batch "$B" --seq "$S" --steps "$STEPS" --warmup "$WARMUP" \
    >"$log" 2>&1 || echo "bench: realm failed at B=$B S=$S (see $log)" >&2
  cat "$log" >&2
  r=$(grep '^RESULT ' "$log" | tail -1)
  TOK[realm,$B,$S]=$(field tok_s "$r")
  MS[realm,$B,$S]=$(field ms_step "$r")
  CLS[$B,$S]=$r
  FLOPS[$B,$S]=$(field flops_tok "$r")
  PEAKTF[$B,$S]=$(field peak_tflops "$r")
  MEM[realm,$B,$S]=$(field peak_mib "$r")
  for mode in $MODES; do
    log="$OUTDIR/torch_${mode}_B${B}_S${S}.log"
    echo "== torch $mode B=$B S=$S" >&2
    PYTHONUNBUFFERED=1 python3 bench/torch_ref.py --mode "$mode" --batch "$B" --seq "$S" --steps "$STEPS" \
      --warmup 3 --realm-bin "$REALM" >"$log" 2>&1 || echo "bench: torch $mode failed at B=$B S=$S (see $log)" >&2
    tail -5 "$log" >&2
    r=$(grep '^RESULT ' "$log" | tail -1)
    TOK[$mode,$B,$S]=$(field tok_s "$r")
    MS[$mode,$B,$S]=$(field ms_step "$r")
    MEM[$mode,$B,$S]=$(field peak_mib "$r")
  done
done

ratio() { if [ -n "$1" ] && [ -n "$2" ]; then awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; else echo "-"; fi; }
num() { if [ -n "$1" ]; then printf "%.0f" "$1"; else echo "-"; fi; }
msf() { if [ -n "$1" ]; then printf "%.1f" "$1"; else echo "-"; fi; }
mflops() { if [ -n "$1" ]; then awk -v f="$1" 'BEGIN { printf "%.2fM", f / 1e6 }'; else echo "-"; fi; }
# mfu TOK_S FLOPS_PER_TOKEN PEAK_TFLOPS: a percentage, "-" where any is unknown (no datasheet peak)
mfu() { if [ -n "$1" ] && [ -n "$2" ] && [ -n "$3" ]; then awk -v t="$1" -v f="$2" -v p="$3" 'BEGIN { printf "%.2f%%", 100 * t * f / (p * 1e12) }'; else echo "-"; fi; }

dev=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
torchv=$(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null)
{
  echo
  echo "$(basename "${BENCH_MODEL:-models/realm-9m.lua}" .lua) training step (fwd+bwd+clip+AdamW), tokens/s (ms/step), on ${dev:-unknown GPU}; torch ${torchv:-?}"
  printf '| %-6s | %-6s | %-20s | %-20s | %-20s | %-13s | %-15s |\n' B S realm "torch eager" "torch compile" "realm/eager" "realm/compile"
  printf '|%s|%s|%s|%s|%s|%s|%s|\n' -------- -------- ---------------------- ---------------------- ---------------------- --------------- -----------------
  for row in "${rows[@]}"; do
    set -- $row
    B=$1 S=$2
    printf '| %-6s | %-6s | %-20s | %-20s | %-20s | %-13s | %-15s |\n' "$B" "$S" \
      "$(num "${TOK[realm,$B,$S]:-}") ($(msf "${MS[realm,$B,$S]:-}"))" \
      "$(num "${TOK[eager,$B,$S]:-}") ($(msf "${MS[eager,$B,$S]:-}"))" \
      "$(num "${TOK[compile,$B,$S]:-}") ($(msf "${MS[compile,$B,$S]:-}"))" \
      "$(ratio "${TOK[realm,$B,$S]:-}" "${TOK[eager,$B,$S]:-}")" \
      "$(ratio "${TOK[realm,$B,$S]:-}" "${TOK[compile,$B,$S]:-}")"
  done
  echo
  echo "MFU: FLOPs/token from realm's graph (the same model for all three) x tokens/s, against the card's bf16 dense peak; peak device memory, MiB"
  printf '| %-6s | %-6s | %-10s | %-12s | %-12s | %-13s | %-11s | %-11s | %-13s |\n' B S "FLOPs/tok" "realm MFU" "eager MFU" "compile MFU" "realm MiB" "eager MiB" "compile MiB"
  printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' -------- -------- ------------ -------------- -------------- --------------- ------------- ------------- ---------------
  for row in "${rows[@]}"; do
    set -- $row
    B=$1 S=$2
    printf '| %-6s | %-6s | %-10s | %-12s | %-12s | %-13s | %-11s | %-11s | %-13s |\n' "$B" "$S" \
      "$(mflops "${FLOPS[$B,$S]:-}")" \
      "$(mfu "${TOK[realm,$B,$S]:-}" "${FLOPS[$B,$S]:-}" "${PEAKTF[$B,$S]:-}")" \
      "$(mfu "${TOK[eager,$B,$S]:-}" "${FLOPS[$B,$S]:-}" "${PEAKTF[$B,$S]:-}")" \
      "$(mfu "${TOK[compile,$B,$S]:-}" "${FLOPS[$B,$S]:-}" "${PEAKTF[$B,$S]:-}")" \
      "$(num "${MEM[realm,$B,$S]:-}")" "$(num "${MEM[eager,$B,$S]:-}")" "$(num "${MEM[compile,$B,$S]:-}")"
  done
  echo
  echo "realm device time per kernel class, ms/step (per-launch events; see the realm logs for per-primitive)"
  classes="matmul scan attention elementwise norm embedding/loss optimizer"
  printf '| %-6s | %-6s |' B S; for c in $classes; do printf ' %-14s |' "$c"; done; echo
  printf '|%s|%s|' -------- --------; for c in $classes; do printf '%s|' ----------------; done; echo
  for row in "${rows[@]}"; do
    set -- $row
    B=$1 S=$2
    printf '| %-6s | %-6s |' "$B" "$S"
    for c in $classes; do printf ' %-14s |' "$(msf "$(field "$c" "${CLS[$B,$S]:-}")")"; done
    echo
  done
} | tee "$OUTDIR/table.md"

# Decode: per-byte cost of the step graph at several positions (flat by design), batch 1 and
# 64, beside the same recurrent step in eager PyTorch; and the parallel prefill of a prompt of
# each length (realm's lines "position P: parallel prefill of ..."). A 2-step run gives a checkpoint (the
# weights do not change the cost). BENCH_DECODE=0 skips it.
if [ "${BENCH_DECODE:-1}" != 0 ]; then
  POS=${BENCH_POSITIONS:-1024,16384,262144}
  run="$OUTDIR/decode-run"
  rm -rf "$run"
  "$REALM" train "${BENCH_MODEL:-models/realm-9m.lua}" --data README.md --out "$run" --backend "$BACKEND" \
    --batch 1 --seq 64 --steps 2 --eval-every 0 >"$OUTDIR/decode-train.log" 2>&1 || echo "bench: decode run failed" >&2
  {
    echo
    echo "decode, ms per step (one byte per sequence) and parallel prefill bytes/s at positions $POS"
    for B in 1 64; do
      "$REALM" generate "$run" --bench "$POS" --batch "$B" --backend "$BACKEND" 2>&1 | grep '^position' | sed "s/^/realm batch $B: /"
      if [ -n "$MODES" ]; then
        PYTHONUNBUFFERED=1 python3 bench/torch_ref.py --mode decode --batch "$B" --positions "$POS" --steps 32 \
          --realm-bin "$REALM" 2>&1 | grep '^torch eager decode' || echo "torch decode failed at batch $B"
      fi
    done
  } | tee -a "$OUTDIR/table.md"
fi
