"""The math core against independent math: dense Hessians, closed forms, toys."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from amended_darts_jax import hypergrad as hg

# ----------------------------------------------------------------------------
# Problems.
# ----------------------------------------------------------------------------


def mlp_loss(omega, alpha, batch):
  """A smooth two-layer MLP whose hidden layer mixes three ops by softmax(alpha).

  Every parameter, alpha included, enters nonlinearly, so H and M are dense.
  """
  h = batch["x"] @ omega["w1"] + omega["b1"]
  weights = jax.nn.softmax(alpha["mix"])
  h = weights[0] * jnp.tanh(h) + weights[1] * h + weights[2] * jax.nn.softplus(h)
  h = h * (1.0 + alpha["scale"])
  logits = h @ omega["w2"] + omega["b2"]
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.sum(batch["y"] * logp, axis=-1))


def mlp_problem(seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  n, d, hdim, k = 7, 3, 4, 3
  omega = {
      "w1": jax.random.normal(keys[0], (d, hdim), jnp.float64),
      "b1": 0.1 * jax.random.normal(keys[1], (hdim,), jnp.float64),
      "w2": jax.random.normal(keys[2], (hdim, k), jnp.float64),
      "b2": 0.1 * jax.random.normal(keys[3], (k,), jnp.float64),
  }
  alpha = {"mix": 0.5 * jax.random.normal(keys[4], (3,), jnp.float64),
           "scale": 0.3 * jax.random.normal(keys[5], (hdim,), jnp.float64)}

  def batch(key):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (n, d), jnp.float64),
            "y": jax.nn.one_hot(jax.random.randint(ky, (n,), 0, k), k, dtype=jnp.float64)}

  return omega, alpha, batch(keys[6]), batch(keys[7])


def dense_blocks(loss_fn, omega, alpha, batch):
  """H (w, w) and M (a, w) blocks of the dense joint Hessian, from raveled vectors."""
  w_flat, unravel_w = ravel_pytree(omega)
  a_flat, unravel_a = ravel_pytree(alpha)
  nw = w_flat.size

  def flat_loss(z):
    return loss_fn(unravel_w(z[:nw]), unravel_a(z[nw:]), batch)

  full = jax.hessian(flat_loss)(jnp.concatenate([w_flat, a_flat]))
  return full[:nw, :nw], full[nw:, :nw], unravel_w, unravel_a


def flat(tree):
  return ravel_pytree(tree)[0]


def assert_close(actual, expected, rtol, atol=0.0):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


def rel_err(a, b):
  return float(jnp.linalg.norm(flat(a) - flat(b)) / jnp.linalg.norm(flat(b)))


# Quadratic bilevel problem with closed-form w*(a):
#   Lt(w, a) = 1/2 w'Aw - w'Ba            => w*(a) = A^-1 B a,  H = A,  M = -B'
#   Lv(w, a) = 1/2 |Pw - t|^2 + 1/2 a'Ca + c'a
def quadratic_problem():
  rng = np.random.default_rng(3)
  nw, na = 6, 3
  q = rng.normal(size=(nw, nw))
  mats = {
      "A": jnp.asarray(q @ q.T + nw * np.eye(nw)),
      "B": jnp.asarray(rng.normal(size=(nw, na))),
      "P": jnp.asarray(rng.normal(size=(4, nw))),
      "t": jnp.asarray(rng.normal(size=(4,))),
      "C": jnp.asarray(np.diag(rng.uniform(0.5, 2.0, size=na))),
      "c": jnp.asarray(rng.normal(size=(na,))),
  }

  def lt(w, a, batch):
    return 0.5 * w["w"] @ batch["A"] @ w["w"] - w["w"] @ batch["B"] @ a["a"]

  def lv(w, a, batch):
    res = batch["P"] @ w["w"] - batch["t"]
    return 0.5 * res @ res + 0.5 * a["a"] @ batch["C"] @ a["a"] + batch["c"] @ a["a"]

  a0 = {"a": jnp.asarray(rng.normal(size=(na,)))}
  return lt, lv, mats, a0


# ----------------------------------------------------------------------------
# Exact products against dense Hessians.
# ----------------------------------------------------------------------------


@pytest.mark.usefixtures("x64")
def test_hvp_and_mixed_vp_match_dense_hessian_on_smooth_mlp():
  omega, alpha, batch, _ = mlp_problem()
  h, m, unravel_w, _ = dense_blocks(mlp_loss, omega, alpha, batch)
  v = unravel_w(jax.random.normal(jax.random.PRNGKey(9), (h.shape[0],), jnp.float64))
  assert_close(flat(hg.hvp(mlp_loss, omega, alpha, batch, v)), h @ flat(v), rtol=1e-10)
  assert_close(flat(hg.mixed_vp(mlp_loss, omega, alpha, batch, v)), m @ flat(v), rtol=1e-10)
  # The primal of the combined pass is the training gradient.
  g_w, hv, (loss, _) = hg.grad_and_hvp(mlp_loss, omega, alpha, batch, v)
  assert_close(flat(g_w), flat(jax.grad(mlp_loss)(omega, alpha, batch)), rtol=1e-12)
  assert_close(flat(hv), h @ flat(v), rtol=1e-10)
  assert_close(loss, mlp_loss(omega, alpha, batch), rtol=1e-14)


@pytest.mark.usefixtures("x64")
def test_weight_decay_adds_exactly_wd_times_v():
  omega, alpha, batch, _ = mlp_problem()
  v = jax.tree.map(lambda x: jnp.cos(x) + 0.3, omega)
  plain = hg.hvp(mlp_loss, omega, alpha, batch, v)
  for wd in (3e-4, 0.5):
    decayed = hg.hvp(mlp_loss, omega, alpha, batch, v, weight_decay=wd)
    assert_close(flat(decayed) - flat(plain), wd * flat(v), rtol=1e-12, atol=1e-15)
    fd = hg.hvp_fd(mlp_loss, omega, alpha, batch, v, weight_decay=wd, r=1e-4)
    assert_close(flat(fd), flat(decayed), rtol=1e-6)
    # A traced decay (a damping swept under jit) is added too, not tested for truth.
    traced = jax.jit(lambda d: hg.hvp(mlp_loss, omega, alpha, batch, v, weight_decay=d))(wd)
    assert_close(flat(traced) - flat(plain), wd * flat(v), rtol=1e-12, atol=1e-15)


@pytest.mark.usefixtures("x64")
def test_second_terms_match_dense_formulas_on_smooth_mlp():
  omega, alpha, train, val = mlp_problem(1)
  h, m, unravel_w, _ = dense_blocks(mlp_loss, omega, alpha, train)
  v = jax.grad(mlp_loss)(omega, alpha, val)
  eta, xi, wd = 0.1, 0.05, 0.01
  eye = jnp.eye(h.shape[0])

  g2p = hg.amended_term(mlp_loss, omega, alpha, train, v, eta=eta, weight_decay=wd)
  assert_close(flat(g2p), -eta * m @ ((h + wd * eye) @ flat(v)), rtol=1e-10)

  g2pp = hg.darts_term(mlp_loss, omega, alpha, train, v, xi=xi)
  assert_close(flat(g2pp), -xi * m @ flat(v), rtol=1e-10)

  # H of this MLP is indefinite; a shift makes it positive definite for CG.
  shift = float(max(0.0, -jnp.linalg.eigvalsh(h).min())) + 0.5
  g2, info = hg.implicit_term(mlp_loss, omega, alpha, train, v, weight_decay=wd,
                              damping=shift, maxiter=200, tol=1e-12)
  expected = -m @ jnp.linalg.solve(h + (wd + shift) * eye, flat(v))
  assert_close(flat(g2), expected, rtol=1e-8)
  assert float(info.relative_residual) < 1e-10
  assert 0 < int(info.iterations) <= h.shape[0] + 5


@pytest.mark.usefixtures("x64")
def test_arch_gradient_methods_match_dense_formulas():
  omega, alpha, train, val = mlp_problem(2)
  h, m, unravel_w, _ = dense_blocks(mlp_loss, omega, alpha, train)
  g1 = flat(jax.grad(mlp_loss, 1)(omega, alpha, val))
  v = flat(jax.grad(mlp_loss)(omega, alpha, val))
  gt = jax.grad(mlp_loss)(omega, alpha, train)
  eta, xi, wd, damping = 0.2, 0.03, 0.01, 3.0
  eye = jnp.eye(h.shape[0])
  call = functools.partial(hg.arch_gradient, mlp_loss, mlp_loss, omega, alpha, train, val,
                           eta=eta, xi=xi, weight_decay=wd)

  g, aux = call(method="first_order")
  assert_close(flat(g), g1, rtol=1e-12)
  assert aux["train_grad"] is None
  assert float(jnp.abs(flat(aux["g2"])).max()) == 0.0

  g, aux = call(method="amended")
  assert_close(flat(g), g1 - eta * m @ ((h + wd * eye) @ v), rtol=1e-10)
  assert_close(flat(aux["train_grad"]), flat(gt), rtol=1e-12)
  assert_close(flat(aux["g1"]), g1, rtol=1e-12)

  g, aux = call(method="amended", products="fd", r=1e-4)
  assert_close(flat(g), g1 - eta * m @ ((h + wd * eye) @ v), rtol=1e-6)
  assert aux["train_grad"] is None

  g, aux = call(method="implicit", damping=damping, cg_maxiter=200, cg_tol=1e-12)
  assert_close(flat(g), g1 - m @ jnp.linalg.solve(h + (wd + damping) * eye, v), rtol=1e-8)
  assert_close(flat(aux["train_grad"]), flat(gt), rtol=1e-12)

  # DARTS: one unrolled step (weight decay and a momentum term folded in), g1 and
  # v' at the unrolled weights, M at the original weights.
  mom = jax.tree.map(lambda x: 0.1 * jnp.sin(x), omega)
  w_unrolled = unravel_w(flat(omega) - xi * (flat(gt) + wd * flat(omega) + flat(mom)))
  g1u = flat(jax.grad(mlp_loss, 1)(w_unrolled, alpha, val))
  vu = flat(jax.grad(mlp_loss)(w_unrolled, alpha, val))
  g, aux = call(method="darts", momentum_term=mom)
  assert_close(flat(g), g1u - xi * m @ vu, rtol=1e-10)
  assert_close(flat(aux["train_grad"]), flat(gt), rtol=1e-12)
  # second_terms takes DARTS' g2'' as the step does, momentum included.
  terms = hg.second_terms(mlp_loss, mlp_loss, omega, alpha, train, val, eta=eta, xi=xi,
                          weight_decay=wd, momentum_term=mom)
  assert_close(flat(terms["g2_darts"]), -xi * m @ vu, rtol=1e-10)
  assert_close(flat(terms["g1_unrolled"]), g1u, rtol=1e-10)


def test_unknown_method_and_products_are_clear_errors():
  omega, alpha = {"w": jnp.ones(2)}, {"a": jnp.ones(1)}
  loss = lambda w, a, b: jnp.sum(w["w"] * a["a"])
  with pytest.raises(ValueError, match="method must be one of"):
    hg.arch_gradient(loss, loss, omega, alpha, None, None, method="second_order")
  with pytest.raises(ValueError, match="products must be one of"):
    hg.amended_term(loss, omega, alpha, None, omega, eta=0.1, products="finite")


# ----------------------------------------------------------------------------
# Closed forms.
# ----------------------------------------------------------------------------


@pytest.mark.usefixtures("x64")
def test_quadratic_bilevel_matches_closed_form():
  lt, lv, mats, alpha = quadratic_problem()

  def w_star(a):
    return {"w": jnp.linalg.solve(mats["A"], mats["B"] @ a["a"])}

  omega = w_star(alpha)
  # The true hypergradient, differentiating through the closed-form solution.
  total = jax.grad(lambda a: lv(w_star(a), a, mats))(alpha)
  g1 = jax.grad(lv, 1)(omega, alpha, mats)
  v = jax.grad(lv)(omega, alpha, mats)
  g2_eq5 = flat(total) - flat(g1)

  g2, info = hg.implicit_term(lt, omega, alpha, mats, v, tol=1e-14, maxiter=50)
  assert_close(flat(g2), g2_eq5, rtol=0, atol=1e-8)
  assert float(info.relative_residual) < 1e-12

  g, _ = hg.arch_gradient(lt, lv, omega, alpha, mats, mats, method="implicit", cg_tol=1e-14)
  assert_close(flat(g), flat(total), rtol=0, atol=1e-8)

  # With H = A, M = -B' the products are plain matrix products.
  a_mat, b_mat = mats["A"], mats["B"]
  assert_close(flat(hg.hvp(lt, omega, alpha, mats, v)), a_mat @ v["w"], rtol=1e-12)
  assert_close(flat(hg.mixed_vp(lt, omega, alpha, mats, v)), -b_mat.T @ v["w"], rtol=1e-12)
  assert_close(flat(hg.amended_term(lt, omega, alpha, mats, v, eta=0.3)),
               0.3 * b_mat.T @ a_mat @ v["w"], rtol=1e-12)
  # Finite differences are exact up to round-off on a quadratic.
  assert_close(flat(hg.amended_term(lt, omega, alpha, mats, v, eta=0.3, products="fd")),
               0.3 * b_mat.T @ a_mat @ v["w"], rtol=1e-8)


def toy_a1(x):
  return lambda w, a, batch: (w["w"] * x - a["a"]) ** 2


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("a_t", [-1.5, 0.7, 2.0])
@pytest.mark.parametrize("eta", [0.1, 0.5])
def test_toy_a1_closed_form(a_t, eta):
  """docs/math.md §10, the A.1 toy: L = (w x - a)^2, x_train = 1, x_val = 2, at w = w*(a) = a."""
  lt, lv = toy_a1(1.0), toy_a1(2.0)
  omega, alpha = {"w": jnp.array(a_t)}, {"a": jnp.array(a_t)}
  g, aux = hg.arch_gradient(lt, lv, omega, alpha, None, None, method="implicit", cg_tol=1e-14)
  assert_close(aux["g1"]["a"], -2 * a_t, rtol=1e-12)
  assert_close(aux["g2"]["a"], 4 * a_t, rtol=1e-12)
  assert_close(g["a"], 2 * a_t, rtol=1e-12)
  v = aux["v"]
  assert_close(v["w"], 4 * a_t, rtol=1e-12)
  assert_close(hg.amended_term(lt, omega, alpha, None, v, eta=eta)["a"], 16 * eta * a_t,
               rtol=1e-12)
  assert_close(hg.darts_term(lt, omega, alpha, None, v, xi=eta)["a"], 8 * eta * a_t,
               rtol=1e-12)
  # At the optimum dLt/dw = 0, so DARTS' unrolled step stays put: g = g1 + g2''.
  g, _ = hg.arch_gradient(lt, lv, omega, alpha, None, None, method="darts", xi=eta)
  assert_close(g["a"], -2 * a_t + 8 * eta * a_t, rtol=1e-12)


@pytest.mark.usefixtures("x64")
def test_counterexample_has_negative_inner_product():
  """docs/math.md §8: H = diag(1, 10), M = [1, 1], v = (1, -1), eta = 0.1 gives <g2', g2> = -0.81."""
  h = jnp.array([1.0, 10.0])
  lt = lambda w, a, b: 0.5 * jnp.sum(h * w["w"] ** 2) + a["a"] * jnp.sum(w["w"])
  lv = lambda w, a, b: w["w"][0] - w["w"][1]
  omega, alpha = {"w": jnp.array([0.3, -0.2])}, {"a": jnp.array(0.0)}
  _, aux = hg.arch_gradient(lt, lv, omega, alpha, None, None, method="implicit", cg_tol=1e-14)
  g2 = aux["g2"]
  g2p = hg.amended_term(lt, omega, alpha, None, aux["v"], eta=0.1)
  g2pp = hg.darts_term(lt, omega, alpha, None, aux["v"], xi=0.1)
  assert_close(g2["a"], -0.9, rtol=1e-12)
  assert_close(g2p["a"], 0.9, rtol=1e-12)
  assert_close(hg.tree_vdot(g2p, g2), -0.81, rtol=1e-12)
  assert_close(hg.tree_cosine(g2p, g2), -1.0, rtol=1e-12)
  assert abs(float(g2pp["a"])) < 1e-15


