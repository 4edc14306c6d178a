r"""How well do g2' (amended) and g2'' (DARTS) point along the implicit g2, at a search's weights?

  python experiments/angle_study.py --out=experiments/results/angle_study   # the committed study
  python experiments/angle_study.py --out=experiments/results/angle_study --from_results

First prints the two-dimensional counterexample of docs/math.md §8, where `<g2', g2> < 0`
although the paper (A.5) claims it never is. Then, at `--points` evenly spaced
points of `--steps`-step searches on the embedded digits for each of `--seeds`
(`--method` steps of the library's search, default first order; `s2`, 2 cells,
C=4, ReLU), computes with exact products

  g1 = dLv/da,  g2 = -M (H + (wd + damping) I)^-1 v  (`--solver`: MINRES, or CG),
  g2' = -eta M (H + wd I) v  for each eta,  g2'' = -xi M v'  (xi = the weight lr; v' at
  DARTS' unrolled weights, the momentum folded in as its step does),

and reports cos(g2', g2), cos(g2'', g2), cos(-M v, g2) (the large-damping limit of
g2), cos(g1 + g2', g), cos(g1 + g2'', g) and cos(g1, g) with g = g1 + g2, the
signs of <g2', g2> and <g2'', g2>, the solve's residual, iterations and the
curvature x^T (H + (wd + damping) I) x / |x|^2 at its solution, and how far the
weights are from stationarity (|dLt/dw + wd w|), for each damping. cos(g2', g2)
does not depend on eta (g2' is linear in it); the full-gradient cosines do.

These weights are not an inner optimum, so g2 here is not the derivative of the
outer objective (docs/math.md §9; experiments/ground_truth.py has a problem
where it is); it is the quantity the paper's approximations stand in for. A ReLU
supernet's H + wd I is indefinite, so CG without damping stops at its first
direction of negative curvature; MINRES solves the indefinite system. Writes
`results.jsonl` (one row per point and damping), `summary.md` and `angles.png`
under `--out`; `--from_results` rebuilds the last two.
"""

import json
import os
import sys
import time

from absl import app, flags
import jax

import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import common
from amended_darts_jax import hypergrad as hg
from amended_darts_jax import search
from amended_darts_jax.configs import default
from amended_darts_jax.errors import UserError

