r"""Exact versus finite-difference second-order products on a supernet.

  python experiments/compare_products.py --out=runs/compare_products
  python experiments/compare_products.py --space=darts --C=16 --layers=8 --batch=64 ...  # GPU

On a small supernet over the embedded digits, at initialisation and after
`--train_steps` first-order search steps, compares the central finite
differences of MATH.md with the exact forward-over-reverse products for a sweep
of `r` (the step is `e = r/|v|`; r = 0.01 is DARTS' rule): `H v`, `M u` with
`u = H v`, the amended term `g2' = -eta M H v` and the DARTS term
`g2'' = -xi M v`. Reports the relative error `|fd - exact| / |exact|` and the
cosine, in float32 and float64, with ReLU and with softplus. Writes
`results.jsonl`, `error_vs_r.png` (one line per setting) and `summary.md`.
Time and memory of the amended step, exact against fd, come from
`experiments/benchmark.py --methods=amended/exact,amended/fd`.
"""

import functools
import json
import os

from absl import app, flags
import jax

jax.config.update("jax_enable_x64", True)  # float64 runs need it; float32 runs cast down

import jax.numpy as jnp  # noqa: E402

from amended_darts_jax import hypergrad as hg  # noqa: E402
from amended_darts_jax import input_pipeline, ops, search, spaces, supernet  # noqa: E402
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
_OUT = flags.DEFINE_string("out", "runs/compare_products", "Output directory.")


def _batches(cfg):
  splits, info = input_pipeline.load("digits")
  tr, va = input_pipeline.search_split(len(splits["train"]), 0.5, cfg.seed)
  make = lambda idx, seed: input_pipeline.Batches(input_pipeline.Subset(splits["train"], idx),
                                                  info, cfg.batch_size, seed, None)
  return make(tr, 0), make(va, 1)


def _train_points(cfg):
  """(params, batch_stats, alpha) at initialisation and after some first-order steps."""
  model = search.make_model(cfg, 10)
  w_tx, a_tx, lr_fn = search.make_optimizers(cfg, steps_per_epoch=100)
  sc = search.StepConfig(model, "first_order", "exact", cfg.eta, cfg.fd_r, cfg.weight_decay,
                         0.0, 1, 1.0, cfg.momentum, w_tx, a_tx, lr_fn)
  alpha = spaces.get_space(cfg.space).init_alpha(jax.random.PRNGKey(0), cfg.layers)
  variables = ops.init_variables(model, 0, jnp.zeros((2, 8, 8, 1)), alpha, train=False)
  state = search.SearchState(jnp.array(0, jnp.int32), variables["params"],
                             variables["batch_stats"], alpha, w_tx.init(variables["params"]),
                             a_tx.init(alpha), jax.random.PRNGKey(1), jnp.array(-1, jnp.int32))
  train_b, val_b = _batches(cfg)
  points = [("init", state)]
  step = jax.jit(functools.partial(search.search_step, sc))
  for s in range(_TRAIN_STEPS.value):
    state, _ = step(state, train_b.batch(s), val_b.batch(s))
  points.append((f"after_{_TRAIN_STEPS.value}_steps", state))
  return points, train_b.batch(10_000), val_b.batch(10_000)


def _compare(state, train_np, val_np, act, dtype, cfg):
  model = supernet.Supernet(cfg.space, C=cfg.init_channels, layers=cfg.layers, num_classes=10,
                            act=act)
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
  params, alpha = cast(state.params), cast(state.alpha)
  stats = cast(state.batch_stats)
  batch = lambda b: {"image": jnp.asarray(b["image"], dtype), "label": jnp.asarray(b["label"]),
                     "batch_stats": stats}
  train_b, val_b = batch(train_np), batch(val_np)

  def loss(w, a, b):
    return search.supernet_loss(model, w, a, b)[0]

  wd = cfg.weight_decay
  v = jax.grad(loss)(params, alpha, val_b)
  hv = jax.jit(lambda v: hg.hvp(loss, params, alpha, train_b, v, weight_decay=wd))(v)
  mu = jax.jit(lambda u: hg.mixed_vp(loss, params, alpha, train_b, u))(hv)
  g2a = jax.jit(lambda v: hg.amended_term(loss, params, alpha, train_b, v, eta=_ETA.value,
                                          weight_decay=wd))(v)
  g2d = jax.jit(lambda v: hg.darts_term(loss, params, alpha, train_b, v, xi=_XI.value))(v)
  rows = []

  @jax.jit
  def fd_all(r):
    return (hg.hvp_fd(loss, params, alpha, train_b, v, weight_decay=wd, r=r),
            hg.mixed_vp_fd(loss, params, alpha, train_b, hv, r=r),
            hg.amended_term(loss, params, alpha, train_b, v, eta=_ETA.value, weight_decay=wd,
                            products="fd", r=r),
            hg.darts_term(loss, params, alpha, train_b, v, xi=_XI.value, products="fd", r=r))

  for r_text in _RS.value:
    r = float(r_text)
    fds = fd_all(jnp.asarray(r, dtype))
    for name, exact, fd in zip(("Hv", "Mu", "g2_amended", "g2_darts"), (hv, mu, g2a, g2d), fds):
      err = hg.tree_norm(hg.tree_sub(fd, exact)) / jnp.maximum(hg.tree_norm(exact), 1e-30)
      rows.append(dict(product=name, r=r, darts_rule=r == 0.01, rel_error=float(err),
                       cosine=float(hg.tree_cosine(fd, exact)),
                       exact_norm=float(hg.tree_norm(exact))))
  return rows


def _plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  products = ("Hv", "Mu", "g2_amended", "g2_darts")
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
  points, train_np, val_np = _train_points(cfg)
  rows = []
  with open(os.path.join(_OUT.value, "results.jsonl"), "w") as f:
    for point, state in points:
      for act in ("relu", "softplus"):
        for dtype in (jnp.float32, jnp.float64):
          for row in _compare(state, train_np, val_np, act, dtype, cfg):
            row.update(point=point, activation=act, dtype=jnp.dtype(dtype).name)
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(row), flush=True)
  _plot(rows, os.path.join(_OUT.value, "error_vs_r.png"))
  lines = ["| point | activation | dtype | product | best r | error at best r | error at r=0.01 "
           "(DARTS) | cosine at r=0.01 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for key in sorted({(r["point"], r["activation"], r["dtype"], r["product"]) for r in rows}):
    sel = [r for r in rows if (r["point"], r["activation"], r["dtype"], r["product"]) == key]
    best = min(sel, key=lambda r: r["rel_error"])
    darts = next(r for r in sel if r["darts_rule"]) if any(r["darts_rule"] for r in sel) else best
    lines.append(f"| {' | '.join(key)} | {best['r']:g} | {best['rel_error']:.2e} | "
                 f"{darts['rel_error']:.2e} | {darts['cosine']:.6f} |")
  summary = "\n".join(lines)
  with open(os.path.join(_OUT.value, "summary.md"), "w") as f:
    f.write(summary + "\n")
  print(summary)


if __name__ == "__main__":
  app.run(main)
