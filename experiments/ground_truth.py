r"""g2' and g2'' against the true g2, at the exact inner optimum of a small supernet.

  python experiments/ground_truth.py --out=experiments/results/ground_truth [--seeds=0,1,2]
  python experiments/ground_truth.py --out=experiments/results/ground_truth --from_results

The bilevel problem (bilevel.py): the default search's space `s2` in one cell at
C=2, softplus instead of ReLU, float64, batch norm with fixed statistics (with
batch statistics the weights in front of a non-affine batch norm are
scale-invariant and weight decay has no minimizer), weight decay `--wd` in the
inner objective, and fixed full batches of `--images` digits each for training
and validation. For each seed (the initial weights) it solves the inner problem
to |dF/dw| <= 1e-8, checks the inner optimum by the Lanczos extremes of H + wd I,
computes the true g = g1 + g2 by the implicit function theorem (MINRES) and
checks it against central differences of the outer objective (and, with
--dense, against a dense solve), then compares with it

  g2'  = -eta M (H + wd I) v            (amended; its direction does not depend on eta)
  g2'' = -xi M v'                       (DARTS; v' = v at the optimum, where w' = w)
  g2(lambda) = -M (H + (wd + lambda) I)^-1 v   (damped, as the search's monitor and the
                                               old angle study took it), against g2 and -M v

and the full gradients g1 + eta g2'/eta, g1 + g2'' against g for each eta and xi.
Writes results.json (one record per seed) and summary.md under --out. With
--batch_stats batch norm uses the batch's statistics, as in the search; the
inner solve is then expected to fail, and the record says how far it got.
"""

import json
import os
import sys
import time

from absl import app, flags
import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from amended_darts_jax import bilevel, initializers, input_pipeline, supernet  # noqa: E402
from amended_darts_jax import hypergrad as hg  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Initial weights' seeds.")
_IMAGES = flags.DEFINE_integer("images", 32, "Digits in each of the two fixed batches.")
_WD = flags.DEFINE_float("wd", 1e-2, "Weight decay of the inner problem.")
_ETAS = flags.DEFINE_list("etas", ["0.01", "0.1", "1"], "Amending coefficients.")
_XIS = flags.DEFINE_list("xis", ["0.001", "0.025", "0.1"], "DARTS' xi (the weight lr).")
_DAMPINGS = flags.DEFINE_list("dampings", ["0.01", "0.1", "1", "10"], "Damping lambda.")
_DENSE = flags.DEFINE_bool("dense", False, "Also solve with the dense H + wd I.")
_BATCH_STATS = flags.DEFINE_bool("batch_stats", False, "Batch norm with batch statistics, as in "
                                 "the search (the inner problem then has no minimizer).")
_MINRES_ITERS = flags.DEFINE_integer("minres_iters", 500, "MINRES iterations per Newton step.")
_LBFGS_TOL = flags.DEFINE_float("lbfgs_tol", 1e-5, "|dF/dw| where L-BFGS hands over to Newton.")
_FROM_RESULTS = flags.DEFINE_bool("from_results", False, "Only summarize results.json.")
_OUT = flags.DEFINE_string("out", "experiments/results/ground_truth", "Output directory.")


def problem(seed: int, images: int, batch_stats: bool = False):
  """(loss, omega0, alpha, train, val) of the small supernet on the digits."""
  splits, info = input_pipeline.load("digits")
  source = splits["train"]
  rows = [source[i] for i in range(2 * images)]
  # The search's normalization: pixels to [0, 1], then the training split's mean and std.
  pixels = np.stack([r["image"] for r in rows]).astype(np.float64) / 255.0
  x = jnp.asarray((pixels - info.mean[0]) / info.std[0], jnp.float64)
  y = jnp.asarray(np.array([r["label"] for r in rows]))
  train = {"image": x[:images], "label": y[:images]}
  val = {"image": x[images:], "label": y[images:]}
  model = supernet.Supernet("s2", C=2, layers=1, num_classes=10, act="softplus")
  alpha = jax.tree.map(lambda a: a.astype(jnp.float64), model.init_alpha(jax.random.PRNGKey(seed)))
  variables = initializers.init_variables(model, seed, x[:2], alpha, train=False)
  omega0 = jax.tree.map(lambda p: p.astype(jnp.float64), variables["params"])
  stats = variables["batch_stats"]  # mean 0, variance 1: batch norm divides by sqrt(1 + eps)

  def loss(w, a, b):
    if batch_stats:
      logits, _ = model.apply({"params": w, "batch_stats": stats}, b["image"], a, train=True,
                              mutable=["batch_stats"])
    else:
      logits = model.apply({"params": w, "batch_stats": stats}, b["image"], a, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()

  return loss, omega0, alpha, train, val


def _flat(tree) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0])