def test_cosine_with_a_zero_vector_is_nan_not_zero():
  """No angle is defined with a zero vector; 0 would read as 'orthogonal'."""
  a, zero = {"x": jnp.array([1.0, 2.0])}, {"x": jnp.zeros(2)}
  assert np.isnan(float(hg.tree_cosine(a, zero))) and np.isnan(float(hg.tree_cosine(zero, a)))
  assert_close(hg.tree_cosine(a, {"x": jnp.array([-2.0, 1.0])}), 0.0, rtol=0.0, atol=1e-7)


# ----------------------------------------------------------------------------
# Finite differences approach the exact products.
# ----------------------------------------------------------------------------


@pytest.mark.usefixtures("x64")
def test_central_differences_converge_quadratically():
  omega, alpha, train, val = mlp_problem(4)
  v = jax.grad(mlp_loss)(omega, alpha, val)
  exact_h = hg.hvp(mlp_loss, omega, alpha, train, v)
  exact_m = hg.mixed_vp(mlp_loss, omega, alpha, train, v)
  rs = [1e-1, 1e-2, 1e-3]
  err_h = [rel_err(hg.hvp_fd(mlp_loss, omega, alpha, train, v, r=r), exact_h) for r in rs]
  err_m = [rel_err(hg.mixed_vp_fd(mlp_loss, omega, alpha, train, v, r=r), exact_m) for r in rs]
  for errs in (err_h, err_m):
    for coarse, fine in zip(errs, errs[1:]):
      assert 50 < coarse / fine < 200, errs  # error ~ r^2: 100x per decade
  # Far below, round-off takes over and the error stops falling.
  assert rel_err(hg.hvp_fd(mlp_loss, omega, alpha, train, v, r=1e-9), exact_h) > err_h[-1] * 1e-3


