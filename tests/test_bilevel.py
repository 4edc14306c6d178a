"""bilevel.py: the true hypergradient at an inner optimum, by the implicit function
theorem and by central differences of the outer objective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from amended_darts_jax import bilevel
from amended_darts_jax import hypergrad as hg


def _loss(omega, alpha, batch):
  """A smooth two-layer network whose hidden layer mixes three operations by softmax(alpha)."""
  h = batch["x"] @ omega["w1"] + omega["b1"]
  weights = jax.nn.softmax(alpha["mix"])
  h = weights[0] * jnp.tanh(h) + weights[1] * h + weights[2] * jax.nn.softplus(h)
  logits = (h * (1.0 + alpha["scale"])) @ omega["w2"] + omega["b2"]
  return -jnp.mean(jnp.sum(batch["y"] * jax.nn.log_softmax(logits), axis=-1))


def _problem():
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  n, d, hidden, k = 24, 4, 5, 3
  omega = {"w1": jax.random.normal(keys[0], (d, hidden), jnp.float64),
           "b1": jnp.zeros(hidden, jnp.float64),
           "w2": jax.random.normal(keys[1], (hidden, k), jnp.float64),
           "b2": jnp.zeros(k, jnp.float64)}
  alpha = {"mix": 0.5 * jax.random.normal(keys[2], (3,), jnp.float64),
           "scale": 0.3 * jax.random.normal(keys[3], (hidden,), jnp.float64)}

  def batch(kx, ky):
    return {"x": jax.random.normal(kx, (n, d), jnp.float64),
            "y": jax.nn.one_hot(jax.random.randint(ky, (n,), 0, k), k, dtype=jnp.float64)}

  return omega, alpha, batch(keys[4], keys[5]), batch(keys[6], keys[7])


@pytest.mark.parametrize("center", ["zero", "initial"])
def test_implicit_gradient_at_the_inner_optimum_equals_central_differences(x64, center):
  omega0, alpha, train, val = _problem()
  wd = 0.05
  c = None if center == "zero" else jax.tree.map(lambda p: 0.5 * p + 0.1, omega0)
  problem = bilevel.InnerProblem(_loss, train, weight_decay=wd, center=c)
  solution = problem.solve(omega0, alpha, lanczos_iters=60)
  assert solution.grad_norm <= 1e-8
  # Stationary for F = Lt + wd/2 |w - c|^2, written out independently of the solver.
  c_flat = 0.0 if c is None else np.asarray(ravel_pytree(c)[0])
  w_flat = np.asarray(ravel_pytree(solution.omega)[0])
  dlt = np.asarray(ravel_pytree(jax.grad(_loss)(solution.omega, alpha, train))[0])
  assert np.linalg.norm(dlt + wd * (w_flat - c_flat)) <= 1e-8
  if c is not None:  # a different point from decay towards zero
    assert np.linalg.norm(w_flat - c_flat) > 1e-2
    assert np.linalg.norm(dlt + wd * w_flat) > 1e-2
  # H + wd I at w*, dense: positive definite, and Lanczos (as many steps as weights)
  # finds its ends.
  h, m = bilevel.dense_matrices(_loss, solution.omega, alpha, train, weight_decay=wd)
  eigenvalues = np.linalg.eigvalsh(np.asarray(h))
  assert eigenvalues[0] > 1e-3 and solution.strict_minimum
  np.testing.assert_allclose([solution.eig_min, solution.eig_max],
                             [eigenvalues[0], eigenvalues[-1]], rtol=1e-6)
  # The dense blocks are the library's products.
  u = jax.tree.map(jnp.ones_like, solution.omega)
  np.testing.assert_allclose(
      np.asarray(h) @ np.ones(h.shape[0]),
      ravel_pytree(hg.hvp(_loss, solution.omega, alpha, train, u, weight_decay=wd))[0],
      rtol=1e-10)
  np.testing.assert_allclose(np.asarray(m) @ np.ones(h.shape[0]),
                             ravel_pytree(hg.mixed_vp(_loss, solution.omega, alpha, train, u))[0],
                             rtol=1e-10)

  dense = bilevel.implicit_gradient(_loss, _loss, solution.omega, alpha, train, val,
                                    weight_decay=wd, dense=True)
  krylov = bilevel.implicit_gradient(_loss, _loss, solution.omega, alpha, train, val,
                                     weight_decay=wd)
  differences = bilevel.difference_gradient(problem, _loss, solution, alpha, val)
  flat = lambda t: np.asarray(ravel_pytree(t)[0])
  rel = lambda a, b: np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(b))
  assert rel(dense["g"], differences) <= 1e-5
  assert rel(krylov["g"], dense["g"]) <= 1e-9 and krylov["relative_residual"] <= 1e-11
  # g2 matters here: g1 alone is far from the true gradient.
  assert rel(dense["g1"], differences) > 0.05
  # A tolerance the solver cannot reach is an error that says how far it got.
  try:
    problem.solve(solution.omega, alpha, tol=1e-30, lbfgs_steps=0, newton_steps=1,
                  lanczos_iters=0)
  except RuntimeError as e:
    assert "the inner problem reached |dF/dw| =" in str(e) and "not 1e-30" in str(e)
  else:
    raise AssertionError("a gradient norm of 1e-30 cannot be reached in one Newton step")