def _cos(a, b) -> float:
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def one_seed(seed: int) -> dict:
  wd = _WD.value
  loss, omega0, alpha, train, val = problem(seed, _IMAGES.value, _BATCH_STATS.value)
  record = {"seed": seed, "images": _IMAGES.value, "wd": wd, "batch_stats": _BATCH_STATS.value,
            "minres_iters": _MINRES_ITERS.value, "lbfgs_tol": _LBFGS_TOL.value,
            "weights": int(_flat(omega0).size), "alphas": int(_flat(alpha).size)}
  t0 = time.perf_counter()
  inner = bilevel.InnerProblem(loss, train, weight_decay=wd)
  try:
    solution = inner.solve(omega0, alpha, minres_iters=_MINRES_ITERS.value,
                           lbfgs_tol=_LBFGS_TOL.value)
  except RuntimeError as e:  # no inner optimum reached: nothing to compare against
    return {**record, "inner_failed": str(e), "solve_s": time.perf_counter() - t0}
  w = solution.omega
  labels = np.bincount(np.asarray(train["label"]), minlength=10) / train["label"].shape[0]
  record.update(
      # The loss of the best constant prediction, and the size of the weights through
      # which the image enters (the stem's convolution and batch-norm scale): an
      # optimum at that loss with those weights at zero ignores its input.
      label_entropy=float(-np.sum(labels[labels > 0] * np.log(labels[labels > 0]))),
      stem_norm=float(np.linalg.norm(_flat([w["stem_conv"]["kernel"], w["stem_bn"]["scale"]]))))
  record.update(grad_norm=solution.grad_norm, lbfgs_steps=solution.lbfgs_steps,
                newton_steps=solution.newton_steps, eig_min=solution.eig_min,
                eig_max=solution.eig_max, train_loss=float(loss(w, alpha, train)),
                val_loss=float(loss(w, alpha, val)), solve_s=time.perf_counter() - t0)
  true = bilevel.implicit_gradient(loss, loss, w, alpha, train, val, weight_decay=wd)
  differences = bilevel.difference_gradient(inner, loss, solution, alpha, val,
                                            minres_iters=_MINRES_ITERS.value)
  g1, g2, g = _flat(true["g1"]), _flat(true["g2"]), _flat(true["g"])
  rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  record.update(minres_residual=true["relative_residual"],
                rel_diff_implicit_vs_differences=rel(g, _flat(differences)),
                g1_norm=float(np.linalg.norm(g1)), g2_norm=float(np.linalg.norm(g2)),
                cos_g1_g=_cos(g1, g))
  if _DENSE.value:
    dense = bilevel.implicit_gradient(loss, loss, w, alpha, train, val, weight_decay=wd,
                                      dense=True)
    h, _ = bilevel.dense_matrices(loss, w, alpha, train, weight_decay=wd)
    eig = np.linalg.eigvalsh(np.asarray(h))
    record.update(rel_diff_implicit_vs_dense=rel(g, _flat(dense["g"])),
                  dense_eig_min=float(eig[0]), dense_eig_max=float(eig[-1]))

  v = jax.grad(loss)(w, alpha, val)
  unit = _flat(hg.amended_term(loss, w, alpha, train, v, eta=1.0, weight_decay=wd))
  mv = -_flat(hg.mixed_vp(loss, w, alpha, train, v))  # -M v: DARTS' direction at the optimum
  record.update(cos_amended_g2=_cos(unit, g2), cos_minus_mv_g2=_cos(mv, g2),
                cos_amended_minus_mv=_cos(unit, mv),
                inner_amended_g2_negative=bool(unit @ g2 < 0),
                # The scales that would make each approximation closest to g2 (least
                # squares): g2' is eta times `unit`, g2'' is xi times -M v.
                amended_unit_norm=float(np.linalg.norm(unit)),
                minus_mv_norm=float(np.linalg.norm(mv)),
                eta_fit=float(unit @ g2 / (unit @ unit)), xi_fit=float(mv @ g2 / (mv @ mv)))
  for eta in map(float, _ETAS.value):
    record[f"cos_full_amended_eta{eta:g}"] = _cos(g1 + eta * unit, g)
  for xi in map(float, _XIS.value):
    # At the optimum dF/dw = 0, so DARTS' unrolled w' = w - xi dF/dw is w and v' = v.
    g2_darts = xi * mv
    record[f"cos_full_darts_xi{xi:g}"] = _cos(g1 + g2_darts, g)
  record["cos_darts_g2"] = _cos(mv, g2)  # any xi: g2'' = xi (-M v)
  damped = {}
  # One program for every damping: lambda is an argument, not a constant.
  damped_term = jax.jit(lambda w, a, b, v, lam: hg.implicit_term(
      loss, w, a, b, v, weight_decay=wd, damping=lam, solver="minres", maxiter=1000, tol=1e-12))
  for damping in map(float, _DAMPINGS.value):
    g2_d, info = damped_term(w, alpha, train, v, damping)
    g2_d = _flat(g2_d)
    damped[f"{damping:g}"] = {"cos_g2": _cos(g2_d, g2), "cos_minus_mv": _cos(g2_d, mv),
                              "residual": float(info.relative_residual)}
  record["damped"] = damped
  return record


