r"""Exact versus finite-difference second-order products along first-order searches.

  python experiments/compare_products.py --out=experiments/results/compare_products \
      --seeds=0,1,2 --points=0,15,...,240     # the committed study: experiments/README.md
  python experiments/compare_products.py --out=experiments/results/compare_products --from_results
  python experiments/compare_products.py --space=darts --C=16 --layers=8 --batch=64 ...  # GPU

On a small supernet over the embedded digits, at the step counts `--points`
of a first-order search (0 is the initialisation) for each of `--seeds`,
compares the central finite differences of docs/math.md §5 with the exact
forward-over-reverse products for a sweep of `r` (the step is `e = r/|v|`;
r = 0.01 is DARTS' rule): `H v`, `M u` with `u = H v`, the amended term
`g2' = -eta M H v` and DARTS' term `g2'' = -xi M v`. The relative error
`|fd - exact| / |exact|` and the cosine, in float32 and float64, with ReLU and
with softplus, at the same weights (the search itself runs with ReLU in
float32). Writes `results.csv` (one row per seed, point, activation, dtype,
product and r), `summary.md`, `error_vs_r.png` (median and range over the
points) and `error_along_search.png` (at r = 0.01, per seed); `--from_results`
rebuilds the last three from `results.csv` alone. Each activation and dtype
compiles two programs (exact products; finite differences at a given r),
reused for every point and every r. With `--bench_size`, the time and peak
memory of one amended search step with exact products and with finite
differences, side by side in one run of `experiments/benchmark.py` (a
subprocess per measurement), go into the summary.
"""

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
_POINTS = flags.DEFINE_list("points", ["0", "30"], "Step counts of the first-order search at "
                            "which to compare (0: the initialisation).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds of the searches.")
_RS = flags.DEFINE_list("rs", ["1e-5", "1e-4", "1e-3", "1e-2", "1e-1"], "Values of r.")
_ETA = flags.DEFINE_float("eta", 0.1, "Amending coefficient.")
_XI = flags.DEFINE_float("xi", 0.025, "DARTS' unrolling step (its weight learning rate).")
_ACTS = flags.DEFINE_list("activations", ["relu", "softplus"], "Activations to compare.")
_FROM_RESULTS = flags.DEFINE_bool("from_results", False, "Only rebuild the summary and the "
                                  "figures from results.csv.")
_BENCH_SIZE = flags.DEFINE_string("bench_size", "", "Size (experiments/benchmark.py) at "
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
      rows.append(dict(product=name, r=r, rel_error=float(errors[j]), cosine=float(cosines[j]),
                       exact_norm=float(norms[j])))
  return rows


PRODUCT_NAMES = ("Hv", "Mu", "g2_amended", "g2_darts")


COLUMNS = ("seed", "step", "activation", "dtype", "product", "r", "rel_error", "cosine",
           "exact_norm")
DARTS_R = 0.01


def _write_csv(rows, path):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(",".join(COLUMNS) + "\n")
    for r in rows:
      f.write(",".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c])
                       for c in COLUMNS) + "\n")
  os.replace(tmp, path)


def _read_csv(path):
  with open(path) as f:
    header = f.readline().strip().split(",")
    rows = [dict(zip(header, line.strip().split(","))) for line in f if line.strip()]
  for r in rows:
    r["seed"], r["step"] = int(r["seed"]), int(r["step"])
    for c in ("r", "rel_error", "cosine", "exact_norm"):
      r[c] = float(r[c])
  return rows


def _settings(rows):
  """(activation, dtype) pairs in the order they were run."""
  return list(dict.fromkeys((r["activation"], r["dtype"]) for r in rows))


def _select(rows, act, dtype, product, r=None):
  """The rows of one setting and product (at one r where given)."""
  return [x for x in rows if (x["activation"], x["dtype"], x["product"]) == (act, dtype, product)
          and (r is None or x["r"] == r)]


def _finish(fig, axes, ylabel, path):
  axes[0].set_ylabel(ylabel)
  axes[-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  import matplotlib.pyplot as plt
  plt.close(fig)


def _plot(rows, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  settings = _settings(rows)
  fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), sharey=True)
  for ax, product in zip(axes, PRODUCT_NAMES):
    for act, dtype in settings:
      sel = _select(rows, act, dtype, product)
      rs = sorted({r["r"] for r in sel})
      errs = [np.maximum([r["rel_error"] for r in sel if r["r"] == x], 1e-17) for x in rs]
      line, = ax.loglog(rs, [np.median(e) for e in errs], marker="o",
                        linestyle="-" if act != "relu" else "--", label=f"{act} {dtype}")
      ax.fill_between(rs, [e.min() for e in errs], [e.max() for e in errs],
                      color=line.get_color(), alpha=0.15)
    ax.set_title(f"{product}: finite difference vs exact")
    ax.set_xlabel("r (step e = r / |v|)")
    ax.grid(True, which="both", alpha=0.3)
  _finish(fig, axes, "relative error (median, range over points)",
          os.path.join(out, "error_vs_r.png"))

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
  first_seed = min(r["seed"] for r in rows)
  for ax, product in zip(axes, ("g2_amended", "g2_darts")):
    for k, (act, dtype) in enumerate(settings):
      for seed in sorted({r["seed"] for r in rows}):
        sel = sorted((r for r in _select(rows, act, dtype, product, DARTS_R)
                      if r["seed"] == seed), key=lambda r: r["step"])
        ax.semilogy([r["step"] for r in sel], [max(r["rel_error"], 1e-17) for r in sel],
                    color=f"C{k}", linestyle="-" if act != "relu" else "--", linewidth=1,
                    label=f"{act} {dtype}" if seed == first_seed else None)
    ax.set_title(f"{product} at DARTS' r = {DARTS_R}, one line per seed")
    ax.set_xlabel("first-order search step")
    ax.grid(True, which="both", alpha=0.3)
  _finish(fig, axes, "relative error of the finite difference",
          os.path.join(out, "error_along_search.png"))


