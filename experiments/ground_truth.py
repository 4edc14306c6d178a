r"""g2' and g2'' against the true g2, at the exact inner optimum of a small supernet.

  python experiments/ground_truth.py --out=experiments/results/ground_truth [--seeds=0,1,2]
  python experiments/ground_truth.py --out=experiments/results/ground_truth --from_results

The bilevel problem (bilevel.py): the default search's space `s2` in one cell at
C=2, softplus instead of ReLU, float64, and fixed full batches of digits, `--images`
for training and `--val_images` for validation (both from the search's training
split). The inner objective is F = Lt + wd/2 |w - c|^2 with c the initial weights
(`--center=initial`, a proximal inner problem; `zero` is ordinary weight decay,
which is stationary wherever the weights on the image's path vanish, and a
minimum there once the decay outweighs the data's pull: one that ignores the
image). Batch norm uses
fixed statistics: by default those of the training batch under the initial
weights, so that the network starts as the search's does (`unit`: mean 0 and
variance 1; `batch`: each batch's own, as in the search, where the weights in
front of a non-affine batch norm are scale-invariant and the inner problem has
no minimizer; the record then says how far the solve got).

For each seed (the initial weights) it solves the inner problem to
|dF/dw| <= 1e-8, estimates the extremes of H + wd I there by Lanczos (its
smallest Ritz value bounds the smallest eigenvalue from above; --dense computes
the whole spectrum, which shows H + wd I definite), computes the true g = g1 + g2
by the implicit function theorem (MINRES) and checks it against central
differences of the outer objective on four points (and, with --dense, against a
dense solve), then compares with it

  g2'  = -eta M (H + wd I) v            (amended; its direction does not depend on eta)
  g2'' = -xi M v'                       (DARTS; v' = v at the optimum, where w' = w)
  g2(lambda) = -M (H + (wd + lambda) I)^-1 v   (damped, as the search's monitor and the
                                               old angle study took it), against g2 and -M v

and the full gradients g1 + g2', g1 + g2'' against g for each eta and xi.
H + wd I and M do not depend on c, so neither do these formulas. Writes
results.json (one record per seed) and summary.md under --out. On this 2-core
CPU the defaults with --dense took 31 minutes a seed whose inner problem is
solved, 3.5 of them in that solve and most of the rest in the central
differences (64 inner solves).
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

from amended_darts_jax import batch_norm, bilevel, initializers, input_pipeline  # noqa: E402
from amended_darts_jax import rundir, supernet  # noqa: E402
from amended_darts_jax import hypergrad as hg  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Initial weights' seeds.")
_IMAGES = flags.DEFINE_integer("images", 256, "Digits in the fixed training batch.")
_VAL_IMAGES = flags.DEFINE_integer("val_images", 256, "Digits in the fixed validation batch.")
_WD = flags.DEFINE_float("wd", 0.1, "Weight decay of the inner problem.")
_CENTER = flags.DEFINE_enum("center", "initial", ["initial", "zero"],
                            "Where the weight decay pulls: the initial weights or zero.")
_BN_STATS = flags.DEFINE_enum("bn_stats", "initial", ["initial", "unit", "batch"],
                              "Batch norm's statistics: the training batch's under the initial "
                              "weights, fixed; mean 0 and variance 1; each batch's own.")
_CONTINUATION = flags.DEFINE_list("continuation", [], "Weight decays solved first, in order, "
                                  "each from the last one's optimum, before --wd.")
_ETAS = flags.DEFINE_list("etas", ["0.01", "0.1", "1"], "Amending coefficients.")
_XIS = flags.DEFINE_list("xis", ["0.001", "0.025", "0.1"], "DARTS' xi (the weight lr).")
_DAMPINGS = flags.DEFINE_list("dampings", ["0.01", "0.1", "1", "10"], "Damping lambda.")
_DENSE = flags.DEFINE_bool("dense", False, "Also solve with the dense H + wd I.")
_MINRES_ITERS = flags.DEFINE_integer("minres_iters", 500, "MINRES iterations per Newton step.")
_LBFGS_TOL = flags.DEFINE_float("lbfgs_tol", 1e-5, "|dF/dw| where L-BFGS hands over to Newton.")
_LBFGS_STEPS = flags.DEFINE_integer("lbfgs_steps", 6000, "L-BFGS steps at most.")
_POINTS = flags.DEFINE_enum("difference_points", "4", ["2", "4"],
                            "Central differences of the outer objective on 2 or 4 points.")
_STEP = flags.DEFINE_float("difference_step", 1e-4, "Their step in alpha.")
_FROM_RESULTS = flags.DEFINE_bool("from_results", False, "Only summarize results.json.")
_OUT = flags.DEFINE_string("out", "experiments/results/ground_truth", "Output directory.")


def problem(seed: int, images: int, val_images: int, bn_stats: str = "initial"):
  """(loss, accuracy, omega0, alpha, train, val) of the small supernet on the digits."""
  splits, info = input_pipeline.load("digits")
  source = splits["train"]
  if images + val_images > len(source):
    raise ValueError(f"--images + --val_images is {images + val_images}, more than the "
                     f"{len(source)} digits of the search's training split")
  rows = [source[i] for i in range(images + val_images)]
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
  if bn_stats == "initial":
    # One pass in training mode moves each running average by (1 - momentum) towards
    # the batch's statistics; undo the average to keep the statistics themselves.
    _, moved = model.apply({"params": omega0, "batch_stats": stats}, train["image"], alpha,
                           train=True, mutable=["batch_stats"])
    m = batch_norm.BatchNorm.momentum
    stats = jax.tree.map(
        lambda new, old: (jnp.asarray(new, jnp.float64) - m * jnp.asarray(old, jnp.float64))
        / (1 - m), moved["batch_stats"], stats)

  def logits(w, a, b):
    if bn_stats == "batch":
      out, _ = model.apply({"params": w, "batch_stats": stats}, b["image"], a, train=True,
                           mutable=["batch_stats"])
      return out
    return model.apply({"params": w, "batch_stats": stats}, b["image"], a, train=False)

  def loss(w, a, b):
    return optax.softmax_cross_entropy_with_integer_labels(logits(w, a, b), b["label"]).mean()

  def accuracy(w, a, b):
    return float(jnp.mean(jnp.argmax(logits(w, a, b), -1) == b["label"]))

  return loss, accuracy, omega0, alpha, train, val


def _flat(tree) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0])


def _cos(a, b) -> float:
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def one_seed(seed: int) -> dict:
  wd = _WD.value
  loss, accuracy, omega0, alpha, train, val = problem(seed, _IMAGES.value, _VAL_IMAGES.value,
                                                      _BN_STATS.value)
  record = {"seed": seed, "images": _IMAGES.value, "val_images": _VAL_IMAGES.value, "wd": wd,
            "center": _CENTER.value, "bn_stats": _BN_STATS.value,
            "minres_iters": _MINRES_ITERS.value, "lbfgs_tol": _LBFGS_TOL.value,
            "difference_points": int(_POINTS.value), "difference_step": _STEP.value,
            "weights": int(_flat(omega0).size), "alphas": int(_flat(alpha).size)}
  continuation = [float(d) for d in _CONTINUATION.value]
  if continuation:
    record["continuation"] = continuation
  t0 = time.perf_counter()
  center = omega0 if _CENTER.value == "initial" else None
  start = omega0
  try:
    for decay in continuation + [wd]:
      inner = bilevel.InnerProblem(loss, train, weight_decay=decay, center=center)
      solution = inner.solve(start, alpha, minres_iters=_MINRES_ITERS.value,
                             lbfgs_tol=_LBFGS_TOL.value, lbfgs_steps=_LBFGS_STEPS.value)
      start = solution.omega
  except RuntimeError as e:  # no inner optimum reached: nothing to compare against
    where = f"at weight decay {decay:g}, " if continuation else ""
    return {**record, "inner_failed": f"{where}{e}",
            "solve_s": time.perf_counter() - t0}
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
                val_loss=float(loss(w, alpha, val)), train_acc=accuracy(w, alpha, train),
                val_acc=accuracy(w, alpha, val), initial_train_loss=float(loss(omega0, alpha, train)),
                moved=float(np.linalg.norm(_flat(w) - _flat(omega0))),
                initial_norm=float(np.linalg.norm(_flat(omega0))),
                solve_s=time.perf_counter() - t0)
  true = bilevel.implicit_gradient(loss, loss, w, alpha, train, val, weight_decay=wd)
  differences = bilevel.difference_gradient(inner, loss, solution, alpha, val,
                                            minres_iters=_MINRES_ITERS.value,
                                            points=int(_POINTS.value), step=_STEP.value)
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
  first = records[0]
  towards = "the initial weights" if first["center"] == "initial" else "zero"
  lines = [f"{first['images']} training and {first['val_images']} validation digits, weight "
           f"decay {first['wd']:g} towards {towards}, batch-norm statistics {first['bn_stats']}"
           + (f", solved first at weight decay {', '.join(f'{d:g}' for d in first['continuation'])}"
              if "continuation" in first else "") + ".", ""]
  failed = [r for r in records if "inner_failed" in r]
  records = [r for r in records if "inner_failed" not in r]
  lines += [f"- seed {r['seed']}: {r['inner_failed']}; nothing to compare against." for r in failed]
  if not records:
    return "\n".join(lines) + "\n"
  lines += [""] * bool(failed)
  lines += ["| seed | weights | train, val loss (initial train loss) | train, val accuracy "
            "| constant prediction's loss | stem norm | \\|w - w0\\| "
            "| \\|dF/dw\\| | eig min, max of H + wd I (Lanczos) "
            "| strict (dense where checked) | implicit vs differences | \\|g1\\|, \\|g2\\| | cos(g2', g2) "
            "| cos(g2'', g2) | cos(g2', -Mv) | cos(g1, g) |",
            "|" + " --- |" * 16]
  for r in records:
    # On the dense spectrum where there is one: Lanczos' smallest Ritz value bounds the
    # smallest eigenvalue from above, so it cannot show definiteness.
    strict = bilevel.is_strict(*((r["dense_eig_min"], r["dense_eig_max"]) if "dense_eig_min" in r
                                 else (r["eig_min"], r["eig_max"])))
    lines.append(f"| {r['seed']} | {r['weights']} | {r['train_loss']:.3f}, {r['val_loss']:.3f} "
                 f"({r['initial_train_loss']:.3f}) | {r['train_acc']:.3f}, {r['val_acc']:.3f} | "
                 f"{r['label_entropy']:.3f} | {r['stem_norm']:.2e} | {r['moved']:.3f} | "
                 f"{r['grad_norm']:.1e} | {r['eig_min']:.2e}, "
                 f"{r['eig_max']:.3f} | {'yes' if strict else 'no'} | "
                 f"{r['rel_diff_implicit_vs_differences']:.1e} | "
                 f"{r['g1_norm']:.4f}, {r['g2_norm']:.4f} | {r['cos_amended_g2']:.3f} | "
                 f"{r['cos_darts_g2']:.3f} | {r['cos_amended_minus_mv']:.3f} | "
                 f"{r['cos_g1_g']:.3f} |")
  if all("dense_eig_min" in r for r in records):
    lines += ["", "Checked dense (H + wd I built and solved whole):", "",
              "| seed | eig min, max (dense) | implicit (MINRES) vs dense solve |",
              "| --- | --- | --- |"]
    for r in records:
      lines.append(f"| {r['seed']} | {r['dense_eig_min']:.3e}, {r['dense_eig_max']:.1f} | "
                   f"{r['rel_diff_implicit_vs_dense']:.1e} |")
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
      rundir.write_json(path, records)
  summary = summarize(records)
  with open(os.path.join(_OUT.value, "summary.md"), "w") as f:
    f.write(summary)
  print(summary)


if __name__ == "__main__":
  app.run(main)
