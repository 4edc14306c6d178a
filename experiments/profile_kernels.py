r"""Where one search step spends its time, kernel by kernel (XLA's own profiler).

  python experiments/profile_kernels.py --size=tiny_darts --method=weight_only
  python experiments/profile_kernels.py --size=tiny_darts --method=amended/exact --top=30

Compiles the step `benchmark.py` times (`common.step_fn`), runs `--steps` steps
under `jax.profiler.trace` and reads the trace back with
`jax.profiler.ProfileData` (no TensorFlow or TensorBoard needed). XLA:CPU
records every kernel it runs (a "thunk": a fusion, a convolution, a matrix
product, a copy) with its HLO instruction name; this script joins those names
with the compiled HLO's metadata, i.e. the JAX operation and the Flax module
path each kernel came from, and sums the kernels' own time per step:
- by kernel kind (YNNPACK library fusion, XLA loop/input/output fusion,
  convolution, dot, copy, ...),
- by the search-space operation (`sep_conv_3x3`, batch norm of the cell
  inputs, the optimizer, ...), forward and backward apart,
- by module path (e.g. `sep_conv_5x5/SepConv_0/DepthwiseConv_1`).

Kernel time is summed over threads, so with two cores it can exceed the wall
time; the wall time per step and the kernels run per step are printed too.
Writes `profile.json` under `--out`.
"""

if __name__ == "__main__":  # first, before jax loads: rerun once with huge pages (cpu/hostmem.py)
  from amended_darts_jax.cpu import hostmem
  hostmem.reexec()

import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

from absl import app, flags

import common
from common import SIZES

_SIZE = flags.DEFINE_enum("size", "tiny_darts", list(SIZES), "Named network and batch size.")
_METHOD = flags.DEFINE_string("method", "weight_only", "weight_only, or a search method with "
                              "optional /products (first_order, amended/exact, amended/fd, ...).")