def summarize(records: list[dict]) -> str:
  failed = [r for r in records if "inner_failed" in r]
  records = [r for r in records if "inner_failed" not in r]
  lines = [f"seed {r['seed']}: {r['inner_failed']}" for r in failed]
  if not records:
    return "\n".join(lines) + "\n"
  lines += ["| seed | weights | train, val loss | constant prediction's loss | stem norm "
            "| \\|dF/dw\\| | eig min, max of H + wd I "
            "| strict | implicit vs differences | \\|g1\\|, \\|g2\\| | cos(g2', g2) "
            "| cos(g2'', g2) | cos(g2', -Mv) | cos(g1, g) |",
            "|" + " --- |" * 14]
  for r in records:
    strict = r["eig_min"] > np.sqrt(np.finfo(np.float64).eps) * r["eig_max"]  # InnerSolution's
    lines.append(f"| {r['seed']} | {r['weights']} | {r['train_loss']:.3f}, {r['val_loss']:.3f} | "
                 f"{r['label_entropy']:.3f} | {r['stem_norm']:.2e} | "
                 f"{r['grad_norm']:.1e} | {r['eig_min']:.2e}, "
                 f"{r['eig_max']:.3f} | {'yes' if strict else 'no'} | "
                 f"{r['rel_diff_implicit_vs_differences']:.1e} | "
                 f"{r['g1_norm']:.4f}, {r['g2_norm']:.4f} | {r['cos_amended_g2']:.3f} | "
                 f"{r['cos_darts_g2']:.3f} | {r['cos_amended_minus_mv']:.3f} | "
                 f"{r['cos_g1_g']:.3f} |")
  etas = [k for k in records[0] if k.startswith("cos_full_amended_eta")]
  xis = [k for k in records[0] if k.startswith("cos_full_darts_xi")]
  lines += ["", "The scale each approximation would need to match g2 (least squares), and "
            "the norms:", "", "| seed | \\|g2\\| | \\|M (H + wd I) v\\| | eta fit | \\|M v\\| | "
            "xi fit |", "| --- | --- | --- | --- | --- | --- |"]
  for r in records:
    lines.append(f"| {r['seed']} | {r['g2_norm']:.4f} | {r['amended_unit_norm']:.3g} | "
                 f"{r['eta_fit']:.3g} | {r['minus_mv_norm']:.3g} | {r['xi_fit']:.3g} |")
  lines += ["", "Full gradients against the true g:", "",
            "| seed | " + " | ".join(f"g1 + g2' (eta {k.removeprefix('cos_full_amended_eta')})"
                                     for k in etas)
            + " | " + " | ".join(f"g1 + g2'' (xi {k.removeprefix('cos_full_darts_xi')})"
                                 for k in xis) + " |",
            "| --- |" + " --- |" * (len(etas) + len(xis))]
  for r in records:
    lines.append(f"| {r['seed']} | " + " | ".join(f"{r[k]:.3f}" for k in etas + xis) + " |")
  dampings = list(records[0]["damped"])
  lines += ["", "The damped solve g2(lambda) = -M (H + (wd + lambda) I)^-1 v against the true g2 "
            "and against -M v (cos):", "",
            "| seed | " + " | ".join(f"lambda {d}: g2, -Mv" for d in dampings) + " |",
            "| --- |" + " --- |" * len(dampings)]
  for r in records:
    lines.append(f"| {r['seed']} | " + " | ".join(
        f"{r['damped'][d]['cos_g2']:.3f}, {r['damped'][d]['cos_minus_mv']:.3f}"
        for d in dampings) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  path = os.path.join(_OUT.value, "results.json")
  if _FROM_RESULTS.value:
    if not os.path.exists(path):
      sys.exit(f"error: {path} does not exist; run without --from_results first")
    records = json.load(open(path))
  else:
    os.makedirs(_OUT.value, exist_ok=True)
    records = []
    for seed in map(int, _SEEDS.value):
      records.append(one_seed(seed))
      print(json.dumps(records[-1]), flush=True)
      from amended_darts_jax import rundir
      rundir.write_json(path, records)
  summary = summarize(records)
  with open(os.path.join(_OUT.value, "summary.md"), "w") as f:
    f.write(summary)
  print(summary)


if __name__ == "__main__":
  app.run(main)