_SPACE = flags.DEFINE_string("space", "s2", "Search space.")
_C = flags.DEFINE_integer("C", 4, "Initial channels.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Cells.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_ACT = flags.DEFINE_string("activation", "relu", "relu | softplus | gelu | tanh.")
_METHOD = flags.DEFINE_string("method", "first_order", "Search method along the trajectory.")
_STEPS = flags.DEFINE_integer("steps", 240, "Search steps in all.")
_POINTS = flags.DEFINE_integer("points", 17, "Evaluation points per search, evenly spaced from "
                               "step 0.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the searches.")
_SOLVER = flags.DEFINE_enum("solver", "minres", ["minres", "cg"], "The solve for g2.")
_ETAS = flags.DEFINE_list("etas", ["0.01", "0.1", "1"], "Amending coefficients.")
_DAMPINGS = flags.DEFINE_list("dampings", ["0", "1"],
                              "Damping added to H + wd I in the solve for g2.")
_ITERS = flags.DEFINE_integer("iters", 150, "Iteration budget of each solve.")
_TOL = flags.DEFINE_float("tol", 1e-6, "Relative residual at which a solve stops.")
_MAX_RESIDUAL = flags.DEFINE_float("max_residual", 1e-3, "A solve counts as converged (its g2 "
                                   "as ground truth) below this relative residual.")
_FROM_RESULTS = flags.DEFINE_bool("from_results", False, "Only summarize and plot the "
                                  "results.jsonl already in --out.")
_OUT = flags.DEFINE_string("out", "experiments/results/angle_study", "Output directory.")


def _programs(model, wd, momentum):
  """Two compiled programs, weights and settings as arguments: the vectors that need
  no solve, and one solve (damping and iteration budget are arguments, so all
  settings share it)."""
  def loss(w, a, b):
    return search.supernet_loss(model, w, a, b)[0]

  def batches(stats, train_np, val_np):
    return {**train_np, "batch_stats": stats}, {**val_np, "batch_stats": stats}

  flat = lambda t: ravel_pytree(t)[0]

  @jax.jit
  def vectors(params, alpha, stats, trace, train_np, val_np, lr):
    train, val = batches(stats, train_np, val_np)
    t = hg.second_terms(loss, loss, params, alpha, train, val, eta=1.0, xi=lr, weight_decay=wd,
                        momentum_term=hg.tree_scale(momentum, trace))
    g_w = jax.grad(loss)(params, alpha, train)
    minus_mv = hg.mixed_vp(loss, params, alpha, train, t["v"])
    return t["v"], dict(g1=flat(t["g1"]), g2_unit=flat(t["g2_amended"]),
                        g2_darts=flat(t["g2_darts"]), g1_unrolled=flat(t["g1_unrolled"]),
                        minus_mv=-flat(minus_mv),
                        stationarity=hg.tree_norm(hg.tree_axpy(wd, params, g_w)))

  @jax.jit
  def solve(params, alpha, stats, train_np, val_np, v, damping, maxiter):
    train, _ = batches(stats, train_np, val_np)
    g2, info = hg.implicit_term(loss, params, alpha, train, v, weight_decay=wd, damping=damping,
                                maxiter=maxiter, tol=_TOL.value, solver=_SOLVER.value)
    return (flat(g2), info.relative_residual, info.iterations, info.negative_curvature,
            info.curvature)

  def run(params, alpha, stats, trace, train_np, val_np, lr, settings):
    args = (params, alpha, stats, train_np, val_np)
    v, out = vectors(params, alpha, stats, trace, train_np, val_np, lr)
    solves = [solve(*args, v, jnp.float32(d), jnp.int32(i)) for d, i in settings]
    out = jax.device_get(out)
    out.update({k: np.stack([jax.device_get(s[j]) for s in solves])
                for j, k in enumerate(("g2", "residual", "iterations", "negative_curvature",
                                       "curvature"))})
    return out

  return run


def _cos(a, b):
  denom = np.linalg.norm(a) * np.linalg.norm(b)
  return float(a @ b / denom) if denom > 0 else float("nan")


def _rows(seed, step, vec, etas, settings):
  rows = []
  for k, (damping, maxiter) in enumerate(settings):
    g2 = vec["g2"][k]
    g = vec["g1"] + g2
    row = dict(seed=seed, step=step, damping=damping, iters=maxiter, solver=_SOLVER.value,
               residual=float(vec["residual"][k]), iterations=int(vec["iterations"][k]),
               negative_curvature=bool(vec["negative_curvature"][k]),
               curvature=float(vec["curvature"][k]),
               stationarity=float(vec["stationarity"]),
               g1_norm=float(np.linalg.norm(vec["g1"])), g2_norm=float(np.linalg.norm(g2)),
               cos_amended=_cos(vec["g2_unit"], g2), cos_darts=_cos(vec["g2_darts"], g2),
               cos_minus_mv=_cos(vec["minus_mv"], g2),
               inner_amended_negative=bool(vec["g2_unit"] @ g2 < 0),
               inner_darts_negative=bool(vec["g2_darts"] @ g2 < 0),
               cos_full_first_order=_cos(vec["g1"], g),
               # DARTS' g1 is taken at the unrolled weights.
               cos_full_darts=_cos(vec["g1_unrolled"] + vec["g2_darts"], g))
    for eta in etas:
      row[f"cos_full_amended_eta{eta:g}"] = _cos(vec["g1"] + eta * vec["g2_unit"], g)
    rows.append(row)
  return rows


def _converged(row) -> bool:
  """A solve whose g2 means something: residual small (and, for CG, no negative
  curvature met)."""
  return not row["negative_curvature"] and row["residual"] <= _MAX_RESIDUAL.value


def _summary(rows, etas) -> str:
  keys = ["cos_amended", "cos_darts", "cos_minus_mv", "cos_full_first_order", "cos_full_darts",
          *[f"cos_full_amended_eta{e:g}" for e in etas]]
  med = lambda k, rs: float(np.nanmedian([r[k] for r in rs]))
  lines = [f"Medians over the points whose solve converged (residual <= "
           f"{_MAX_RESIDUAL.value:g}, no negative curvature met by CG); where none did, g2 is "
           "not known and the row says so. `curvature < 0`: the solution sits in a direction "
           "of negative curvature of H + (wd + damping) I.", "",
           "| damping | converged points | median residual | median iterations | curvature < 0 "
           "(converged) | median distance from stationarity | "
           + " | ".join(f"median {k}" for k in keys)
           + " | <g2', g2> < 0 | <g2'', g2> < 0 |",
           "|" + " --- |" * (len(keys) + 8)]
  for damping in sorted({r["damping"] for r in rows}):
    sel = [r for r in rows if r["damping"] == damping]
    good = [r for r in sel if _converged(r)]
    head = (f"| {damping:g} | {len(good)}/{len(sel)} | {med('residual', sel):.2e} | "
            f"{med('iterations', sel):.0f} | "
            f"{sum(r['curvature'] < 0 for r in good)}/{len(good)} | "
            f"{med('stationarity', sel):.3g} | ")
    if not good:
      lines.append(head + " | ".join("-" for _ in keys) + " | - | - |")
      continue
    lines.append(head + " | ".join(f"{med(k, good):+.3f}" for k in keys)
                 + f" | {sum(r['inner_amended_negative'] for r in good)}/{len(good)}"
                 f" | {sum(r['inner_darts_negative'] for r in good)}/{len(good)} |")
  # By distance from stationarity: the paper's assumption is that the weights are near w*.
  edges = (0.0, 0.1, 0.3, 1.0, float("inf"))
  lines += ["", "The converged solves by distance from stationarity |dLt/dw + wd w| (medians):",
            "", "| damping | distance | points | cos(g2', g2) | cos(g2'', g2) | cos(-M v, g2) | "
            "cos(g1 + g2' (eta 0.1), g) | <g2', g2> < 0 | <g2'', g2> < 0 |",
            "|" + " --- |" * 9]
  for damping in sorted({r["damping"] for r in rows}):
    good = [r for r in rows if r["damping"] == damping and _converged(r)]
    for lo, hi in zip(edges, edges[1:]):
      sel = [r for r in good if lo <= r["stationarity"] < hi]
      if sel:
        lines.append(f"| {damping:g} | [{lo:g}, {hi:g}) | {len(sel)} | "
                     + " | ".join(f"{med(k, sel):+.3f}" for k in (
                         "cos_amended", "cos_darts", "cos_minus_mv", "cos_full_amended_eta0.1"))
                     + f" | {sum(r['inner_amended_negative'] for r in sel)}/{len(sel)}"
                     f" | {sum(r['inner_darts_negative'] for r in sel)}/{len(sel)} |")
  return "\n".join(lines)


def _plot(rows, etas, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  dampings = sorted({r["damping"] for r in rows})
  fig, axes = plt.subplots(1, 4, figsize=(19, 4), sharey=True)
  panels = [("cos_amended", "cos(g2', g2)"), ("cos_darts", "cos(g2'', g2)"),
            ("cos_minus_mv", "cos(-M v, g2)"),
            (f"cos_full_amended_eta{max(etas):g}", f"cos(g1 + g2' (eta={max(etas):g}), g)")]
  for ax, (key, title) in zip(axes, panels):
    for damping in dampings:
      sel = [r for r in rows if r["damping"] == damping and _converged(r)]
      if sel:
        ax.semilogx([r["stationarity"] for r in sel], [r[key] for r in sel], "o", ms=4,
                    alpha=0.7, label=f"damping {damping:g}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(title)
    ax.set_xlabel("|dLt/dw + wd w| (distance from stationarity)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("cosine (converged solves; one point per search point)")
  axes[-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  g2, g2p, g2pp, inner = common.counterexample()
  first = (f"counterexample (docs/math.md §8): g2 = {g2:+.4f}, g2' = {g2p:+.4f}, g2'' = {g2pp:+.4f}, "
           f"<g2', g2> = {inner:+.4f}")
  print(first, flush=True)
  cfg = default.get_config()
  cfg.space, cfg.init_channels, cfg.layers = _SPACE.value, _C.value, _LAYERS.value
  cfg.batch_size, cfg.activation = _BATCH.value, _ACT.value
  try:
    search.validate_config(cfg)
  except UserError as e:
    sys.exit(f"error: {e}")
  try:
    etas = [float(e) for e in _ETAS.value]
    settings = [(float(d), _ITERS.value) for d in _DAMPINGS.value]
    seeds = [int(x) for x in _SEEDS.value]
  except ValueError:
    sys.exit("error: --etas and --dampings must be numbers and --seeds integers")
  if _FROM_RESULTS.value:
    with open(os.path.join(_OUT.value, "results.jsonl")) as f:
      rows = [json.loads(line) for line in f]
  else:
    rows = _study(cfg, etas, settings, seeds)
  summary = _summary(rows, etas)
  with open(os.path.join(_OUT.value, "summary.md"), "w") as f:
    f.write(f"{first}\n\n{summary}\n")
  _plot(rows, etas, os.path.join(_OUT.value, "angles.png"))
  print(summary)


def _study(cfg, etas, settings, seeds) -> list[dict]:
  import optax
  checkpoints = sorted({round(k * _STEPS.value / max(_POINTS.value - 1, 1))
                        for k in range(_POINTS.value)})
  program = None
  rows = []
  t0 = time.perf_counter()
  path = os.path.join(_OUT.value, "results.jsonl")
  with open(path + ".tmp", "w") as f:
    for seed in seeds:
      cfg.seed = seed
      for step, state, train_np, val_np, lr in common.digits_trajectory(cfg, checkpoints,
                                                                       _METHOD.value):
        if program is None:
          program = _programs(search.make_model(cfg, 10), cfg.weight_decay, cfg.momentum)
        trace = optax.tree_utils.tree_get(state.w_opt_state, "trace")
        vec = program(state.params, state.alpha, state.batch_stats, trace, train_np, val_np,
                      lr, settings)
        for row in _rows(seed, step, vec, etas, settings):
          rows.append(row)
          f.write(json.dumps(row) + "\n")
        f.flush()
        print(f"seed {seed} step {step}: done at {time.perf_counter() - t0:.0f} s", flush=True)
  os.replace(path + ".tmp", path)
  return rows


if __name__ == "__main__":
  app.run(main)
