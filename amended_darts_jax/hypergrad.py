"""Architecture gradients of bilevel NAS: exact and finite-difference products.

Everything here works for any loss `loss_fn(omega, alpha, batch) -> scalar` over
arbitrary pytrees; nothing knows about the supernet. Notation follows docs/math.md §1-3:

    g  = g1 + g2,   g1 = dLv/da,   g2 = -M H^-1 v                 (paper eq. 2, 5)
    H  = d2 Lt / dw2 (+ wd I),      M u = d/da <dLt/dw, u>,        v = dLv/dw

and the three approximations of g2:

    amended (paper eq. 6):  g2'  = -eta M H v
    DARTS second order:     g2'' = -xi  M v',   v' = dLv/dw at w' = w - xi dLt/dw
    implicit:               g2   = -M (H + lambda I)^-1 v   by CG or MINRES

Exact products are forward-over-reverse (`jax.jvp` of `jax.grad`; a chain of
them at one point, as in the amended and implicit terms, linearizes `jax.grad`
once and evaluates its tangent map per product); the finite differences are the
central ones DARTS uses, kept so the two can be compared.

A loss may return `(loss, aux)` when called with `has_aux=True`; aux (new batch
norm statistics, logits) is taken from the evaluation at the unperturbed point.
All functions are jit-able with the loss functions and string options static.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp

PyTree = Any
LossFn = Callable[..., Any]

METHODS = ("first_order", "darts", "amended", "implicit")
PRODUCTS = ("exact", "fd")


# ----------------------------------------------------------------------------
# Small pytree helpers.
# ----------------------------------------------------------------------------


def _end_to_end(leaves, dtype) -> jax.Array:
  """The leaves raveled and laid end to end as one vector of `dtype`.

  A reduction over it is two XLA kernels (the concatenation, then the reduction)
  where a reduction per leaf is one kernel per leaf and more to add them up; a
  supernet has hundreds of leaves, and on XLA:CPU every kernel adds to the
  compile (BUILD_NOTES.md).
  """
  if not leaves:
    return jnp.zeros((0,), dtype)
  return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Sum over leaves of <a, b> (real leaves), as one reduction."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    raise ValueError(f"tree_vdot of different trees: {jax.tree.structure(a)} and "
                     f"{jax.tree.structure(b)}")
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  for x, y in zip(leaves_a, leaves_b):
    if jnp.shape(x) != jnp.shape(y):
      raise ValueError(f"tree_vdot of leaves of shapes {jnp.shape(x)} and {jnp.shape(y)}")
  dtype = jnp.result_type(_tree_dtype(a), _tree_dtype(b))
  return jnp.sum(_end_to_end(leaves_a, dtype) * _end_to_end(leaves_b, dtype))


def tree_norm(a: PyTree) -> jax.Array:
  """Euclidean norm of all leaves together."""
  return jnp.sqrt(tree_vdot(a, a))


def tree_add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.subtract, a, b)


def tree_scale(s, a: PyTree) -> PyTree:
  return jax.tree.map(lambda x: (s * x).astype(x.dtype), a)


def tree_axpy(s, x: PyTree, y: PyTree) -> PyTree:
  """s * x + y, leafwise."""
  return jax.tree.map(lambda xi, yi: (s * xi + yi).astype(yi.dtype), x, y)


def tree_clip_by_norm(a: PyTree, max_norm) -> PyTree:
  """`a` scaled to Euclidean norm `max_norm` where its norm is larger (as
  `optax.clip_by_global_norm`, with the norm as one reduction, `tree_norm`; the
  search logs the same norm, and XLA computes it once)."""
  norm = tree_norm(a)
  keep = norm < max_norm
  return jax.tree.map(
      lambda x: jnp.where(keep, x, (x / norm.astype(x.dtype)) * max_norm).astype(x.dtype), a)


def tree_zeros_like(a: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, a)


def tree_cosine(a: PyTree, b: PyTree, eps: float = 1e-30) -> jax.Array:
  """<a, b> / (|a| |b|); NaN where either is zero (no angle is defined there)."""
  denom = tree_norm(a) * tree_norm(b)
  return jnp.where(denom > eps, tree_vdot(a, b) / jnp.maximum(denom, eps), jnp.nan)


def tree_all_finite(a: PyTree) -> jax.Array:
  """Whether every floating-point entry of every leaf is finite, as one reduction."""
  leaves = [x for x in jax.tree.leaves(a) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.isfinite(_end_to_end(leaves, jnp.result_type(*leaves))))


def _is_static_zero(x) -> bool:
  """True for a Python 0; a traced value (a decay or damping under jit) never is."""
  return isinstance(x, (int, float)) and x == 0


def _plus_shift(hp: PyTree, shift, p: PyTree) -> PyTree:
  """hp + shift p: (H + shift I) p from H p. A Python 0 shift adds nothing."""
  return hp if _is_static_zero(shift) else tree_axpy(shift, p, hp)


def _tree_dtype(a: PyTree):
  leaves = jax.tree.leaves(a)
  return jnp.result_type(*leaves) if leaves else jnp.float32


# ----------------------------------------------------------------------------
# Gradients of the loss, with an optional aux output.
# ----------------------------------------------------------------------------


def _loss_with_aux(loss_fn: LossFn, has_aux: bool) -> LossFn:
  """Returns a loss that always gives `(loss, aux)` (aux is None without has_aux)."""
  if has_aux:
    return loss_fn
  return lambda w, a, batch: (loss_fn(w, a, batch), None)


def _grad(loss_fn, alpha, batch, has_aux, argnums):
  """w -> (dL/d(argnums), (L, aux)); its jvp along u gives H u (argnums=0), M u
  (argnums=1) or both (argnums=(0, 1))."""
  fn = _loss_with_aux(loss_fn, has_aux)

  def grad(w):
    (loss, aux), g = jax.value_and_grad(fn, argnums=argnums, has_aux=True)(w, alpha, batch)
    return g, (loss, aux)

  return grad


def _grad_w(loss_fn, alpha, batch, has_aux):
  return _grad(loss_fn, alpha, batch, has_aux, 0)


def _grad_a(loss_fn, alpha, batch, has_aux):
  return _grad(loss_fn, alpha, batch, has_aux, 1)


def grad_and_hvp(loss_fn, omega, alpha, batch, v, *, weight_decay=0.0, has_aux=False):
  """One forward-over-reverse pass: `(dLt/dw, (H + wd I) v, (Lt, aux))`.

  The primal of the jvp is the training gradient at `omega`, which the weight
  step can reuse; the tangent is the Hessian-vector product (docs/math.md §4, "one jvp
  of grad(Lt) along v").
  """
  g_w, hv, loss_aux = jax.jvp(
      _grad_w(loss_fn, alpha, batch, has_aux), (omega,), (v,), has_aux=True)
  return g_w, _plus_shift(hv, weight_decay, v), loss_aux


def hvp(loss_fn, omega, alpha, batch, v, *, weight_decay=0.0, has_aux=False):
  """(H + weight_decay * I) v with H = d2 L / dw2, exact (forward-over-reverse)."""
  return grad_and_hvp(loss_fn, omega, alpha, batch, v,
                      weight_decay=weight_decay, has_aux=has_aux)[1]


def mixed_vp(loss_fn, omega, alpha, batch, u, *, has_aux=False):
  """M u = d/dalpha <dL/domega, u>, exact; an alpha-shaped pytree.

  Computed as the derivative of dL/dalpha along u in omega (forward-over-reverse),
  which equals the alpha-gradient of <dL/domega, u> by symmetry of second
  derivatives. The inner gradient is taken in (omega, alpha) and the omega part
  dropped (XLA removes its dead code): a `jax.custom_vjp` operation that does not
  depend on alpha (the depthwise convolutions of `cpu.depthwise` and `cpu.kernels`) must still be
  inside a reverse pass for the outer `jvp` in omega to see through it.
  """
  _, (_, mu), _ = jax.jvp(_grad(loss_fn, alpha, batch, has_aux, (0, 1)), (omega,), (u,),
                          has_aux=True)
  return mu


def linearized_grad(loss_fn, omega, alpha, batch, *, has_aux=False):
  """`(dL/dw, tangent, (L, aux))` with `tangent(u) = (H u, M u)`, exact.

  `jax.linearize` of grad over (w, a) at omega: the forward and backward pass
  run once, and each call of `tangent` is a forward-over-reverse pass without
  its primal. A chain of products at one point (H v then M H v; the CG
  iterations and the final M x) pays for the primal once instead of once per
  product; an unused half of `tangent`'s result is dead code to XLA. The
  residuals stay in memory for as long as `tangent` is used.
  """
  (g_w, _), tangent, loss_aux = jax.linearize(_grad(loss_fn, alpha, batch, has_aux, (0, 1)),
                                              omega, has_aux=True)
  return g_w, tangent, loss_aux


# ----------------------------------------------------------------------------
# Central finite differences (DARTS' rule e = r / |v|).
# ----------------------------------------------------------------------------


def _central_difference(grad_fn, omega, u, r):
  """[grad_fn(w + e u) - grad_fn(w - e u)] / (2 e) with e = r / |u|."""
  eps = r / jnp.maximum(tree_norm(u), jnp.finfo(_tree_dtype(u)).tiny)
  plus = grad_fn(tree_axpy(eps, u, omega))[0]
  minus = grad_fn(tree_axpy(-eps, u, omega))[0]
  return tree_scale(1.0 / (2.0 * eps), tree_sub(plus, minus))


def hvp_fd(loss_fn, omega, alpha, batch, v, *, weight_decay=0.0, r=0.01, has_aux=False):
  """(H + wd I) v by central differences of dL/dw, step r / |v| (docs/math.md §5)."""
  hv = _central_difference(_grad_w(loss_fn, alpha, batch, has_aux), omega, v, r)
  return _plus_shift(hv, weight_decay, v)  # the decay term is linear: added exactly


def mixed_vp_fd(loss_fn, omega, alpha, batch, u, *, r=0.01, has_aux=False):
  """M u by central differences of dL/dalpha along u in omega, step r / |u|."""
  return _central_difference(_grad_a(loss_fn, alpha, batch, has_aux), omega, u, r)


# ----------------------------------------------------------------------------
# The second terms.
# ----------------------------------------------------------------------------


def _check_products(products):
  if products not in PRODUCTS:
    raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")


def amended_term(loss_fn, omega, alpha, batch, v, *, eta, weight_decay=0.0,
                 products="exact", r=0.01, has_aux=False):
  """g2' = -eta M (H + wd I) v, the amended term (paper eq. 6).

  With products="fd" both products are central differences: Hv with step
  r / |v|, then M u with u = Hv and step r / |u| (docs/math.md §5; the paper's A.2 corrected, §7).
  """
  return _amended(loss_fn, omega, alpha, batch, v, eta=eta, weight_decay=weight_decay,
                  products=products, r=r, has_aux=has_aux)[0]


def _amended(loss_fn, omega, alpha, batch, v, *, eta, weight_decay, products, r, has_aux):
  """g2' and, for exact products, the training gradient and (Lt, aux) at omega."""
  _check_products(products)
  if products == "exact":
    # One linearization gives dLt/dw (its primal; the weight step reuses it), then
    # its tangent map (H + wd I) v and M u. Two separate jvps (grad_and_hvp, then
    # mixed_vp) would repeat the primal pass; at darts_5 they took 1.34x the time
    # and more XLA temporaries (BUILD_NOTES.md, the math core).
    g_w, tangent, loss_aux = linearized_grad(loss_fn, omega, alpha, batch, has_aux=has_aux)
    u = _plus_shift(tangent(v)[0], weight_decay, v)  # (H + wd I) v
    mu = tangent(u)[1]
  else:
    g_w, loss_aux = None, None
    u = hvp_fd(loss_fn, omega, alpha, batch, v, weight_decay=weight_decay, r=r,
               has_aux=has_aux)
    mu = mixed_vp_fd(loss_fn, omega, alpha, batch, u, r=r, has_aux=has_aux)
  return tree_scale(-eta, mu), g_w, loss_aux


def darts_term(loss_fn, omega, alpha, batch, v, *, xi, products="exact", r=0.01,
               has_aux=False):
  """g2'' = -xi M v, the second-order DARTS term (DARTS eq. 7; docs/math.md §3).

  `v` is the validation gradient at the unrolled weights w' = w - xi dLt/dw and
  M is taken at `omega` (the weights before unrolling), as DARTS does. With
  products="fd" this is DARTS' own central difference with step r / |v|.
  """
  _check_products(products)
  if products == "exact":
    mv = mixed_vp(loss_fn, omega, alpha, batch, v, has_aux=has_aux)
  else:
    mv = mixed_vp_fd(loss_fn, omega, alpha, batch, v, r=r, has_aux=has_aux)
  return tree_scale(-xi, mv)


class SolveInfo(NamedTuple):
  """How a Krylov solve of A x = b ended."""
  iterations: jax.Array
  relative_residual: jax.Array  # |b - A x| / |b|, recomputed at the end
  # CG: True where it met a direction p with p^T A p <= 0 (A not positive
  # definite; a ReLU network's H + wd I often is not) and stopped there.
  # MINRES: always False (it needs A symmetric only).
  negative_curvature: jax.Array = False
  # x^T A x / x^T x at the returned x (implicit_term; NaN where not computed): below
  # zero, the solution sits in a direction of negative curvature.
  curvature: jax.Array = float("nan")


SOLVERS = ("cg", "minres")


def conjugate_gradient(matvec, b, *, maxiter=100, tol=1e-6):
  """Solves A x = b for symmetric positive-definite A given as `matvec`.

  Stops when |b - A x| <= tol |b|, after maxiter iterations, or at the first
  direction of non-positive curvature (then x is the last iterate: zero if it
  happens at once; damping makes A positive definite). Returns `(x, SolveInfo)`;
  the reported residual is recomputed as |b - A x| / |b| at the end, not taken
  from the recurrence.
  """
  b_norm = tree_norm(b)
  tiny = jnp.finfo(_tree_dtype(b)).tiny
  x0 = tree_zeros_like(b)

  def cond(state):
    k, _, _, _, rs, negative = state
    return (k < maxiter) & (jnp.sqrt(rs) > tol * b_norm) & ~negative

  def body(state):
    k, x, res, p, rs, _ = state
    ap = matvec(p)
    curvature = tree_vdot(p, ap)
    positive = curvature > 0
    step = jnp.where(positive, rs / jnp.where(positive, curvature, 1.0), 0.0)
    x = tree_axpy(step, p, x)
    res = tree_axpy(-step, ap, res)
    rs_new = tree_vdot(res, res)
    p = tree_axpy(rs_new / jnp.maximum(rs, tiny), p, res)
    return k + positive.astype(k.dtype), x, res, p, rs_new, ~positive

  k, x, _, _, _, negative = jax.lax.while_loop(
      cond, body, (jnp.array(0), x0, b, b, tree_vdot(b, b), jnp.array(False)))
  true_res = tree_norm(tree_sub(b, matvec(x))) / jnp.maximum(b_norm, tiny)
  return x, SolveInfo(iterations=k, relative_residual=true_res, negative_curvature=negative)


def minres(matvec, b, *, maxiter=100, tol=1e-6):
  """Solves A x = b for symmetric A, definite or not, given as `matvec` (MINRES).

  Paige and Saunders' minimal-residual method: Lanczos on A from b, with the
  least-squares problem of the tridiagonal solved by Givens rotations as it
  grows, so x_k minimizes |b - A x| over the k-th Krylov space. Unlike CG it
  does not break down where A has negative eigenvalues (a ReLU network's
  H + wd I), only where A is singular along b. Stops when the recurrence's
  residual falls to tol |b| or after maxiter iterations. Returns
  `(x, SolveInfo)`, the residual recomputed as |b - A x| / |b| at the end.
  """
  b_norm = tree_norm(b)
  dtype = _tree_dtype(b)
  tiny = jnp.finfo(dtype).tiny
  zero = tree_zeros_like(b)
  scalar = lambda value: jnp.asarray(value, dtype)

  def cond(state):
    k, phibar = state[0], state[10]
    return (k < maxiter) & (phibar > tol * b_norm)

  def body(state):
    (k, x, r1, r2, w, w2, beta, oldb, dbar, epsln, phibar, cs, sn) = state
    v = tree_scale(1.0 / jnp.maximum(beta, tiny), r2)  # the Lanczos vector
    y = matvec(v)
    y = jax.lax.cond(k > 0, lambda: tree_axpy(-beta / jnp.maximum(oldb, tiny), r1, y),
                     lambda: y)
    alfa = tree_vdot(v, y)
    y = tree_axpy(-alfa / jnp.maximum(beta, tiny), r2, y)
    r1, r2 = r2, y
    oldb, beta = beta, tree_norm(y)
    # Apply the previous rotation to the new column of the tridiagonal, then make
    # the rotation that zeroes its subdiagonal entry beta.
    oldeps = epsln
    delta = cs * dbar + sn * alfa
    gbar = sn * dbar - cs * alfa
    epsln = sn * beta
    dbar = -cs * beta
    gamma = jnp.maximum(jnp.sqrt(gbar * gbar + beta * beta), tiny)
    cs, sn = gbar / gamma, beta / gamma
    phi, phibar = cs * phibar, sn * phibar
    w1, w2 = w2, w
    w = tree_scale(1.0 / gamma, tree_axpy(-delta, w2, tree_axpy(-oldeps, w1, v)))
    x = tree_axpy(phi, w, x)
    return (k + 1, x, r1, r2, w, w2, beta, oldb, dbar, epsln, phibar, cs, sn)

  init = (jnp.array(0), zero, b, b, zero, zero, b_norm, scalar(0.0), scalar(0.0), scalar(0.0),
          b_norm, scalar(-1.0), scalar(0.0))
  final = jax.lax.while_loop(cond, body, init)
  k, x = final[0], final[1]
  true_res = tree_norm(tree_sub(b, matvec(x))) / jnp.maximum(b_norm, tiny)
  return x, SolveInfo(iterations=k, relative_residual=true_res,
                      negative_curvature=jnp.array(False))


def solve(matvec, b, *, solver="cg", maxiter=100, tol=1e-6):
  """`conjugate_gradient` (solver="cg") or `minres` (solver="minres") of A x = b."""
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
  fn = conjugate_gradient if solver == "cg" else minres
  return fn(matvec, b, maxiter=maxiter, tol=tol)


def lanczos_extremes(matvec, v0, *, iterations=30):
  """The smallest and largest eigenvalue estimates of a symmetric A given as `matvec`.

  `iterations` steps of Lanczos from v0 with full reorthogonalization (the
  basis is kept, flattened: iterations x size numbers), then the extreme
  eigenvalues of the tridiagonal T. They lie inside A's spectrum and approach
  its ends as the steps grow, the largest in magnitude first; they are exact once
  `iterations` reaches the size of A or the Krylov space stops growing.
  Returns `(smallest, largest)`.
  """
  flat0, unravel = jax.flatten_util.ravel_pytree(v0)
  n = flat0.shape[0]
  m = min(iterations, n)
  dtype = flat0.dtype
  tiny = jnp.finfo(dtype).tiny
  apply = lambda q: jax.flatten_util.ravel_pytree(matvec(unravel(q)))[0]

  def body(j, state):
    basis, alphas, betas, q, q_prev, beta, scale = state
    basis = basis.at[j].set(q)
    z = apply(q) - beta * q_prev
    alpha = jnp.vdot(q, z)
    z = z - alpha * q
    # Twice against the whole basis (rows past j are zero): the vectors stay
    # orthogonal in floating point, so no eigenvalue is found twice.
    z = z - basis.T @ (basis @ z)
    z = z - basis.T @ (basis @ z)
    beta_next = jnp.linalg.norm(z)
    # What is left at rounding level, relative to the size of T so far, is no new
    # direction: the Krylov space has stopped growing (the steps after it stay zero).
    scale = jnp.maximum(scale, jnp.abs(alpha) + beta + beta_next)
    ended = beta_next <= breakdown * scale
    beta_next = jnp.where(ended, 0.0, beta_next)
    q_next = jnp.where(ended, 0.0, z / jnp.maximum(beta_next, tiny))
    return (basis, alphas.at[j].set(alpha), betas.at[j].set(beta_next), q_next, q, beta_next,
            scale)

  breakdown = 1e3 * jnp.finfo(dtype).eps
  q0 = flat0 / jnp.maximum(jnp.linalg.norm(flat0), tiny)
  init = (jnp.zeros((m, n), dtype), jnp.zeros(m, dtype), jnp.zeros(m, dtype), q0,
          jnp.zeros(n, dtype), jnp.zeros((), dtype), jnp.zeros((), dtype))
  _, alphas, betas, _, _, _, _ = jax.lax.fori_loop(0, m, body, init)
  # Once the Krylov space stops growing (a beta vanishes) the later steps leave
  # zero rows. Their diagonal is set to alphas[0], a Rayleigh quotient of A and so
  # inside the live block's spectrum: the extremes are then the live block's.
  alive = jnp.cumprod(jnp.concatenate([jnp.ones(1, bool), betas[:-1] > 0])).astype(bool)
  off = jnp.where(alive[1:], betas[:-1], 0.0)
  diagonal = jnp.where(alive, alphas, alphas[0])
  eig = jnp.linalg.eigvalsh(jnp.diag(diagonal) + jnp.diag(off, 1) + jnp.diag(off, -1))
  return eig[0], eig[-1]


def implicit_term(loss_fn, omega, alpha, batch, v, *, weight_decay=0.0, damping=0.0,
                  maxiter=100, tol=1e-6, solver="cg", has_aux=False):
  """g2 = -M (H + (wd + damping) I)^-1 v, the implicit-function term (paper eq. 5).

  The linear solve is `solver` on exact Hessian-vector products: "cg"
  (conjugate gradient; it stops at non-positive curvature, so it needs
  H + (wd + damping) I positive definite) or "minres" (any symmetric
  nonsingular system: g2 exists wherever the matrix is invertible, definite or
  not). Returns `(g2, SolveInfo)`: iterations, the final relative residual and,
  for CG, whether it stopped at non-positive curvature (raise `damping` then).
  """
  g2, info, _, _ = _implicit(loss_fn, omega, alpha, batch, v, weight_decay=weight_decay,
                             damping=damping, maxiter=maxiter, tol=tol, solver=solver,
                             has_aux=has_aux)
  return g2, info


def _implicit(loss_fn, omega, alpha, batch, v, *, weight_decay, damping, maxiter, tol,
              has_aux, solver="cg"):
  """g2, the solve's info, and the training gradient and (Lt, aux) at omega."""
  shift = weight_decay + damping
  # Linearized once: every solver iteration and the final M x evaluate the
  # tangent map only, and its primal is dLt/dw.
  g_w, tangent, loss_aux = linearized_grad(loss_fn, omega, alpha, batch, has_aux=has_aux)
  matvec = lambda p: _plus_shift(tangent(p)[0], shift, p)
  x, info = solve(matvec, v, solver=solver, maxiter=maxiter, tol=tol)
  hx, mx = tangent(x)
  curvature = tree_vdot(x, _plus_shift(hx, shift, x)) / jnp.maximum(tree_vdot(x, x), 1e-30)
  return tree_scale(-1.0, mx), info._replace(curvature=curvature), g_w, loss_aux


# ----------------------------------------------------------------------------
# The full architecture gradient.
# ----------------------------------------------------------------------------


def unrolled_weights(train_grad, omega, xi, *, weight_decay=0.0, momentum_term=None):
  """w' = w - xi (dLt/dw + wd w + momentum_term), DARTS' one-step unrolling.

  `momentum_term` is the SGD momentum buffer times the momentum (DARTS folds
  it into the unrolled step); None leaves it out.
  """
  step = train_grad
  if not _is_static_zero(weight_decay):
    step = tree_axpy(weight_decay, omega, step)
  if momentum_term is not None:
    step = tree_add(step, momentum_term)
  return tree_axpy(-xi, step, omega)


def arch_gradient(loss_train, loss_val, omega, alpha, train_batch, val_batch, *, method,
                  products="exact", eta=0.1, xi=0.025, weight_decay=0.0, r=0.01,
                  momentum_term=None, damping=0.0, cg_maxiter=100, cg_tol=1e-6,
                  solver="cg", has_aux=False):
  """The architecture gradient g = g1 + second term, for one of four methods.

  method:
    "first_order": g = g1 = dLv/da                              (DARTS first order)
    "darts":       g = dLv/da(w') - xi M v',  w' = w - xi dLt/dw  (DARTS eq. 7)
    "amended":     g = g1 - eta M (H + wd I) v                  (paper eq. 6)
    "implicit":    g = g1 - M (H + (wd + damping) I)^-1 v        (paper eq. 5; `solver`)

  Returns `(g, aux)`. aux holds "g1", "g2" (the second term; zeros for
  first_order), "v" (dLv/dw, at w' for darts; None for first_order, which needs
  none), "val_loss", "val_aux", "train_grad" (dLt/dw at omega where it was
  computed on the way, else None), "train_loss" and "train_aux" (from the same evaluation, else None) and, for
  implicit, "cg" (the SolveInfo of `solver`, "cg" or "minres", with cg_maxiter and
  cg_tol).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  _check_products(products)
  val_fn = _loss_with_aux(loss_val, has_aux)
  kw = dict(has_aux=has_aux)
  train_grad = train_loss = train_aux = None

  if method == "darts":
    # The unrolled step needs dLt/dw at omega first; it is the weight step's gradient too.
    train_grad, (train_loss, train_aux) = _grad_w(loss_train, alpha, train_batch, has_aux)(omega)
    omega_eval = unrolled_weights(train_grad, omega, xi, weight_decay=weight_decay,
                                  momentum_term=momentum_term)
  else:
    omega_eval = omega

  # first_order needs only dLv/da: skipping dLv/dw (the weights' kernel gradients)
  # makes the pass less than half as long (experiments/profile_step.py).
  wrt = 1 if method == "first_order" else (0, 1)
  (val_loss, val_aux), grads = jax.value_and_grad(val_fn, argnums=wrt, has_aux=True)(
      omega_eval, alpha, val_batch)
  v, g1 = (None, grads) if method == "first_order" else grads

  extra = {}
  if method == "first_order":
    g2 = tree_zeros_like(g1)
  elif method == "darts":
    g2 = darts_term(loss_train, omega, alpha, train_batch, v, xi=xi, products=products,
                    r=r, **kw)
  elif method == "amended":
    g2, g_w, loss_aux = _amended(loss_train, omega, alpha, train_batch, v, eta=eta,
                                 weight_decay=weight_decay, products=products, r=r, **kw)
    if g_w is not None:
      train_grad, (train_loss, train_aux) = g_w, loss_aux
  else:  # implicit
    g2, info, train_grad, (train_loss, train_aux) = _implicit(
        loss_train, omega, alpha, train_batch, v, weight_decay=weight_decay,
        damping=damping, maxiter=cg_maxiter, tol=cg_tol, solver=solver, **kw)
    extra["cg"] = info

  aux = dict(g1=g1, g2=g2, v=v, val_loss=val_loss, val_aux=val_aux, train_grad=train_grad,
             train_loss=train_loss, train_aux=train_aux, **extra)
  return tree_add(g1, g2), aux


def reference_terms(loss_train, loss_val, omega, alpha, train_batch, val_batch, v, *, eta, xi,
                    weight_decay=0.0, momentum_term=None, damping=0.0, solver="minres",
                    maxiter=100, tol=1e-6):
  """g2', g2'' and the solved g2 at one point, from one linearization of dLt/dw.

  `v` is dLv/dw at omega. Returns "g2_amended" (-eta M (H + wd I) v, paper eq. 6),
  "g2_darts" (-xi M v', DARTS eq. 7, v' at the unrolled weights as in
  `second_terms`), "g2" (-M (H + (wd + damping) I)^-1 v, paper eq. 5, by `solver`)
  and "info" (its SolveInfo, with the curvature). The same numbers as `second_terms`
  and `implicit_term`, in a smaller program: the training gradient is linearized
  once, the solver's iterations
  evaluate its tangent map in one loop, and the five other products (H v,
  M (H + wd I) v, M v', H x and M x) in a second loop of four iterations, so the
  compiled program holds two copies of the tangent map instead of seven primal
  and tangent passes. Both loops work on the raveled vectors (one operation per
  vector update instead of one per weight array).
  """
  g_w, tangent, _ = linearized_grad(loss_train, omega, alpha, train_batch)
  unrolled = unrolled_weights(g_w, omega, xi, weight_decay=weight_decay,
                              momentum_term=momentum_term)
  v_unrolled = jax.grad(loss_val)(unrolled, alpha, val_batch)
  ravel = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
  flat_v, unravel_w = jax.flatten_util.ravel_pytree(v)
  flat_a, unravel_a = jax.flatten_util.ravel_pytree(alpha)
  flat_v_unrolled = ravel(v_unrolled)

  def flat_tangent(p):
    hp, mp = tangent(unravel_w(p))
    return ravel(hp), ravel(mp)

  shift = weight_decay + damping
  x, info = solve(lambda p: flat_tangent(p)[0] + shift * p, flat_v, solver=solver,
                  maxiter=maxiter, tol=tol)

  def product(i, carry):
    # i = 0: H v; 1: M (H + wd I) v; 2: M v'; 3: H x and M x.
    hv, m_amended, m_darts, hx, mx = carry
    inputs = jnp.stack([flat_v, hv + weight_decay * flat_v, flat_v_unrolled, x])
    hp, mp = flat_tangent(inputs[i])
    return (jnp.where(i == 0, hp, hv), jnp.where(i == 1, mp, m_amended),
            jnp.where(i == 2, mp, m_darts), jnp.where(i == 3, hp, hx), jnp.where(i == 3, mp, mx))

  zeros_w, zeros_a = jnp.zeros_like(flat_v), jnp.zeros_like(flat_a)
  _, m_amended, m_darts, hx, mx = jax.lax.fori_loop(
      0, 4, product, (zeros_w, zeros_a, zeros_a, zeros_w, zeros_a))
  curvature = jnp.vdot(x, hx + shift * x) / jnp.maximum(jnp.vdot(x, x), 1e-30)
  return dict(g2_amended=unravel_a(-eta * m_amended), g2_darts=unravel_a(-xi * m_darts),
              g2=unravel_a(-mx), info=info._replace(curvature=curvature))


def validation_linearized(loss_val, omega, alpha, batch):
  """`(v, g1, hess_alpha)`: dLv/dw and dLv/da at (omega, alpha), and the map
  u -> d2 Lv/da2 u (one linearization in alpha: the gradients are its primal)."""
  (v, g1), tangent = jax.linearize(lambda a: jax.grad(loss_val, (0, 1))(omega, a, batch), alpha)
  return v, g1, lambda u: tangent(u)[1]


def dominant_eigenvalue(matvec, u0, *, iterations):
  """The eigenvalue of largest magnitude of a symmetric A given as `matvec`, by
  power iteration from u0: the Rayleigh quotient u^T A u of the iterate after
  `iterations` normalized products (one copy of `matvec` in the program)."""

  def body(_, state):
    u, _ = state
    au = matvec(u)
    return tree_scale(1.0 / jnp.maximum(tree_norm(au), 1e-30), au), tree_vdot(u, au)

  u0 = tree_scale(1.0 / jnp.maximum(tree_norm(u0), 1e-30), u0)
  return jax.lax.fori_loop(0, iterations + 1, body, (u0, jnp.zeros((), _tree_dtype(u0))))[1]


def second_terms(loss_train, loss_val, omega, alpha, train_batch, val_batch, *, eta, xi,
                 weight_decay=0.0, momentum_term=None):
  """The two approximations of g2 at one point, with exact products, for comparison.

  Returns "v" (dLv/dw at omega), "g1" (dLv/da there), "g2_amended"
  (-eta M (H + wd I) v), "g2_darts" (-xi M v' with v' = dLv/dw at the unrolled
  w' = w - xi (dLt/dw + wd w + momentum_term), as DARTS' step takes it; see
  unrolled_weights) and "g1_unrolled" (dLv/da at w', DARTS' first term). Losses
  return a scalar (no aux).
  """
  v, g1 = jax.grad(loss_val, (0, 1))(omega, alpha, val_batch)
  # The amended term's linearization gives dLt/dw as its primal: no second pass for it.
  g2_amended, train_grad, _ = _amended(loss_train, omega, alpha, train_batch, v, eta=eta,
                                       weight_decay=weight_decay, products="exact", r=0.0,
                                       has_aux=False)
  unrolled = unrolled_weights(train_grad, omega, xi, weight_decay=weight_decay,
                              momentum_term=momentum_term)
  v_unrolled, g1_unrolled = jax.grad(loss_val, (0, 1))(unrolled, alpha, val_batch)
  g2_darts = darts_term(loss_train, omega, alpha, train_batch, v_unrolled, xi=xi)
  return dict(v=v, g1=g1, g2_amended=g2_amended, g2_darts=g2_darts, g1_unrolled=g1_unrolled)
