r"""How well do g2' (amended) and g2'' (DARTS) approximate the implicit g2?

  python experiments/angle_study.py --out=runs/angle_study

First prints the two-dimensional counterexample of docs/math.md §8, where `<g2', g2> < 0`
although the paper (A.5) claims it never is. Then, at points along a search
on the embedded digits (`--method` steps of the library's search, default
first-order, s2 space, 5 cells), computes with exact products

  g1 = dLv/da,  g2 = -M (H + (wd + damping) I)^-1 v  (conjugate gradient),
  g2' = -eta M (H + wd I) v  for each eta,  g2'' = -xi M v'  (xi = the weight lr),

and reports cos(g2', g2), cos(g2'', g2), cos(g1 + g2', g), cos(g1 + g2'', g) and
cos(g1, g) with g = g1 + g2, the sign of <g2', g2>, and the solve's residual,
iterations and whether it met non-positive curvature, for each damping and
iteration budget (the sensitivity of the "ground truth"). cos(g2', g2) does not
depend on eta (g2' is linear in it); the full-gradient cosines do.

A ReLU supernet's H + wd I is not positive definite, so CG without damping stops
at the first direction of negative curvature; damping regularizes the inner
problem (weight decay wd + damping) and makes the solve well posed. Writes
`results.jsonl` (one row per point and solve setting), `summary.md` and
`angles.png` under `--out`.
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
_C = flags.DEFINE_integer("C", 8, "Initial channels.")
_LAYERS = flags.DEFINE_integer("layers", 5, "Cells.")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size.")
_ACT = flags.DEFINE_string("activation", "relu", "relu | softplus | gelu | tanh.")
_METHOD = flags.DEFINE_string("method", "first_order", "Search method along the trajectory.")
_STEPS = flags.DEFINE_integer("steps", 200, "Search steps in all.")
_POINTS = flags.DEFINE_integer("points", 7, "Evaluation points, evenly spaced from step 0.")
_ETAS = flags.DEFINE_list("etas", ["0.01", "0.1", "1"], "Amending coefficients.")
_DAMPINGS = flags.DEFINE_list("dampings", ["0", "0.01", "0.1", "1"],
                              "Damping added to H + wd I in the solve for g2.")
_ITERS = flags.DEFINE_list("cg_iters", ["10", "40"], "CG iteration budgets.")
_CG_TOL = flags.DEFINE_float("cg_tol", 1e-6, "CG relative residual tolerance.")
_MAX_RESIDUAL = flags.DEFINE_float("max_residual", 1e-3, "A solve counts as converged (its g2 "
                                   "as ground truth) below this relative residual.")
_FROM_RESULTS = flags.DEFINE_bool("from_results", False, "Only summarize and plot the "
                                  "results.jsonl already in --out.")
_OUT = flags.DEFINE_string("out", "runs/angle_study", "Output directory.")


def _programs(model, wd):
  """Two compiled programs, weights and settings as arguments: the vectors that need
  no solve, and one CG solve (damping and iteration budget are arguments, so all
  settings share it). One program for everything compiled several times longer."""
  def loss(w, a, b):
    return search.supernet_loss(model, w, a, b)[0]

  def batches(stats, train_np, val_np):
    return {**train_np, "batch_stats": stats}, {**val_np, "batch_stats": stats}

  flat = lambda t: ravel_pytree(t)[0]

  @jax.jit
  def vectors(params, alpha, stats, train_np, val_np, lr):
    train, val = batches(stats, train_np, val_np)
    t = hg.second_terms(loss, loss, params, alpha, train, val, eta=1.0, xi=lr, weight_decay=wd)
    return t["v"], dict(g1=flat(t["g1"]), g2_unit=flat(t["g2_amended"]),
                        g2_darts=flat(t["g2_darts"]), g1_unrolled=flat(t["g1_unrolled"]))

  @jax.jit
  def solve(params, alpha, stats, train_np, val_np, v, damping, maxiter):
    train, _ = batches(stats, train_np, val_np)
    matvec = lambda p: hg.hvp(loss, params, alpha, train, p, weight_decay=wd + damping)
    x, info = hg.conjugate_gradient(matvec, v, maxiter=maxiter, tol=_CG_TOL.value)
    g2 = hg.tree_scale(-1.0, hg.mixed_vp(loss, params, alpha, train, x))
    return flat(g2), info.relative_residual, info.iterations, info.negative_curvature

  def run(params, alpha, stats, train_np, val_np, lr, settings):
    args = (params, alpha, stats, train_np, val_np)
    v, out = vectors(*args, lr)
    solves = [solve(*args, v, jnp.float32(d), jnp.int32(i)) for d, i in settings]
    out = jax.device_get(out)
    out.update({k: np.stack([jax.device_get(s[j]) for s in solves])
                for j, k in enumerate(("g2", "residual", "iterations", "negative_curvature"))})
    return out

  return run


def _cos(a, b):
  denom = np.linalg.norm(a) * np.linalg.norm(b)
  return float(a @ b / denom) if denom > 0 else float("nan")


def _rows(step, vec, etas, settings):
  rows = []
  for k, (damping, maxiter) in enumerate(settings):
    g2 = vec["g2"][k]
    g = vec["g1"] + g2
    row = dict(step=step, damping=damping, cg_iters=maxiter,
               cg_residual=float(vec["residual"][k]), cg_iterations=int(vec["iterations"][k]),
               cg_negative_curvature=bool(vec["negative_curvature"][k]),
               g1_norm=float(np.linalg.norm(vec["g1"])), g2_norm=float(np.linalg.norm(g2)),
               cos_amended=_cos(vec["g2_unit"], g2), cos_darts=_cos(vec["g2_darts"], g2),
               inner_amended_negative=bool(vec["g2_unit"] @ g2 < 0),
               cos_full_first_order=_cos(vec["g1"], g),
               # DARTS' g1 is taken at the unrolled weights.
               cos_full_darts=_cos(vec["g1_unrolled"] + vec["g2_darts"], g))
    for eta in etas:
      row[f"cos_full_amended_eta{eta:g}"] = _cos(vec["g1"] + eta * vec["g2_unit"], g)
    # Sensitivity to the iteration budget: this solve against the longest one, same damping.
    longest = max((j for j, s in enumerate(settings) if s[0] == damping),
                  key=lambda j: settings[j][1])
    row["cos_to_longest_solve"] = _cos(g2, vec["g2"][longest])
    rows.append(row)
  return rows


def _converged(row) -> bool:
  """A solve whose g2 means something: no negative curvature met, residual small."""
  return not row["cg_negative_curvature"] and row["cg_residual"] <= _MAX_RESIDUAL.value


def _summary(rows, etas) -> str:
  keys = ["cos_amended", "cos_darts", "cos_full_first_order", "cos_full_darts",
          *[f"cos_full_amended_eta{e:g}" for e in etas]]
  lines = [f"Medians over the points whose solve converged (no negative curvature, residual "
           f"<= {_MAX_RESIDUAL.value:g}); where none did, g2 is not known and the row says so.",
           "",
           "| damping | CG iters | converged points | negative curvature | median residual | "
           + " | ".join(f"median {k}" for k in keys) + " | <g2', g2> < 0 (converged) | "
           "median cos to longest solve |",
           "|" + " --- |" * (len(keys) + 7)]
  for damping, iters in sorted({(r["damping"], r["cg_iters"]) for r in rows}):
    sel = [r for r in rows if (r["damping"], r["cg_iters"]) == (damping, iters)]
    good = [r for r in sel if _converged(r)]
    med = lambda k, rs: float(np.nanmedian([r[k] for r in rs]))
    head = (f"| {damping:g} | {iters} | {len(good)}/{len(sel)} | "
            f"{sum(r['cg_negative_curvature'] for r in sel)}/{len(sel)} | "
            f"{med('cg_residual', sel):.2e} | ")
    if not good:
      lines.append(head + " | ".join("-" for _ in keys) + " | - | - |")
      continue
    lines.append(head + " | ".join(f"{med(k, good):+.3f}" for k in keys)
                 + f" | {sum(r['inner_amended_negative'] for r in good)}/{len(good)} | "
                 f"{med('cos_to_longest_solve', good):+.3f} |")
  return "\n".join(lines)


def _plot(rows, etas, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  longest = max(r["cg_iters"] for r in rows)
  dampings = sorted({r["damping"] for r in rows})
  fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
  panels = [("cos_amended", "cos(g2', g2)"), ("cos_darts", "cos(g2'', g2)"),
            (f"cos_full_amended_eta{max(etas):g}", f"cos(g1 + g2' (eta={max(etas):g}), g)")]
  for ax, (key, title) in zip(axes, panels):
    for damping in dampings:
      sel = sorted((r for r in rows if r["damping"] == damping and r["cg_iters"] == longest
                    and _converged(r)), key=lambda r: r["step"])
      if not sel:
        continue
      ax.plot([r["step"] for r in sel], [r[key] for r in sel], marker="o", ms=3,
              label=f"damping {damping:g}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(title)
    ax.set_xlabel("search step")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f"cosine (g2: {longest} CG iterations, converged solves)")
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
    settings = [(float(d), int(i)) for d in _DAMPINGS.value for i in _ITERS.value]
  except ValueError:
    sys.exit("error: --etas and --dampings must be numbers and --cg_iters integers")
  if _FROM_RESULTS.value:
    with open(os.path.join(_OUT.value, "results.jsonl")) as f:
      rows = [json.loads(line) for line in f]
  else:
    rows = _study(cfg, etas, settings)
  summary = _summary(rows, etas)
  with open(os.path.join(_OUT.value, "summary.md"), "w") as f:
    f.write(f"command: `python experiments/angle_study.py {' '.join(sys.argv[1:])}`\n\n"
            f"{first}\n\n{summary}\n")
  _plot(rows, etas, os.path.join(_OUT.value, "angles.png"))
  print(summary)


def _study(cfg, etas, settings) -> list[dict]:
  checkpoints = sorted({round(k * _STEPS.value / max(_POINTS.value - 1, 1))
                        for k in range(_POINTS.value)})
  program = None
  rows = []
  t0 = time.perf_counter()
  with open(os.path.join(_OUT.value, "results.jsonl"), "w") as f:
    for step, state, train_np, val_np, lr in common.digits_trajectory(cfg, checkpoints,
                                                                     _METHOD.value):
      if program is None:
        program = _programs(search.make_model(cfg, 10), cfg.weight_decay)
      vec = program(state.params, state.alpha, state.batch_stats, train_np, val_np, lr,
                    settings)
      for row in _rows(step, vec, etas, settings):
        rows.append(row)
        f.write(json.dumps(row) + "\n")
      f.flush()
      print(f"step {step}: done at {time.perf_counter() - t0:.0f} s", flush=True)
  return rows


if __name__ == "__main__":
  app.run(main)
