r"""Speed, compile time and memory of one search step per method, side by side.

  python experiments/benchmark.py --size=tiny --out=runs/bench_tiny
  python experiments/benchmark.py --size=darts_search --out=runs/bench_darts   # GPU
  python experiments/benchmark.py --size=s2_search --remat=true,false --out=runs/bench_s2

Sizes: `tiny` (s2 space, 2 cells, C=8, batch 16, 16x16x3), `darts_search` (darts
space, C=16, 8 cells, batch 64, 32x32x3, 10 classes: DARTS' CIFAR-10 search) and
`s2_search` (s2 space, 20 cells, C=16, batch 64, 32x32x3); `tiny_darts` and
`darts_5` are the two sizes of the PyTorch comparison (`pytorch_darts.py`); `digits` is
the default search's own (s2, 5 cells, C=8, batch 64, 8x8x1). For each method
(`weight_only` is the weight step alone, `monitor` the search's gradient-quality
diagnostics, `search.monitor_step`, at the default config's settings; the others
are the full search step of `amended_darts_jax.search`) it measures the program's
size (`program_ops`: the operations of the lowered StableHLO module, the count
that grows with every cell), the time to trace and lower it (`lower_s`) and,
included in `compile_s`, to compile, the median step time
over `--steps` steps after `--warmup` warm-up steps, and the peak memory: device
statistics on a GPU/TPU, the peak resident memory of the process on CPU, and on
every backend XLA's buffer plan for the step (`memory_analysis()`: temporary
buffers, and those plus arguments, outputs and code, less donated buffers). Every
measurement runs in its own subprocess, so peaks do not carry over. Batches are
synthetic and in memory: no tensorflow-datasets needed.

Writes `results.jsonl` (one JSON line per measurement) and `table.md` under
`--out`, and prints the table and the ratios `amended_exact / amended_fd` and
`amended_exact / first_order`.

Each row also has XLA's count of the step's floating-point operations
(`cost_analysis()`; it does not see inside custom calls, so on CPU the C++
kernels' work is left out), the FLOP/s that count reaches at the median step,
its share of `--peak_tflops` when given (the chip's peak for the step's
precision), and the time of one epoch of DARTS' CIFAR-10 search at that step
time: 25,000 training images (half of CIFAR-10's 50,000; the other half
trains alpha), so ceil(25,000 / batch) steps.
"""

if __name__ == "__main__":  # first, before jax loads: rerun once with huge pages (cpu/hostmem.py)
  from amended_darts_jax.cpu import hostmem
  hostmem.reexec()

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

import common
from amended_darts_jax.cpu import kernels
from common import SIZES

METHODS = ("weight_only", "first_order", "darts/exact", "darts/fd", "amended/exact",
           "amended/fd", "monitor")

_SIZE = flags.DEFINE_enum("size", "tiny", list(SIZES), "Named network and batch size.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "method or method/products to measure.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compiling.")
_REMAT = flags.DEFINE_list("remat", ["false"], "Rematerialize per cell: true, false or both.")
_EDGE_GROUPS = flags.DEFINE_list("edge_groups", ["true"], "The edges leaving a state as one "
                                 "vmapped op (true) or one op per edge (false), or both.")
_SCAN = flags.DEFINE_list("scan_cells", ["true"], "Runs of identical cells as one scan (true), "
                          "one program part per cell (false), or both.")
_DEPTHWISE = flags.DEFINE_string("conv_pool_impl", "auto", "auto | conv | kernel | shift | dense.")
_CPU_KERNEL = flags.DEFINE_list("cpu_kernel", ["true"], "Let `auto` use the C++ depthwise kernel "
                                "on CPU (true), or not (false: AMENDED_DARTS_CPU_KERNEL=0), or both.")
_BATCH = flags.DEFINE_integer("batch", 0, "Override the size's batch (0: keep).")
_SPACE = flags.DEFINE_string("space", "", "Override the size's space, e.g. s2_all (s2 with all "
                             "seven operations).")
_LAYERS = flags.DEFINE_integer("layers", 0, "Override the size's number of cells (0: keep).")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 0.0, "The chip's peak TFLOP/s for the step's "
                                   "precision, to report the share reached (0: not reported).")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 0, "Stop a measurement (compile and steps) after "
                                "this many seconds; its row says so (0: no limit).")
_OUT = flags.DEFINE_string("out", "runs/benchmark", "Output directory.")
_ONE = flags.DEFINE_string("one", "", "Internal: measure one method/products/remat and print JSON.")