@pytest.mark.usefixtures("x64")
def test_fd_amended_term_agrees_with_exact_at_default_and_small_r():
  omega, alpha, train, val = mlp_problem(5)
  v = jax.grad(mlp_loss)(omega, alpha, val)
  exact = hg.amended_term(mlp_loss, omega, alpha, train, v, eta=0.1, weight_decay=3e-4)
  fd = lambda r: hg.amended_term(mlp_loss, omega, alpha, train, v, eta=0.1, weight_decay=3e-4,
                                 products="fd", r=r)
  assert rel_err(fd(0.01), exact) < 1e-3
  assert rel_err(fd(1e-4), exact) < 1e-7
  assert rel_err(fd(0.3), exact) > 1e-5  # a coarse step visibly differs: the check can fail
  darts_exact = hg.darts_term(mlp_loss, omega, alpha, train, v, xi=0.1)
  darts_fd = hg.darts_term(mlp_loss, omega, alpha, train, v, xi=0.1, products="fd", r=1e-4)
  assert rel_err(darts_fd, darts_exact) < 1e-7


# ----------------------------------------------------------------------------
# jit: same numbers, one trace.
# ----------------------------------------------------------------------------


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("method", hg.METHODS)
@pytest.mark.parametrize("products", hg.PRODUCTS)
def test_arch_gradient_jit_matches_eager_and_traces_once(method, products):
  chex.clear_trace_counter()  # the counter is keyed by function, across parametrizations
  omega, alpha, train, val = mlp_problem(6)
  kw = dict(method=method, products=products, eta=0.1, xi=0.02, weight_decay=0.01,
            damping=2.0, cg_tol=1e-12, cg_maxiter=100)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def jitted(omega, alpha, train, val, eta):
    return hg.arch_gradient(mlp_loss, mlp_loss, omega, alpha, train, val, **{**kw, "eta": eta})

  eager, _ = hg.arch_gradient(mlp_loss, mlp_loss, omega, alpha, train, val, **kw)
  got, _ = jitted(omega, alpha, train, val, 0.1)
  assert_close(flat(got), flat(eager), rtol=1e-9)
  # Same shapes, new values: no retrace (assert_max_traces raises on a second trace).
  omega2 = jax.tree.map(lambda x: x * 1.1, omega)
  again, _ = jitted(omega2, alpha, val, train, 0.3)
  eager2, _ = hg.arch_gradient(mlp_loss, mlp_loss, omega2, alpha, val, train,
                               **{**kw, "eta": 0.3})
  assert_close(flat(again), flat(eager2), rtol=1e-9)


