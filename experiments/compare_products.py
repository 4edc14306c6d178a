r"""Exact versus finite-difference second-order products on a supernet.

  python experiments/compare_products.py --out=runs/compare_products
  python experiments/compare_products.py --space=darts --C=16 --layers=8 --batch=64 ...  # GPU

On a small supernet over the embedded digits, at initialisation and after
`--train_steps` first-order search steps, compares the central finite
differences of docs/math.md §5 with the exact forward-over-reverse products for a sweep
of `r` (the step is `e = r/|v|`; r = 0.01 is DARTS' rule): `H v`, `M u` with
`u = H v`, the amended term `g2' = -eta M H v` and the DARTS term
`g2'' = -xi M v`. Reports the relative error `|fd - exact| / |exact|` and the
cosine, in float32 and float64, with ReLU and with softplus. Writes
`results.jsonl`, `error_vs_r.png` (one line per setting) and `summary.md`.
Each activation and dtype compiles two programs (exact products; finite
differences at a given r), reused for every point and every r. Last, the time
and peak memory of one amended search step with exact products and with finite
differences, side by side in one run of
`experiments/benchmark.py` at `--bench_size` (a subprocess per measurement), go
into the summary.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags
import jax

jax.config.update("jax_enable_x64", True)  # float64 runs need it; float32 runs cast down

import jax.numpy as jnp  # noqa: E402

from amended_darts_jax import hypergrad as hg  # noqa: E402
from amended_darts_jax import search, supernet  # noqa: E402
import common  # noqa: E402
from amended_darts_jax.configs import default  # noqa: E402

_SPACE = flags.DEFINE_string("space", "s2", "Search space.")
_C = flags.DEFINE_integer("C", 4, "Initial channels.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Cells.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 30, "First-order search steps before the "
                                    "second comparison point.")
_RS = flags.DEFINE_list("rs", ["1e-5", "1e-4", "1e-3", "1e-2", "1e-1"], "Values of r.")
_ETA = flags.DEFINE_float("eta", 0.1, "Amending coefficient.")
_XI = flags.DEFINE_float("xi", 0.025, "DARTS' unrolling step (its weight learning rate).")
_ACTS = flags.DEFINE_list("activations", ["relu", "softplus"], "Activations to compare.")
_BENCH_SIZE = flags.DEFINE_string("bench_size", "tiny", "Size (experiments/benchmark.py) at "
                                  "which to time the amended step, exact against fd, side by "
                                  "side; empty: skip.")
_BENCH_STEPS = flags.DEFINE_integer("bench_steps", 20, "Timed steps of that benchmark.")
_OUT = flags.DEFINE_string("out", "runs/compare_products", "Output directory.")


def _programs(act, dtype, cfg):
  """Two compiled programs per (activation, dtype), both taking the weights and r as
  arguments (not constants), so every point and every r reuses them: the exact
  products, and the finite-difference ones with their errors against the exact."""
  model = supernet.Supernet(cfg.space, C=cfg.init_channels, layers=cfg.layers, num_classes=10,
                            act=act)
  wd, eta, xi = cfg.weight_decay, _ETA.value, _XI.value

  def loss(w, a, b):
    return search.supernet_loss(model, w, a, b)[0]

  def batches(stats, train_np, val_np):
    batch = lambda b: {"image": b["image"].astype(dtype), "label": b["label"],
                       "batch_stats": stats}
    return batch(train_np), batch(val_np)

  @jax.jit
  def exact(params, alpha, stats, train_np, val_np):
    train_b, val_b = batches(stats, train_np, val_np)
    v = jax.grad(loss)(params, alpha, val_b)
    hv = hg.hvp(loss, params, alpha, train_b, v, weight_decay=wd)
    mu = hg.mixed_vp(loss, params, alpha, train_b, hv)
    # g2' = -eta M (H + wd I) v is -eta times the M u above (hypergrad.amended_term).
    return v, (hv, mu, hg.tree_scale(-eta, mu),
               hg.darts_term(loss, params, alpha, train_b, v, xi=xi))

  @jax.jit
  def fd(params, alpha, stats, train_np, val_np, v, exact_products, r):
    train_b, _ = batches(stats, train_np, val_np)
    hv = exact_products[0]
    fds = (hg.hvp_fd(loss, params, alpha, train_b, v, weight_decay=wd, r=r),
           hg.mixed_vp_fd(loss, params, alpha, train_b, hv, r=r),
           hg.amended_term(loss, params, alpha, train_b, v, eta=eta, weight_decay=wd,
                           products="fd", r=r),
           hg.darts_term(loss, params, alpha, train_b, v, xi=xi, products="fd", r=r))
    errors = [hg.tree_norm(hg.tree_sub(f, e)) / jnp.maximum(hg.tree_norm(e), 1e-30)
              for f, e in zip(fds, exact_products)]
    cosines = [hg.tree_cosine(f, e) for f, e in zip(fds, exact_products)]
    return (jnp.stack(errors), jnp.stack(cosines),
            jnp.stack([hg.tree_norm(e) for e in exact_products]))

  return exact, fd


def _compare(programs, state, train_np, val_np, dtype, rs):
  exact, fd = programs
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
  args = (cast(state.params), cast(state.alpha), cast(state.batch_stats), train_np, val_np)
  v, products = exact(*args)
  rows = []
  for r in rs:
    errors, cosines, norms = jax.device_get(fd(*args, v, products, jnp.asarray(r, dtype)))
    for j, name in enumerate(PRODUCT_NAMES):
      rows.append(dict(product=name, r=r, darts_rule=r == 0.01, rel_error=float(errors[j]),
                       cosine=float(cosines[j]), exact_norm=float(norms[j])))
  return rows


PRODUCT_NAMES = ("Hv", "Mu", "g2_amended", "g2_darts")


def _plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  products = PRODUCT_NAMES
  fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), sharey=True)
  settings = sorted({(r["point"], r["activation"], r["dtype"]) for r in rows})
  for ax, product in zip(axes, products):
    for point, act, dtype in settings:
      sel = sorted((r for r in rows if (r["point"], r["activation"], r["dtype"], r["product"])
                    == (point, act, dtype, product)), key=lambda r: r["r"])
      ax.loglog([r["r"] for r in sel], [max(r["rel_error"], 1e-17) for r in sel], marker="o",
                linestyle="-" if act != "relu" else "--", label=f"{act} {dtype} {point}")
    ax.set_title(f"{product}: finite difference vs exact")
    ax.set_xlabel("r (step e = r / |v|)")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("relative error")
  axes[-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  cfg = default.get_config()
  cfg.space, cfg.init_channels, cfg.layers = _SPACE.value, _C.value, _LAYERS.value
  cfg.batch_size = _BATCH.value
  points = [(("init" if step == 0 else f"after_{step}_steps"), state, train_np, val_np)
            for step, state, train_np, val_np, _ in common.digits_trajectory(
                cfg, [0, _TRAIN_STEPS.value])]
  rs = [float(r) for r in _RS.value]
  rows = []
  with open(os.path.join(_OUT.value, "results.jsonl"), "w") as f:
    for act in _ACTS.value:
      for dtype in (jnp.float32, jnp.float64):
        t0 = time.perf_counter()
        programs = _programs(act, dtype, cfg)
        for point, state, train_np, val_np in points:
          for row in _compare(programs, state, train_np, val_np, dtype, rs):
            row.update(point=point, activation=act, dtype=jnp.dtype(dtype).name)
            rows.append(row)
            f.write(json.dumps(row) + "\n")
        f.flush()
        print(f"{act} {jnp.dtype(dtype).name}: {time.perf_counter() - t0:.1f} s", flush=True)
  _plot(rows, os.path.join(_OUT.value, "error_vs_r.png"))
  lines = ["| point | activation | dtype | product | best r | error at best r | error at r=0.01 "
           "(DARTS) | cosine at r=0.01 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for key in sorted({(r["point"], r["activation"], r["dtype"], r["product"]) for r in rows}):
    sel = [r for r in rows if (r["point"], r["activation"], r["dtype"], r["product"]) == key]
    best = min(sel, key=lambda r: r["rel_error"])
    darts = next(r for r in sel if r["darts_rule"]) if any(r["darts_rule"] for r in sel) else best
    lines.append(f"| {' | '.join(key)} | {best['r']:g} | {best['rel_error']:.2e} | "
                 f"{darts['rel_error']:.2e} | {darts['cosine']:.6f} |")
  if _BENCH_SIZE.value:
    lines += ["", _benchmark()]
  summary = "\n".join(lines)
  with open(os.path.join(_OUT.value, "summary.md"), "w") as f:
    f.write(summary + "\n")
  print(summary)


def _benchmark() -> str:
  """Time and peak memory of the amended step, exact and fd, from one benchmark run."""
  out = os.path.join(_OUT.value, "benchmark")
  cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark.py"),
         f"--size={_BENCH_SIZE.value}", "--methods=amended/exact,amended/fd",
         f"--steps={_BENCH_STEPS.value}", f"--out={out}"]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    return f"benchmark failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"
  with open(os.path.join(out, "table.md")) as f:
    return f.read().strip()


if __name__ == "__main__":
  app.run(main)