def _reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS mark (Linux: `5` into /proc/self/clear_refs)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _peak_rss_mb() -> float:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_memory_mb(jax, reset_ok: bool) -> tuple[float, str]:
  """Device peak on GPU/TPU; on CPU the peak resident memory while stepping
  (after compilation, when the peak mark could be reset) or of the whole process."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device_peak"
  return _peak_rss_mb(), "rss_peak_stepping" if reset_ok else "rss_peak_process"


def measure_one(spec: str) -> dict:
  """Compiles and times one step in this process; returns one result row."""
  import jax
  import numpy as np

  method_products, remat, edge_groups, scan = spec.split("@")
  method, products, size, cfg, state, batch, step = common.setup_step(
      _SIZE.value, method_products, remat=remat == "true", conv_pool_impl=_DEPTHWISE.value,
      batch=_BATCH.value, space=_SPACE.value, layers=_LAYERS.value,
      edge_groups=edge_groups == "true", scan_cells=scan == "true")

  train_batch, val_batch = batch(), batch()
  rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t0 = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=0).lower(state, train_batch, val_batch)
  lower_s = time.perf_counter() - t0
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  program_ops = common.program_ops(lowered)
  compile_peak_mb = _peak_rss_mb()
  flops = common.step_flops(compiled)
  # XLA's own plan for the step's buffers: device-independent, and on CPU free
  # of the compiler's leftovers that inflate the resident-memory figure.
  analysis = compiled.memory_analysis()
  xla_temp_mb = getattr(analysis, "temp_size_in_bytes", 0) / 2**20
  xla_total_mb = sum(getattr(analysis, f"{kind}_size_in_bytes", 0) for kind in
                     ("temp", "argument", "output", "generated_code")) / 2**20 - getattr(
                         analysis, "alias_size_in_bytes", 0) / 2**20
  reset_ok = _reset_peak_rss()
  for _ in range(_WARMUP.value):
    state, metrics = compiled(state, train_batch, val_batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, metrics = compiled(state, train_batch, val_batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  peak_mb, peak_kind = _peak_memory_mb(jax, reset_ok)
  median_s = statistics.median(times)
  tflop_per_s = flops / median_s / 1e12
  return dict(size=_SIZE.value, **{k: size[k] for k in ("space", "C", "layers", "batch")},
              method=method,
              products=products if method not in ("weight_only", "monitor") else "",
              remat=cfg.remat, edge_groups=cfg.edge_groups, scan_cells=cfg.scan_cells == "on",
              cpu_kernel=jax.default_backend() == "cpu" and kernels.available(),
              compile_s=round(compile_s, 2), lower_s=round(lower_s, 2),
              program_ops=program_ops,
              median_step_s=round(median_s, 5),
              min_step_s=round(min(times), 5), steps=len(times),
              peak_memory_mb=round(peak_mb, 1), memory_kind=peak_kind,
              xla_temp_mb=round(xla_temp_mb, 1), xla_total_mb=round(xla_total_mb, 1),
              rss_before_compile_mb=round(rss_before_mb, 1),
              rss_peak_compiling_mb=round(compile_peak_mb, 1),
              gflop_per_step=round(flops / 1e9, 3), tflop_per_s=round(tflop_per_s, 4),
              peak_share=round(tflop_per_s / _PEAK_TFLOPS.value, 4) if _PEAK_TFLOPS.value > 0
              else None,
              cifar10_epoch_min=round(common.epoch_minutes(median_s, size["batch"]), 2),
              loss_finite=bool(np.isfinite(float(metrics["train_loss"] if "train_loss" in metrics
                                                 else metrics["alpha_hessian_eigenvalue"]))),
              device=jax.devices()[0].device_kind, backend=jax.default_backend())


def _table(rows: list[dict]) -> str:
  lines = ["| method | products | remat | edge groups | scan cells | C++ kernel | program ops "
           "| compile s | median step s | "
           "peak MB (kind) | XLA temp MB | XLA total MB | GFLOP/step (XLA) | TFLOP/s | "
           "share of peak | CIFAR-10 epoch, min |",
           "|" + " --- |" * 16]
  for r in rows:
    lines.append(f"| {r['method']} | {r['products']} | {r['remat']} | {r['edge_groups']} | "
                 f"{r['scan_cells']} | {r['cpu_kernel']} | {r['program_ops']} | "
                 f"{r['compile_s']} | "
                 f"{r['median_step_s']} | {r['peak_memory_mb']} ({r['memory_kind']}) | "
                 f"{r['xla_temp_mb']} | {r['xla_total_mb']} | {r['gflop_per_step']} | "
                 f"{r['tflop_per_s']} | {'' if r['peak_share'] is None else r['peak_share']} | "
                 f"{r['cifar10_epoch_min']} |")
  return "\n".join(lines)


def _ratio(rows, a, b, remat=False, edge_groups=True):
  def pick(spec):
    method, _, products = spec.partition("/")
    # With the kernel and scanned, where measured.
    for r in sorted(rows, key=lambda r: (not r["cpu_kernel"], not r["scan_cells"])):
      if (r["method"] == method and (not products or r["products"] == products)
          and r["remat"] == remat and r["edge_groups"] == edge_groups):
        return r
  ra, rb = pick(a), pick(b)
  if ra and rb:
    return f"{a.replace('/', '_')} / {b.replace('/', '_')} = " \
           f"{ra['median_step_s'] / rb['median_step_s']:.3f}"
  return None


def main(argv):
  del argv
  if _ONE.value:
    print("RESULT " + json.dumps(measure_one(_ONE.value)), flush=True)
    return
  for spec in _METHODS.value:
    if spec not in METHODS and spec not in ("implicit", "implicit/exact", "amended", "darts"):
      sys.exit(f"error: unknown method {spec!r}; known: {', '.join(METHODS)}, implicit")
  if not _PEAK_TFLOPS.value >= 0:
    sys.exit(f"error: --peak_tflops takes a TFLOP/s figure, 0 or more; got {_PEAK_TFLOPS.value}")
  if _TIMEOUT.value < 0:
    sys.exit(f"error: --timeout_s takes seconds, 0 (no limit) or more; got {_TIMEOUT.value}")
  common.switches("remat", _REMAT.value)  # exits on anything but true/false
  common.switches("edge_groups", _EDGE_GROUPS.value)
  common.switches("scan_cells", _SCAN.value)
  common.switches("cpu_kernel", _CPU_KERNEL.value)
  os.makedirs(_OUT.value, exist_ok=True)
  rows, failed = [], []
  passthrough = [a for a in sys.argv[1:]
                 if not a.startswith(("--one", "--methods", "--remat", "--edge_groups",
                                      "--scan_cells", "--cpu_kernel"))]
  variants = [(spec, remat, edges, scan, kernel) for remat in _REMAT.value
              for edges in _EDGE_GROUPS.value for scan in _SCAN.value
              for kernel in _CPU_KERNEL.value for spec in _METHODS.value]
  for spec, remat, edges, scan, kernel in variants:
    cmd = [sys.executable, os.path.abspath(__file__), *passthrough,
           f"--one={spec}@{remat}@{edges}@{scan}"]
    env = dict(os.environ)  # the kernel switch reaches the worker through its environment
    if kernel == "false":
      env[kernels.SWITCH_ENV] = "0"
    error = None
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                            timeout=_TIMEOUT.value or None)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode != 0 or not lines:
        err_lines = [l for l in proc.stderr.strip().splitlines() if l.strip("* ")]
        error = (f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0
                 else (err_lines or ["no output"])[-1])
    except subprocess.TimeoutExpired:  # run() has killed the worker
      error = f"stopped after --timeout_s={_TIMEOUT.value} s"
    if error:
      row = dict(size=_SIZE.value, method=spec, remat=remat == "true",
                 edge_groups=edges == "true", scan_cells=scan == "true",
                 cpu_kernel=kernel == "true", error=error)
      failed.append(f"not measured: {spec}, remat {remat}, edge groups {edges}, "
                    f"scan cells {scan}, C++ kernel {kernel}: {error}")
    else:
      row = json.loads(lines[-1][len("RESULT "):])
      rows.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(_OUT.value, "results.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")
  table = _table(rows)
  notes = failed + [r for r in (_ratio(rows, "amended/exact", "amended/fd"),
                                 _ratio(rows, "amended/exact", "first_order")) if r]
  with open(os.path.join(_OUT.value, "table.md"), "w") as f:
    f.write(f"size `{_SIZE.value}`, command: `python experiments/benchmark.py "
            f"{' '.join(sys.argv[1:])}`\n\n{table}\n\n" + "\n".join(notes) + "\n")
  print(table)
  for line in notes:
    print(line)


if __name__ == "__main__":
  app.run(main)