@pytest.mark.usefixtures("x64")
def test_products_jit_with_static_loss_and_options():
  chex.clear_trace_counter()
  omega, alpha, train, val = mlp_problem(7)
  v = jax.grad(mlp_loss)(omega, alpha, val)
  cases = {
      "hvp": (hg.hvp, dict(weight_decay=0.01)),
      "mixed_vp": (hg.mixed_vp, {}),
      "amended_exact": (hg.amended_term, dict(eta=0.1)),
      "amended_fd": (hg.amended_term, dict(eta=0.1, products="fd")),
      "darts_fd": (hg.darts_term, dict(xi=0.1, products="fd")),
      "implicit": (lambda *a, **k: hg.implicit_term(*a, **k)[0], dict(damping=3.0)),
  }
  for name, (fn, kw) in cases.items():
    chex.clear_trace_counter()

    def call(w, a, b, u, fn=fn, kw=kw):
      return fn(mlp_loss, w, a, b, u, **kw)

    jitted = jax.jit(chex.assert_max_traces(call, n=1))
    for scale in (1.0, 2.0):
      w = jax.tree.map(lambda x: x * scale, omega)
      np.testing.assert_allclose(flat(jitted(w, alpha, train, v)),
                                 flat(fn(mlp_loss, w, alpha, train, v, **kw)), rtol=1e-9,
                                 err_msg=name)


