#!/usr/bin/env bash
# The study of how close g2' and g2'' come to the true g2 (docs/math.md §§5, 8-10), every
# part in one run (about 100 minutes on a 2-core CPU), each writing its raw results and
# tables under RESULTS (default experiments/results):
#
#   bash experiments/hypergradient_study.sh [RESULTS]
#
#   toy_a1.py            the A.1 toy and the counterexample (seconds; printed only)
#   compare_products.py  exact against finite-difference products along three searches
#                        (RESULTS/compare_products; about 17 minutes on a 2-core CPU)
#   angle_study.py       g2', g2'' against a solved g2 at the searches' own weights
#                        (RESULTS/angle_study; about 14 minutes)
#   ground_truth.py      the same at a reached, strict inner optimum, where g2 is the
#                        true derivative (RESULTS/ground_truth, three seeds: 66 minutes),
#                        and the problem with weight decay towards zero, whose optimum
#                        ignores the image (RESULTS/ground_truth_zero_center; 2 minutes)
#
# Each script's --from_results rebuilds its tables and figures from the raw results
# without running anything (experiments/README.md).
set -eu
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
results=${1:-experiments/results}
"$py" experiments/toy_a1.py
"$py" experiments/compare_products.py --out="$results/compare_products" --seeds=0,1,2 \
  --points=0,15,30,45,60,75,90,105,120,135,150,165,180,195,210,225,240
"$py" experiments/angle_study.py --out="$results/angle_study" --iters=600
"$py" experiments/ground_truth.py --out="$results/ground_truth" --dense
"$py" experiments/ground_truth.py --out="$results/ground_truth_zero_center" --seeds=0 \
  --images=32 --val_images=32 --center=zero --bn_stats=unit --wd=1e-2 --lbfgs_steps=3000 \
  --dense
