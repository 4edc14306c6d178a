"""A bilevel problem solved to its inner optimum, and its true hypergradient two ways.

The inner problem is w*(a) = argmin_w F(w, a), F = Lt(w, a) + wd/2 |w|^2, the
outer objective f(a) = Lv(w*(a), a). Where w* is a strict local minimum (the
Hessian H + wd I of F positive definite) it is a smooth function of a, and

  df/da = g1 + g2 = dLv/da - M (H + wd I)^-1 v                 (docs/math.md §2)

by the implicit function theorem. `InnerProblem.solve` reaches w* to a
gradient norm of 1e-8 or less (L-BFGS, then damped Newton steps with MINRES on
exact Hessian-vector products) and reports the extreme eigenvalues of H + wd I
there (Lanczos); `implicit_gradient` is g1 + g2 with the solve dense (for tiny
problems) or by MINRES; `difference_gradient` is the same derivative by
central differences of f, re-solving the inner problem at every perturbed a.
The two agree only where
the inner problem is solved: this is the reference against which the
approximations g2' and g2'' can be measured.

The weight decay may pull towards a fixed `center` c instead of zero,
F = Lt + wd/2 |w - c|^2 (a proximal inner problem). H + wd I and M are the same
for every c, so are the formula above and every approximation of g2; what
changes is where w* lies. With c = 0, a network with three or more
multiplicative factors between input and output is at a stationary point of F,
and for small enough data gradients at a minimum, wherever the weights on its
input path vanish; it then ignores its input. Decay towards the initial weights
has no such point.

Losses are `loss(w, a, batch) -> scalar` over pytrees, as in hypergrad.py;
batches are fixed (full-batch problems). Use float64.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from amended_darts_jax import hypergrad as hg

PyTree = Any


@dataclasses.dataclass(frozen=True)
class InnerSolution:
  omega: PyTree
  grad_norm: float  # |dF/dw| at omega, F = Lt + wd/2 |w - center|^2
  lbfgs_steps: int
  newton_steps: int
  eig_min: float  # the extreme eigenvalues of H + wd I at omega (Lanczos)
  eig_max: float

  @property
  def strict_minimum(self) -> bool:
    return is_strict(self.eig_min, self.eig_max)


def is_strict(eig_min: float, eig_max: float) -> bool:
  """H + wd I positive definite beyond rounding: its smallest eigenvalue above
  sqrt(machine epsilon) times its largest (float64: 1.5e-8)."""
  return eig_min > np.sqrt(np.finfo(np.float64).eps) * eig_max


def _inner_objective(loss_train, weight_decay, center=None):
  """F = Lt + wd/2 |w - center|^2 (center None: zero)."""
  if center is None:
    return lambda w, a, b: loss_train(w, a, b) + 0.5 * weight_decay * hg.tree_vdot(w, w)

  def objective(w, a, b):
    offset = hg.tree_sub(w, center)
    return loss_train(w, a, b) + 0.5 * weight_decay * hg.tree_vdot(offset, offset)

  return objective


class InnerProblem:
  """min_w Lt(w, a) + wd/2 |w - center|^2 on a fixed batch (center None: zero), its
  steps compiled once for every a."""

  def __init__(self, loss_train: Callable, batch, *, weight_decay: float,
               center: PyTree | None = None):
    self.batch, self.weight_decay, self.center = batch, weight_decay, center
    objective = _inner_objective(loss_train, weight_decay, center)
    self._opt = opt = optax.lbfgs()

    def lbfgs_step(w, state, a, b):
      f = lambda w: objective(w, a, b)
      value, g = optax.value_and_grad_from_state(f)(w, state=state)
      updates, state = opt.update(g, state, w, value=value, grad=g, value_fn=f)
      return optax.apply_updates(w, updates), state

    def hvp(w, a, b, p):
      return jax.jvp(lambda w: jax.grad(objective)(w, a, b), (w,), (p,))[1]

    def newton_direction(w, a, b, mu, maxiter):
      g = jax.grad(objective)(w, a, b)
      d, _ = hg.minres(lambda p: hg.tree_axpy(mu, p, hvp(w, a, b, p)), hg.tree_scale(-1.0, g),
                       maxiter=maxiter, tol=1e-10)
      return d

    def extremes(w, a, b, start, iterations):
      return hg.lanczos_extremes(lambda p: hvp(w, a, b, p), start, iterations=iterations)

    self._grad = jax.jit(jax.grad(objective))
    self._lbfgs_step = jax.jit(lbfgs_step)
    self._newton_direction = jax.jit(newton_direction, static_argnums=4)
    self._extremes = jax.jit(extremes, static_argnums=4)

  def grad_norm(self, w, alpha) -> float:
    return float(hg.tree_norm(self._grad(w, alpha, self.batch)))

  def solve(self, omega0: PyTree, alpha: PyTree, *, tol: float = 1e-8, lbfgs_tol: float = 1e-5,
            lbfgs_steps: int = 3000, newton_steps: int = 100, minres_iters: int = 500,
            lanczos_iters: int = 80) -> InnerSolution:
    """w* from omega0: L-BFGS until |dF/dw| <= lbfgs_tol, then damped Newton to tol.

    A Newton step solves (H + wd I + mu I) d = -dF/dw by MINRES to a relative
    residual of 1e-10 and is taken whole, or halved up to three times, where it
    lowers |dF/dw|. mu starts at 0 and grows tenfold (from 1e-6) after a step
    that had to be shortened or failed, and shrinks tenfold after a whole one
    (Levenberg-Marquardt): far from the minimum, or where H + wd I is indefinite,
    the step turns toward the gradient. `lanczos_iters` 0 skips the eigenvalues
    (NaN). Raises RuntimeError where tol is not reached (the message says how far).
    """
    w, state = omega0, self._opt.init(omega0)
    done_lbfgs = 0
    while done_lbfgs < lbfgs_steps and self.grad_norm(w, alpha) > lbfgs_tol:
      w, state = self._lbfgs_step(w, state, alpha, self.batch)
      done_lbfgs += 1
    done_newton, norm, mu = 0, self.grad_norm(w, alpha), 0.0
    while norm > tol and done_newton < newton_steps:
      d = self._newton_direction(w, alpha, self.batch, mu, minres_iters)
      done_newton += 1
      for step in (1.0, 0.5, 0.25, 0.125):
        trial = hg.tree_axpy(step, d, w)
        trial_norm = self.grad_norm(trial, alpha)
        if trial_norm < norm:
          w, norm = trial, trial_norm
          break
      else:
        step = 0.0
      mu = (mu / 10 if mu > 1e-12 else 0.0) if step == 1.0 else max(10 * mu, 1e-6)
    if not norm <= tol:
      raise RuntimeError(f"the inner problem reached |dF/dw| = {norm:.3g}, not {tol:g}, after "
                         f"{done_lbfgs} L-BFGS and {done_newton} Newton steps")
    lo = hi = float("nan")
    if lanczos_iters:
      start = jax.tree.map(jnp.ones_like, w)
      lo, hi = (float(e) for e in self._extremes(w, alpha, self.batch, start, lanczos_iters))
    return InnerSolution(omega=w, grad_norm=norm, lbfgs_steps=done_lbfgs,
                         newton_steps=done_newton, eig_min=lo, eig_max=hi)


def dense_matrices(loss_train, omega, alpha, batch, *, weight_decay: float, chunk: int = 32):
  """H + wd I (n x n) and M (a x n) as dense arrays, n and a the raveled sizes (the
  same for every center of the weight decay)."""
  flat_w, unravel_w = ravel_pytree(omega)
  flat_a, unravel_a = ravel_pytree(alpha)
  objective = _inner_objective(loss_train, weight_decay)
  grad_w = lambda w_flat, a_flat: ravel_pytree(
      jax.grad(objective)(unravel_w(w_flat), unravel_a(a_flat), batch))[0]
  # Column j of H + wd I is its product with the j-th basis vector, taken `chunk` at a
  # time, so that memory holds `chunk` tangents and not n of them.
  column = lambda e: jax.jvp(lambda w: grad_w(w, flat_a), (flat_w,), (e,))[1]
  basis = jnp.eye(flat_w.shape[0], dtype=flat_w.dtype)
  h = jax.jit(lambda b: jax.lax.map(column, b, batch_size=chunk))(basis).T
  m = jax.jacfwd(grad_w, 1)(flat_w, flat_a).T  # d/da of <dF/dw, u> is M u
  return h, m


def implicit_gradient(loss_train, loss_val, omega, alpha, train_batch, val_batch, *,
                      weight_decay: float, dense: bool = False, maxiter: int = 1000,
                      tol: float = 1e-12) -> dict[str, PyTree]:
  """g1, g2 and g = g1 + g2 at omega (meant to be w*), by the implicit function theorem.

  `dense=True` builds H + wd I and M and solves with numpy's LU (tiny problems);
  otherwise g2 is `hypergrad.implicit_term` with MINRES to `tol`.
  Returns "g1", "g2", "g" (pytrees like alpha) and "relative_residual".
  """
  v, g1 = jax.grad(loss_val, (0, 1))(omega, alpha, val_batch)
  if dense:
    h, m = dense_matrices(loss_train, omega, alpha, train_batch, weight_decay=weight_decay)
    flat_v = ravel_pytree(v)[0]
    x = np.linalg.solve(np.asarray(h), np.asarray(flat_v))
    residual = np.linalg.norm(np.asarray(h) @ x - flat_v) / np.linalg.norm(flat_v)
    g2 = ravel_pytree(alpha)[1](-(np.asarray(m) @ x))
  else:
    g2, info = jax.jit(lambda w, a, b, v: hg.implicit_term(
        loss_train, w, a, b, v, weight_decay=weight_decay, solver="minres", maxiter=maxiter,
        tol=tol))(omega, alpha, train_batch, v)
    residual = float(info.relative_residual)
  return {"g1": g1, "g2": g2, "g": hg.tree_add(g1, g2), "relative_residual": float(residual)}


def difference_gradient(problem: InnerProblem, loss_val, solution: InnerSolution, alpha,
                        val_batch, *, step: float = 1e-4, tol: float = 1e-11,
                        minres_iters: int = 500, points: int = 2) -> PyTree:
  """df/da by central differences, f(a) = Lv(w*(a), a), each coordinate of alpha
  moved by +-step (points=2: error O(step^2)) or by +-step and +-2 step (points=4:
  (8 (f(+h) - f(-h)) - (f(+2h) - f(-2h))) / 12h, error O(step^4)), the inner
  problem solved again from w* to `tol` at each (Newton steps of `minres_iters`
  MINRES iterations)."""
  if points not in (2, 4):
    raise ValueError(f"points is 2 or 4, not {points}")
  flat_a, unravel_a = ravel_pytree(alpha)
  outer = jax.jit(lambda w, a, b: loss_val(w, a, b))

  def f(i, offset):
    a = unravel_a(flat_a.at[i].add(offset))
    moved = problem.solve(solution.omega, a, tol=tol, lbfgs_steps=0, lanczos_iters=0,
                          minres_iters=minres_iters)
    return float(outer(moved.omega, a, val_batch))

  derivative = np.zeros(flat_a.shape[0])
  for i in range(flat_a.shape[0]):
    near = f(i, step) - f(i, -step)
    if points == 2:
      derivative[i] = near / (2 * step)
    else:
      far = f(i, 2 * step) - f(i, -2 * step)
      derivative[i] = (8 * near - far) / (12 * step)
  return unravel_a(jnp.asarray(derivative, flat_a.dtype))