def test_has_aux_returns_aux_of_the_unperturbed_evaluation():
  omega, alpha = {"w": jnp.array([1.0, 2.0])}, {"a": jnp.array(0.5)}

  def loss(w, a, batch):
    out = jnp.sum(jnp.tanh(w["w"] * a["a"] * batch))
    return out, {"seen_w": w["w"]}

  g, aux = hg.arch_gradient(loss, loss, omega, alpha, jnp.array(1.0), jnp.array(2.0),
                            method="amended", has_aux=True)
  np.testing.assert_array_equal(aux["train_aux"]["seen_w"], omega["w"])
  np.testing.assert_array_equal(aux["val_aux"]["seen_w"], omega["w"])
  plain = lambda w, a, b: loss(w, a, b)[0]
  g_plain, _ = hg.arch_gradient(plain, plain, omega, alpha, jnp.array(1.0), jnp.array(2.0),
                                method="amended")
  np.testing.assert_allclose(g["a"], g_plain["a"], rtol=1e-6)


def test_conjugate_gradient_stops_finite_at_negative_curvature(x64):
  """On an indefinite A, CG stops at the first p with p^T A p <= 0 instead of dividing by it."""
  a = jnp.diag(jnp.array([2.0, -1.0]))
  # b along the positive eigenvector: solved in one step, no negative curvature met.
  x, info = hg.conjugate_gradient(lambda p: a @ p, jnp.array([4.0, 0.0]), tol=1e-12)
  np.testing.assert_allclose(x, [2.0, 0.0], rtol=1e-12)
  assert not bool(info.negative_curvature) and int(info.iterations) == 1
  # b mostly along the negative eigenvector: p0 = b has p^T A p = 2 - 4 < 0.
  x, info = hg.conjugate_gradient(lambda p: a @ p, jnp.array([1.0, 2.0]), tol=1e-12)
  assert bool(info.negative_curvature) and int(info.iterations) == 0
  assert bool(jnp.all(jnp.isfinite(x))) and float(jnp.abs(x).max()) == 0.0
  np.testing.assert_allclose(info.relative_residual, 1.0, rtol=1e-12)
  # Damping that makes A + lambda I positive definite restores the solve.
  x, info = hg.conjugate_gradient(lambda p: a @ p + 2.0 * p, jnp.array([1.0, 2.0]), tol=1e-12)
  np.testing.assert_allclose(x, [0.25, 2.0], rtol=1e-10)
  assert not bool(info.negative_curvature)


