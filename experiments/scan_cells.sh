#!/usr/bin/env bash
# Program size, compile time and step time with and without the scan over cells, one
# measurement after another in one run (about 30 minutes on a 2-core CPU):
#
#   bash experiments/scan_cells.sh OUT
#
# Search: the amended exact step of `s2_search` (s2, C=16, batch 64, 32x32x3) at 8 cells
# and at 20 cells scanned and unscanned, then the same at `tiny` (C=8, batch 16, 16x16x3)
# with the weight step too. Retraining: DARTS_V2's step (C=36, batch 96, 32x32x3, auxiliary
# head, drop-path) at 8 and 20 cells, scanned and unscanned. At 8 cells nothing is scanned
# (no two consecutive cells share their input shapes), so one form stands for both.
# Writes OUT/search_<size>_<layers>/results.jsonl (benchmark.py) and OUT/train.jsonl
# (train_speed.py, one line each); `python experiments/scan_cells_table.py OUT` tabulates them.
set -eu
[ $# -eq 1 ] || { echo "usage: bash experiments/scan_cells.sh OUT" >&2; exit 2; }
out=$1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
mkdir -p "$out"
for size in s2_search tiny; do
  methods=amended/exact
  [ "$size" = tiny ] && methods=weight_only,amended/exact
  "$py" experiments/benchmark.py --size=$size --layers=8 --methods=$methods --steps=2 \
    --out="$out/search_${size}_8"
  "$py" experiments/benchmark.py --size=$size --layers=20 --methods=$methods \
    --scan_cells=true,false --steps=2 --out="$out/search_${size}_20"
done
: > "$out/train.jsonl"
for run in "--layers=8" "--layers=20" "--layers=20 --noscan_cells"; do
  # shellcheck disable=SC2086
  "$py" experiments/train_speed.py $run --steps=2 | tail -n 1 >> "$out/train.jsonl"
done
