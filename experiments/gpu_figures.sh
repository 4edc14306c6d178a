#!/usr/bin/env bash
# The GPU figures the performance issue asks for, in parts sized for short device leases:
#
#   bash experiments/gpu_figures.sh OUT PEAK_TFLOPS darts   # darts_search: 4 steps, 110 s limit each
#   bash experiments/gpu_figures.sh OUT PEAK_TFLOPS s2      # s2_search, all seven operations,
#                                                           # remat off and on, 150 s limit each
#   bash experiments/gpu_figures.sh OUT PEAK_TFLOPS darts s2
#
# Each part is one `benchmark.py` run (compile time, median step, device peak memory, XLA's
# buffer plan, XLA's FLOP count and the FLOP/s it reaches, the share of PEAK_TFLOPS, and the
# CIFAR-10 search epoch extrapolated from the step time) under OUT/<part>/. PEAK_TFLOPS is the
# chip's peak for float32 convolutions as XLA runs them (TF32 tensor cores on NVIDIA Ampere and
# later); 0 leaves the share out. Every measurement runs in its own process under its own time
# limit, so one slow compile cannot take the others with it. Exits non-zero if any part failed.
set -u
usage="usage: bash experiments/gpu_figures.sh OUT PEAK_TFLOPS darts|s2 [darts|s2]"
[ $# -ge 3 ] || { echo "error: give OUT, PEAK_TFLOPS and at least one part; $usage" >&2; exit 2; }
out=$1 peak=$2
shift 2
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
status=0
for part in "$@"; do
  case $part in
    darts) args=(--size=darts_search --methods=weight_only,first_order,amended/exact,amended/fd
                 --steps=10 --warmup=2 --timeout_s=110) ;;
    s2) args=(--size=s2_search --space=s2_all --methods=amended/exact --remat=false,true
              --steps=5 --warmup=1 --timeout_s=150) ;;
    *) echo "error: unknown part '$part' (darts or s2)" >&2; exit 2 ;;
  esac
  "$py" experiments/benchmark.py "${args[@]}" --peak_tflops="$peak" --out="$out/$part" || status=1
  grep -q "^not measured" "$out/$part/table.md" 2>/dev/null && status=1
done
exit $status