def _symmetric(eigenvalues, seed):
  """A dense symmetric matrix with the given eigenvalues in a random basis."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
  return q @ np.diag(eigenvalues) @ q.T


def test_minres_solves_definite_and_indefinite_systems_where_cg_fails(x64):
  rng = np.random.default_rng(0)
  # Positive definite: MINRES and CG both reach numpy's solution.
  a = _symmetric(np.linspace(0.5, 20.0, 30), 1)
  b = rng.normal(size=30)
  want = np.linalg.solve(a, b)
  for solver in hg.SOLVERS:
    x, info = hg.solve(lambda p: jnp.asarray(a) @ p, jnp.asarray(b), solver=solver, maxiter=200,
                       tol=1e-12)
    np.testing.assert_allclose(x, want, rtol=1e-9, atol=1e-10)
    assert float(info.relative_residual) <= 1e-11, solver
  # Indefinite and nonsingular (eigenvalues on both sides of 0, none near it): CG stops
  # at negative curvature far from the solution; MINRES converges to it.
  a = _symmetric(np.concatenate([np.linspace(-5.0, -0.3, 12), np.linspace(0.4, 9.0, 18)]), 2)
  want = np.linalg.solve(a, b)
  x, info = hg.conjugate_gradient(lambda p: jnp.asarray(a) @ p, jnp.asarray(b), maxiter=200,
                                  tol=1e-12)
  assert bool(info.negative_curvature) and float(info.relative_residual) > 1e-2
  x, info = hg.minres(lambda p: jnp.asarray(a) @ p, jnp.asarray(b), maxiter=200, tol=1e-12)
  np.testing.assert_allclose(x, want, rtol=1e-8, atol=1e-9)
  assert float(info.relative_residual) <= 1e-11 and int(info.iterations) <= 60
  # On pytrees, under jit, as the implicit term uses it.
  tree_b = {"u": jnp.asarray(b[:10]), "v": jnp.asarray(b[10:].reshape(4, 5))}
  matvec = lambda t: (lambda y: {"u": y[:10], "v": y[10:].reshape(4, 5)})(
      jnp.asarray(a) @ ravel_pytree(t)[0])
  x, _ = jax.jit(lambda t: hg.minres(matvec, t, maxiter=200, tol=1e-12))(tree_b)
  np.testing.assert_allclose(ravel_pytree(x)[0], want, rtol=1e-8, atol=1e-9)
  # The iteration cap holds: a residual short of the tolerance, honestly reported.
  x, info = hg.minres(lambda p: jnp.asarray(a) @ p, jnp.asarray(b), maxiter=3, tol=1e-12)
  assert int(info.iterations) == 3
  np.testing.assert_allclose(info.relative_residual,
                             np.linalg.norm(b - a @ np.asarray(x)) / np.linalg.norm(b),
                             rtol=1e-10)
  assert float(info.relative_residual) > 1e-3
  with pytest.raises(ValueError, match="solver must be one of"):
    hg.solve(lambda p: p, jnp.asarray(b), solver="gmres")


def test_lanczos_extremes_equal_the_dense_spectrum_ends(x64):
  eigenvalues = np.concatenate([[-3.5], np.linspace(0.1, 4.0, 38), [11.0]])
  a = _symmetric(eigenvalues, 3)
  v0 = {"x": jnp.asarray(np.random.default_rng(4).normal(size=40))}
  matvec = lambda t: {"x": jnp.asarray(a) @ t["x"]}
  lo, hi = jax.jit(lambda v: hg.lanczos_extremes(matvec, v, iterations=40))(v0)
  np.testing.assert_allclose([lo, hi], [-3.5, 11.0], rtol=1e-9)
  # Fewer steps: the estimates lie inside the spectrum, the isolated ends found early.
  lo, hi = hg.lanczos_extremes(matvec, v0, iterations=15)
  assert -3.5 - 1e-9 <= float(lo) and float(hi) <= 11.0 + 1e-9
  np.testing.assert_allclose([lo, hi], [-3.5, 11.0], rtol=1e-4)
  # A start vector in a 3-dimensional invariant subspace: the Krylov space stops growing
  # after 3 steps, and the extremes are those of that subspace, not zeros of empty steps.
  q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(40, 40)))
  a = q @ np.diag(np.concatenate([[2.0, 3.0, 5.0], np.linspace(-9.0, -7.0, 37)])) @ q.T
  v0 = {"x": jnp.asarray(q[:, :3] @ np.array([1.0, 1.0, 1.0]))}
  lo, hi = hg.lanczos_extremes(lambda t: {"x": jnp.asarray(a) @ t["x"]}, v0, iterations=10)
  np.testing.assert_allclose([lo, hi], [2.0, 5.0], rtol=1e-9)


def test_implicit_term_with_minres_equals_the_dense_solve_on_an_indefinite_hessian(x64):
  """A loss whose H + wd I is indefinite: CG cannot give g2, MINRES gives the dense one."""
  h = jnp.asarray(_symmetric(np.array([-2.0, -0.5, 0.7, 1.5, 3.0, 6.0]), 6))
  m = jnp.asarray(np.random.default_rng(7).normal(size=(6, 2)))
  lt = lambda w, a, b: 0.5 * w["w"] @ h @ w["w"] + w["w"] @ m @ a["a"] + 0.1 * jnp.sum(w["w"] ** 4)
  omega = {"w": jnp.zeros(6)}
  alpha = {"a": jnp.array([0.3, -0.2])}
  v = {"w": jnp.asarray(np.random.default_rng(8).normal(size=6))}
  wd = 0.05
  # At w = 0 the quartic term has no curvature: H = h, M = m^T (d/da of <dLt/dw, u> = m^T u).
  want = -(m.T @ np.linalg.solve(np.asarray(h) + wd * np.eye(6), np.asarray(v["w"])))
  g2, info = hg.implicit_term(lt, omega, alpha, None, v, weight_decay=wd, solver="minres",
                              tol=1e-13, maxiter=50)
  np.testing.assert_allclose(g2["a"], want, rtol=1e-9, atol=1e-12)
  assert float(info.relative_residual) <= 1e-12
  x = np.linalg.solve(np.asarray(h) + wd * np.eye(6), np.asarray(v["w"]))
  np.testing.assert_allclose(float(info.curvature), x @ (np.asarray(h) + wd * np.eye(6)) @ x
                             / (x @ x), rtol=1e-9)
  _, info = hg.implicit_term(lt, omega, alpha, None, v, weight_decay=wd, tol=1e-13, maxiter=50)
  assert bool(info.negative_curvature)
  g, aux = hg.arch_gradient(lt, lambda w, a, b: jnp.sum(w["w"] * v["w"]), omega, alpha, None,
                            None, method="implicit", solver="minres", cg_tol=1e-13)
  np.testing.assert_allclose(aux["g2"]["a"], -(m.T @ np.linalg.solve(np.asarray(h),
                                                                      np.asarray(v["w"]))),
                             rtol=1e-9, atol=1e-12)


def test_reference_terms_and_alpha_eigenvalue_equal_dense_algebra_on_the_mlp(x64):
  """The monitor's one-linearization terms against dense H, M and a dense solve on a
  smooth MLP whose H + wd I is indefinite (MINRES, no damping), with a momentum term."""
  omega, alpha, train, val = mlp_problem(3)
  h, m, unravel_w, _ = dense_blocks(mlp_loss, omega, alpha, train)
  eta, xi, wd = 0.1, 0.05, 0.01
  a = h + wd * jnp.eye(h.shape[0])
  assert float(jnp.linalg.eigvalsh(a)[0]) < 0  # indefinite: CG would not do
  v, g1, hess_alpha = hg.validation_linearized(mlp_loss, omega, alpha, val)
  assert_close(flat(v), flat(jax.grad(mlp_loss)(omega, alpha, val)), rtol=1e-12)
  assert_close(flat(g1), flat(jax.grad(mlp_loss, 1)(omega, alpha, val)), rtol=1e-12)
  mom = jax.tree.map(lambda x: 0.1 * jnp.cos(x), omega)
  terms = jax.jit(lambda v: hg.reference_terms(
      mlp_loss, mlp_loss, omega, alpha, train, val, v, eta=eta, xi=xi, weight_decay=wd,
      momentum_term=mom, solver="minres", maxiter=100, tol=1e-13))(v)
  gt = flat(jax.grad(mlp_loss)(omega, alpha, train))
  w_unrolled = unravel_w(flat(omega) - xi * (gt + wd * flat(omega) + flat(mom)))
  vu = flat(jax.grad(mlp_loss)(w_unrolled, alpha, val))
  x = jnp.linalg.solve(a, flat(v))
  assert_close(flat(terms["g2_amended"]), -eta * m @ (a @ flat(v)), rtol=1e-10)
  assert_close(flat(terms["g2_darts"]), -xi * m @ vu, rtol=1e-10)
  assert_close(flat(terms["g2"]), -m @ x, rtol=1e-8)
  assert float(terms["info"].relative_residual) <= 1e-12
  assert_close(terms["info"].curvature, x @ a @ x / (x @ x), rtol=1e-8)
  # The alpha Hessian of Lv: its products, and power iteration's dominant eigenvalue.
  ha = jax.hessian(lambda z: mlp_loss(omega, ravel_pytree(alpha)[1](z), val))(flat(alpha))
  u = jax.tree.map(jnp.sin, alpha)
  assert_close(flat(hess_alpha(u)), ha @ flat(u), rtol=1e-10)
  eig = np.linalg.eigvalsh(np.asarray(ha))
  dominant = eig[np.argmax(np.abs(eig))]
  got = hg.dominant_eigenvalue(hess_alpha, jax.tree.map(jnp.ones_like, alpha), iterations=300)
  assert_close(got, dominant, rtol=1e-6)


def test_tree_reductions_equal_numpy_on_the_raveled_leaves(x64):
  """tree_vdot, tree_norm and tree_all_finite lay the leaves end to end (one reduction);
  they equal NumPy on the leaves raveled by hand, and reject trees that differ."""
  rng = np.random.default_rng(3)
  a = {"w": rng.normal(size=(3, 4)), "b": [rng.normal(size=5), np.float64(2.5)]}
  b = {"w": rng.normal(size=(3, 4)), "b": [rng.normal(size=5), np.float64(-1.0)]}
  flat = lambda t: np.concatenate([t["w"].ravel(), t["b"][0], [t["b"][1]]])
  np.testing.assert_allclose(hg.tree_vdot(a, b), flat(a) @ flat(b), rtol=1e-13)
  np.testing.assert_allclose(jax.jit(hg.tree_norm)(a), np.linalg.norm(flat(a)), rtol=1e-13)
  assert bool(hg.tree_all_finite(a)) and bool(hg.tree_all_finite({**a, "step": np.int32(7)}))
  for bad in (np.nan, np.inf, -np.inf):
    c = {"w": a["w"].copy(), "b": a["b"]}
    c["w"][2, 1] = bad
    assert not bool(hg.tree_all_finite(c)) and not bool(jax.jit(hg.tree_all_finite)(c))
  with pytest.raises(ValueError, match="different trees"):
    hg.tree_vdot(a, {"w": b["w"]})
  with pytest.raises(ValueError, match="shapes"):
    hg.tree_vdot(a, {"w": b["w"].T, "b": b["b"]})


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_tree_clip_by_norm_equals_optax(max_norm):
  """The search's clip (one-reduction norm) against optax.clip_by_global_norm, above and
  below the threshold, and the clipped norm is max_norm when clipping."""
  rng = np.random.default_rng(4)
  g = {"a": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=7), jnp.float32)}
  ours = hg.tree_clip_by_norm(g, max_norm)
  theirs, _ = optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6)
  norm = float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g))))
  expected = min(norm, max_norm)
  np.testing.assert_allclose(float(hg.tree_norm(ours)), expected, rtol=1e-5)
