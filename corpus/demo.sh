#!/usr/bin/env bash
# `make demo`: build the offline corpus, train the tiny model for a few minutes on the best
# device here (CUDA if a GPU works, else OpenCL - PoCL on a CPU), then print a sample.
# DEMO_STEPS (default 400) and DEMO_RUN (default runs/demo) change the run.
set -euo pipefail
cd "$(dirname "$0")/.."
REALM=${REALM:-build/realm}
STEPS=${DEMO_STEPS:-400}
RUN=${DEMO_RUN:-runs/demo}
"$REALM" info
[ -f data/corpus.bin ] || bash corpus/recipes/offline.sh data/corpus.bin
"$REALM" corpus info data/corpus.bin
"$REALM" graph models/tiny.lua
mkdir -p "$(dirname "$RUN")"
"$REALM" train models/tiny.lua --data data/corpus.bin --out "$RUN" --steps "$STEPS" --batch 16 --seq 128 \
  --eval-every 100 --save-every 100 --log-every 20
# the checkpoint of the lowest validation loss (the trainer keeps it in RUN/best)
FROM=$RUN
[ -f "$RUN/best/latest" ] && FROM=$RUN/best
echo
echo "--- sample (realm generate $FROM --prompt 'The ' -n 300 --seed 1) ---"
"$REALM" generate "$FROM" --prompt "The " -n 300 --temperature 0.8 --seed 1
