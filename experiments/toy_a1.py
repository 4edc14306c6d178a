r"""The A.1 toy (docs/math.md §10): L(w, a; x) = (w x - a)^2, x_train = 1, x_val = 2.

At w = w*(a_t) = a_t the closed forms are g1 = -2 a, g2 = 4 a, g = 2 a,
g2' = 16 eta a and g2'' = 8 eta a. This script computes every term with the
library's exact products and prints them with the angle of each estimate of g
(g1, g1 + g2', g1 + g2'') to the true g, then the counterexample of docs/math.md §8 to the
paper's claim <g2', g2> >= 0.

  python experiments/toy_a1.py [--a_values=-1,0.5,2] [--etas=0.01,0.1,0.25,1]
"""

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

from amended_darts_jax import hypergrad as hg  # noqa: E402
from common import counterexample  # noqa: E402

_A_VALUES = flags.DEFINE_list("a_values", ["-1", "0.5", "2"], "Values of a_t.")
_ETAS = flags.DEFINE_list("etas", ["0.01", "0.1", "0.25", "1"],
                          "Amending coefficients (also used as DARTS' xi).")


def toy_loss(x):
  return lambda w, a, batch: (w["w"] * x - a["a"]) ** 2


def angle_deg(a, b):
  """Angle between a and b in degrees; NaN where either is zero (no direction)."""
  if float(hg.tree_norm(a)) == 0.0 or float(hg.tree_norm(b)) == 0.0:
    return float("nan")
  return float(np.degrees(np.arccos(np.clip(hg.tree_cosine(a, b), -1.0, 1.0))))


def toy_table(a_values, etas):
  """Rows of (a_t, eta, g1, g2, g2', g2'', g, angles of g1, g1+g2', g1+g2'' to g)."""
  lt, lv = toy_loss(1.0), toy_loss(2.0)
  rows = []
  for a_t in a_values:
    omega, alpha = {"w": jnp.array(a_t)}, {"a": jnp.array(a_t)}  # w = w*(a_t) = a_t
    g, aux = hg.arch_gradient(lt, lv, omega, alpha, None, None, method="implicit", cg_tol=1e-14)
    g1, g2, v = aux["g1"], aux["g2"], aux["v"]
    for eta in etas:
      g2p = hg.amended_term(lt, omega, alpha, None, v, eta=eta)
      g2pp = hg.darts_term(lt, omega, alpha, None, v, xi=eta)
      rows.append(dict(
          a_t=a_t, eta=eta, g1=float(g1["a"]), g2=float(g2["a"]), g2_amended=float(g2p["a"]),
          g2_darts=float(g2pp["a"]), g=float(g["a"]), angle_g1=angle_deg(g1, g),
          angle_amended=angle_deg(hg.tree_add(g1, g2p), g),
          angle_darts=angle_deg(hg.tree_add(g1, g2pp), g)))
  return rows


def main(argv):
  del argv
  g2, g2p, g2pp, inner = counterexample()
  print(f"counterexample: g2 = {g2:+.4f}, g2' = {g2p:+.4f}, g2'' = {g2pp:+.4f}, "
        f"<g2', g2> = {inner:+.4f}")
  rows = toy_table([float(a) for a in _A_VALUES.value], [float(e) for e in _ETAS.value])
  header = ("a_t", "eta", "g1", "g2", "g2'", "g2''", "g", "ang(g1,g)", "ang(g1+g2',g)",
            "ang(g1+g2'',g)")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    vals = (r["a_t"], r["eta"], r["g1"], r["g2"], r["g2_amended"], r["g2_darts"], r["g"],
            r["angle_g1"], r["angle_amended"], r["angle_darts"])
    print("| " + " | ".join(f"{x:g}" for x in vals) + " |")


if __name__ == "__main__":
  app.run(main)