def _per_r_table(rows, title, cell):
  """A table with one column per r: `cell(errors)` of each setting, product and r."""
  import numpy as np
  rs = sorted({r["r"] for r in rows})
  lines = ["", title, "",
           "| activation | dtype | product | " + " | ".join(f"r={x:g}" for x in rs) + " |",
           "| --- | --- | --- | " + " | ".join("---" for _ in rs) + " |"]
  for act, dtype in _settings(rows):
    for product in PRODUCT_NAMES:
      cells = []
      for x in rs:
        e = np.array([r["rel_error"] for r in _select(rows, act, dtype, product, x)])
        cells.append(cell(e) if e.size else "-")
      lines.append(f"| {act} | {dtype} | {product} | " + " | ".join(cells) + " |")
  return lines


def summarize(rows) -> str:
  """The tables of summary.md, from the rows of results.csv."""
  import numpy as np
  seeds = sorted({r["seed"] for r in rows})
  steps = sorted({r["step"] for r in rows})
  lines = [f"{len(steps)} points (steps {steps[0]} to {steps[-1]}) of first-order searches from "
           f"seeds {', '.join(map(str, seeds))}; {len(steps) * len(seeds)} comparisons per row.",
           "", f"At DARTS' r = {DARTS_R}: the relative error (median, and range) and the cosine "
           "(median, and the smallest) over every point; `cos < 0`: the share of points where "
           "the finite difference points away from the exact term.", "",
           "| activation | dtype | product | error median | error range | cosine median | "
           "cosine min | cos < 0 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for act, dtype in _settings(rows):
    for product in PRODUCT_NAMES:
      sel = _select(rows, act, dtype, product, DARTS_R)
      if not sel:
        continue
      e = np.array([r["rel_error"] for r in sel])
      c = np.array([r["cosine"] for r in sel])
      lines.append(f"| {act} | {dtype} | {product} | {np.median(e):.2e} | {e.min():.1e} - "
                   f"{e.max():.1e} | {np.median(c):.4f} | {c.min():.4f} | {np.mean(c < 0):.0%} |")
  lines += _per_r_table(rows, "The median relative error over every point, for each r:",
                        lambda e: f"{np.median(e):.1e}")
  lines += _per_r_table(rows, "The share of points where the relative error is at most 1e-3, "
                        "for each r:", lambda e: f"{np.mean(e <= 1e-3):.0%}")
  return "\n".join(lines)


def _report(rows, extra=""):
  _plot(rows, _OUT.value)
  summary = summarize(rows) + (f"\n\n{extra}" if extra else "")
  path = os.path.join(_OUT.value, "summary.md")
  with open(path + ".tmp", "w") as f:
    f.write(summary + "\n")
  os.replace(path + ".tmp", path)
  print(summary)


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  csv_path = os.path.join(_OUT.value, "results.csv")
  if _FROM_RESULTS.value:
    _report(_read_csv(csv_path))
    return
  cfg = default.get_config()
  cfg.space, cfg.init_channels, cfg.layers = _SPACE.value, _C.value, _LAYERS.value
  cfg.batch_size = _BATCH.value
  points = []  # (seed, step, state, train batch, val batch), every search run once
  for seed in (int(x) for x in _SEEDS.value):
    cfg.seed = seed
    points += [(seed, step, state, train_np, val_np) for step, state, train_np, val_np, _ in
               common.digits_trajectory(cfg, sorted(int(p) for p in _POINTS.value))]
  rs = [float(r) for r in _RS.value]
  rows = []
  for act in _ACTS.value:
    for dtype in (jnp.float32, jnp.float64):
      t0 = time.perf_counter()
      programs = _programs(act, dtype, cfg)
      for seed, step, state, train_np, val_np in points:
        for row in _compare(programs, state, train_np, val_np, dtype, rs):
          row.update(seed=seed, step=step, activation=act, dtype=jnp.dtype(dtype).name)
          rows.append(row)
      _write_csv(rows, csv_path)  # what is done so far, kept
      print(f"{act} {jnp.dtype(dtype).name}: {time.perf_counter() - t0:.1f} s", flush=True)
  _report(rows, _benchmark() if _BENCH_SIZE.value else "")


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