_SPACE = flags.DEFINE_string("space", "", "Override the size's space.")
_LAYERS = flags.DEFINE_integer("layers", 0, "Override the size's number of cells (0: keep).")
_BATCH = flags.DEFINE_integer("batch", 0, "Override the size's batch (0: keep).")
_BATCH_EDGES = flags.DEFINE_bool("edge_groups", True, "Edge groups (see benchmark.py).")
_DEPTHWISE = flags.DEFINE_string("conv_pool_impl", "auto", "auto | conv | kernel | shift | dense.")
_STEPS = flags.DEFINE_integer("steps", 5, "Profiled steps.")
_TOP = flags.DEFINE_integer("top", 20, "Rows of the module-path table.")
_OUT = flags.DEFINE_string("out", "runs/profile_kernels", "Output directory.")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s)])([a-z][a-z0-9_\-]*)\(")
_WRAPPER = re.compile(r"^(?:[a-z_]+\()+(.*?)\)*$")


def hlo_index(hlo_text: str) -> dict[str, dict]:
  """Instruction name -> {opcode, kind, op_name} for every instruction of the module.

  A fusion that XLA made without metadata of its own (a wrapped reduce-window, a
  layout copy) takes the op_name of the first instruction in the computation it
  calls that has one.
  """
  index, first_op_name, calls = {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and not line.startswith(" "):
      computation = header.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, rest = m.groups()
    opcode = _OPCODE.search(rest)
    kind = re.search(r"kind=(k\w+)", rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    if op_name and computation is not None:
      first_op_name.setdefault(computation, op_name.group(1))
    if called:
      calls[name] = called.group(1)
    index[name] = {"opcode": opcode.group(1) if opcode else "?",
                   "kind": kind.group(1) if kind else "",
                   "op_name": op_name.group(1) if op_name else ""}
  for name, info in index.items():
    if not info["op_name"] and name in calls:
      info["op_name"] = first_op_name.get(calls[name], "")
  return index


def kernel_kind(name: str, info: dict) -> str:
  if name.startswith("ynn_fusion") or "ynn" in info.get("kind", "").lower():
    return "ynnpack fusion"
  if info.get("opcode") == "fusion":
    return {"kLoop": "loop fusion", "kInput": "reduction fusion",
            "kOutput": "output fusion"}.get(info["kind"], "fusion " + info["kind"])
  return info.get("opcode", "?")


def attribution(op_name: str) -> tuple[str, str, str]:
  """(direction, operation, module path) of a kernel from its JAX op_name."""
  if not op_name:
    return "?", "(no metadata)", "(no metadata)"
  direction = "backward" if "transpose(" in op_name else "forward"
  parts = [_WRAPPER.sub(r"\1", p) for p in op_name.split("/")[1:]]  # drop jit(step)
  if "Supernet" not in parts:
    top = parts[0] if parts else "?"
    return direction, f"(outside the network: {top})", f"(outside the network: {top})"
  path = [p for p in parts[parts.index("Supernet") + 1:-1]
          if not re.fullmatch(r"cell\d+|stacked_from\d+|edge\d+|_take", p)]
  operation = path[0] if path else "(network top)"
  return direction, operation, "/".join(path) or "(network top)"


def kernel_times(run, index: dict[str, dict], steps: int):
  """Runs `run()` `steps` times under the profiler; returns ({hlo_op: [count, ns]} for
  the kernels named in `index`, wall seconds of each run)."""
  import jax

  walls = []
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        t0 = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t0)
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(files[0]) if files else None
  per_kernel = collections.defaultdict(lambda: [0, 0.0])
  for plane in data.planes if data else ():
    for line in plane.lines:
      for event in line.events:
        op = dict(event.stats).get("hlo_op")
        if op in index:
          per_kernel[op][0] += 1
          per_kernel[op][1] += event.duration_ns
  return dict(per_kernel), walls


def main(argv):
  del argv
  import jax

  *_, size, _, state, batch, step_fn = common.setup_step(
      _SIZE.value, _METHOD.value, conv_pool_impl=_DEPTHWISE.value, batch=_BATCH.value,
      space=_SPACE.value, layers=_LAYERS.value, edge_groups=_BATCH_EDGES.value)
  train_batch, val_batch = batch(), batch()
  t0 = time.perf_counter()
  compiled = jax.jit(step_fn, donate_argnums=0).lower(state, train_batch, val_batch).compile()
  compile_s = time.perf_counter() - t0
  index = hlo_index(compiled.as_text())
  box = {"state": state}

  def step():
    box["state"], _ = compiled(box["state"], train_batch, val_batch)
    jax.block_until_ready(box["state"])

  for _ in range(2):  # warm-up, outside the trace
    step()
  per_kernel, walls = kernel_times(step, index, _STEPS.value)
  if not per_kernel:
    sys.exit("error: the trace holds no kernel events of the step; this jax cannot profile "
             "XLA:CPU kernels.")

  steps = _STEPS.value
  tables = {"kind": collections.defaultdict(lambda: [0, 0.0]),
            "operation": collections.defaultdict(lambda: [0, 0.0]),
            "module": collections.defaultdict(lambda: [0, 0.0])}
  for op, (count, ns) in per_kernel.items():
    info = index[op]
    direction, operation, module = attribution(info["op_name"])
    if not info["op_name"]:  # e.g. max pooling's wrapped reduce-windows and their iotas
      stem = re.sub(r"[.]\d+$", "", op)
      operation = module = f"(no metadata: {stem})"
    for table, key in (("kind", kernel_kind(op, info)), ("operation", f"{operation} ({direction})"),
                       ("module", f"{module} ({direction})")):
      tables[table][key][0] += count
      tables[table][key][1] += ns
  busy_ms = sum(ns for _, ns in per_kernel.values()) / 1e6 / steps
  kernels = sum(c for c, _ in per_kernel.values()) / steps
  wall_ms = statistics.median(walls) * 1e3
  print(f"size {_SIZE.value} ({json.dumps(size)}), method {_METHOD.value}, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}: compile {compile_s:.1f} s; per step: wall "
        f"{wall_ms:.1f} ms (median of {steps}, profiler on), {kernels:.0f} kernels, "
        f"{busy_ms:.1f} ms kernel time summed over threads ({busy_ms * 1e3 / kernels:.1f} us "
        f"a kernel)")
  result = {"size": _SIZE.value, "method": _METHOD.value, "argv": sys.argv[1:],
            "compile_s": compile_s, "wall_ms": wall_ms, "kernels_per_step": kernels,
            "kernel_ms_per_step": busy_ms, "tables": {}}
  for table, rows in tables.items():
    ordered = sorted(rows.items(), key=lambda kv: -kv[1][1])
    if table == "module":
      ordered = ordered[:_TOP.value]
    print(f"\n| {table} | kernels a step | ms a step | share of kernel time |\n"
          "| --- | --- | --- | --- |")
    for key, (count, ns) in ordered:
      ms = ns / 1e6 / steps
      print(f"| {key} | {count / steps:.0f} | {ms:.2f} | {ms / busy_ms:.1%} |")
    result["tables"][table] = [{"key": k, "kernels": c / steps, "ms": ns / 1e6 / steps}
                               for k, (c, ns) in ordered]
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "profile.json"), "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
