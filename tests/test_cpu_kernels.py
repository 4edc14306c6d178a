"""cpu/kernels.py: the C++ kernels' sums, derivatives of every order, pooling and bits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amended_darts_jax.cpu import depthwise, kernels


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("channels", [16, 32, 64])
def test_cpu_depthwise_at_16_32_and_64_channels(channels):
  """kernels.cc has its own loops for 16, 32 and 64 channels (a fixed length, and
  register accumulators for the forward pass and the stride-1 input gradient)."""
  assert kernels.available(), kernels.why_unavailable()
  kx, kk, kc = jax.random.split(jax.random.PRNGKey(channels), 3)
  x = jax.random.normal(kx, (2, 6, 5, channels), jnp.float64)
  ws = jax.random.normal(kk, (3, 3, 3, channels), jnp.float64)  # three edges
  ws5 = jax.random.normal(kk, (3, 5, 5, channels), jnp.float64)
  for stride, pad, dilation, ws in ((1, 1, 1, ws), (2, 1, 1, ws), (1, 2, 2, ws), (1, 2, 1, ws5),
                                    (2, 4, 2, ws5)):
    edges = lambda f: lambda x, ws: jax.vmap(lambda w: f(x, w, stride, pad, dilation))(ws)
    out = jax.eval_shape(edges(depthwise.grouped), x, ws)
    cot = jax.random.normal(kc, out.shape, jnp.float64)
    loss = lambda f: lambda x, ws: jnp.sum(jnp.sin(edges(f)(x, ws)) * cot)
    tangents = (jnp.cos(x), jnp.sin(ws))  # the jvp's tangents are pair calls
    for fn in (kernels.depthwise_conv, kernels.depthwise_conv_edges):
      for a, b in zip(jax.grad(loss(fn), (0, 1))(x, ws),
                      jax.grad(loss(depthwise.grouped), (0, 1))(x, ws)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
      hvp = lambda f: jax.jvp(jax.grad(loss(f), (0, 1)), (x, ws), tangents)[1]
      for a, b in zip(hvp(fn), hvp(depthwise.grouped)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("channels", [5, 16])
@pytest.mark.parametrize("stride, pad, dilation, shared", [(1, 1, 1, False), (2, 2, 2, False),
                                                           (1, 2, 2, True), (2, 1, 1, True)])
def test_cpu_depthwise_call_sums_its_operand_pairs(channels, stride, pad, dilation, shared):
  """Each depthwise call takes 1 to 4 operand pairs and writes the sum of its bilinear
  map over them in one pass (the product rule's tangent f(a', b) + f(a, b') is one
  call): each kind against the same sum of XLA grouped convolutions and their VJPs."""
  assert kernels.available(), kernels.why_unavailable()
  keys = iter(jax.random.split(jax.random.PRNGKey(channels + 10 * stride), 20))
  normal = lambda shape: jax.random.normal(next(keys), shape, jnp.float64)
  edges = (3,) if shared else ()
  x_shape, k_shape = (2, 7, 6, channels), (*edges, 3, 3, channels)
  conv = lambda x, k: (jax.vmap(lambda w: depthwise.grouped(x, w, stride, pad, dilation))(k)
                       if shared else depthwise.grouped(x, k, stride, pad, dilation))
  y_shape = jax.eval_shape(conv, jnp.zeros(x_shape), jnp.zeros(k_shape)).shape
  xs, ks, gs = ([normal(shape) for _ in range(4)] for shape in (x_shape, k_shape, y_shape))
  geometry = lambda shape: kernels._Geometry(stride, pad, dilation, shape, shared)
  interleave = lambda a, b: [v for pair in zip(a, b) for v in pair]
  for terms in range(1, 5):
    pairs = list(zip(xs, ks, gs))[:terms]
    want_y = sum(conv(x, k) for x, k, _ in pairs)
    want_dx = sum(jax.vjp(lambda x: conv(x, k), x)[1](g)[0] for x, k, g in pairs)
    want_dk = sum(jax.vjp(lambda k: conv(x, k), k)[1](g)[0] for x, k, g in pairs)
    got_y = kernels._forward(geometry(None), *interleave(xs[:terms], ks[:terms]))
    got_dx = kernels._input_grad(geometry(x_shape), *interleave(gs[:terms], ks[:terms]))
    got_dk = kernels._kernel_grad(geometry(k_shape), *interleave(xs[:terms], gs[:terms]))
    for got, want in ((got_y, want_y), (got_dx, want_dx), (got_dk, want_dk)):
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  # The C++ side checks what it is given: at most four pairs, all alike.
  attributes = dict(stride=stride, pad=pad, dilation=dilation, shared=int(shared))
  with pytest.raises(Exception, match="1 to 4 pairs of operands"):
    kernels._ffi("forward", y_shape, jnp.float64, *interleave(xs + xs[:1], ks + ks[:1]),
                     **attributes)
  with pytest.raises(Exception, match="every pair of operands has the first pair's shapes"):
    kernels._ffi("forward", y_shape, jnp.float64, xs[0], ks[0], xs[1][:1], ks[1],
                     **attributes)


@pytest.mark.usefixtures("x64")
def test_cpu_depthwise_third_and_fourth_order_products():
  """A jvp of a pair call is a call on four pairs, and a jvp of that (eight pairs) is
  split into calls of at most four: derivatives of any order stay exact."""
  assert kernels.available(), kernels.why_unavailable()
  keys = iter(jax.random.split(jax.random.PRNGKey(7), 9))
  normal = lambda shape: jax.random.normal(next(keys), shape, jnp.float64)
  x, k = normal((2, 6, 5, 4)), normal((3, 3, 4))
  cot = normal((2, 6, 5, 4))
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k, 1, 1, 1)) * cot)
  t1, t2, t3 = ((normal(x.shape), normal(k.shape)) for _ in range(3))
  second = lambda f: lambda x, k: jax.jvp(jax.grad(loss(f), (0, 1)), (x, k), t1)[1]
  third = lambda f: lambda x, k: jax.jvp(second(f), (x, k), t2)[1]
  fourth = lambda f: jax.jvp(third(f), (x, k), t3)[1]
  for order in (lambda f: third(f)(x, k), fourth):
    for a, b in zip(jax.tree.leaves(order(kernels.depthwise_conv)),
                    jax.tree.leaves(order(depthwise.grouped))):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("stride, size", [(1, 7), (2, 7), (2, 8)])
def test_cpu_max_pool_equals_reduce_window_and_breaks_ties_like_pytorch(stride, size):
  assert kernels.available(), kernels.why_unavailable()
  ref_pool = lambda x: nn.max_pool(x, (3, 3), (stride, stride), padding=((1, 1), (1, 1)))
  ours = lambda x: kernels.max_pool(x, 3, stride, 1)
  kx, kc, kt = jax.random.split(jax.random.PRNGKey(size + stride), 3)
  x = jax.random.normal(kx, (2, size, size + 1, 3), jnp.float64)  # no ties
  np.testing.assert_array_equal(ours(x), ref_pool(x))
  np.testing.assert_array_equal(ours(x.astype(jnp.float32)), ref_pool(x.astype(jnp.float32)))
  np.testing.assert_array_equal(jax.vmap(ours)(jnp.stack([x, -x])),
                                jax.vmap(ref_pool)(jnp.stack([x, -x])))
  cot = jax.random.normal(kc, ref_pool(x).shape, jnp.float64)
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x)) * cot)
  np.testing.assert_allclose(jax.grad(loss(ours))(x), jax.grad(loss(ref_pool))(x),
                             rtol=1e-13, atol=1e-15)
  t = jax.random.normal(kt, x.shape, jnp.float64)
  np.testing.assert_allclose(jax.jvp(jax.grad(loss(ours)), (x,), (t,))[1],
                             jax.jvp(jax.grad(loss(ref_pool)), (x,), (t,))[1],
                             rtol=1e-12, atol=1e-15)
  # Ties: each window's gradient goes to its first maximal input in row-major
  # order (PyTorch's rule), counted here by a loop over windows.
  xt = np.asarray(jax.random.randint(kx, (1, size, size, 2), 0, 3), np.float64)
  g = np.asarray(jax.random.normal(kc, ref_pool(xt).shape, jnp.float64))
  want = np.zeros_like(xt)
  for oh in range(g.shape[1]):
    for ow in range(g.shape[2]):
      for c in range(2):
        window = [(h, w) for h in range(oh * stride - 1, oh * stride + 2)
                  for w in range(ow * stride - 1, ow * stride + 2) if 0 <= h < size and 0 <= w < size]
        h, w = max(window, key=lambda hw: (xt[0, hw[0], hw[1], c], -window.index(hw)))
        want[0, h, w, c] += g[0, oh, ow, c]
  got = jax.vjp(ours, jnp.asarray(xt))[1](jnp.asarray(g))[0]
  np.testing.assert_allclose(got, want, rtol=1e-14)


def test_kernel_gradient_is_the_same_bits_every_call():
  """The C++ kernel gradient sums each kernel's images in a fixed order, whatever the threads do."""
  assert kernels.available(), kernels.why_unavailable()
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 12, 12, 16))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16))
  loss = lambda w: jax.numpy.sum(jax.numpy.sin(kernels.depthwise_conv(x, w, 1, 1, 1)))
  grad = jax.jit(jax.grad(loss))
  first = np.asarray(grad(w))
  assert all(np.array_equal(first, np.asarray(grad(w))) for _ in range(20))
  np.testing.assert_allclose(first, jax.grad(lambda w: jax.numpy.sum(jax.numpy.sin(
      depthwise.grouped(x, w, 1, 1, 1))))(w), rtol=2e-4, atol=2e-4)


@pytest.mark.usefixtures("x64")
def test_edge_group_kernel_under_remat_equals_grouped_conv_to_second_order():
  """An edge group (4 edges sharing their input, nn.vmap; max pooling, sep_conv, dil_conv)
  inside nn.remat, as a rematerialized supernet cell runs it: gradients and a
  forward-over-reverse product through the C++ kernels equal those through XLA's."""
  from amended_darts_jax import initializers, supernet

  assert kernels.available(), kernels.why_unavailable()
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 6, 4), jnp.float64)
  ops = ("max_pool_3x3", "sep_conv_3x3", "dil_conv_3x3")
  w_EO = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (4, len(ops)), jnp.float64))
  models = {impl: nn.remat(supernet.EdgeGroup)(ops, 4, 1, True, "softplus", impl,
                                              in_edge_group=True)
            for impl in ("conv", "kernel")}
  variables = initializers.init_variables(models["conv"], 0, x, w_EO, 0.0)
  params = jax.tree.map(lambda p: p.astype(jnp.float64), variables["params"])
  tangent = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape),
                         params)

  def products(model):
    def loss(p):
      y, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, w_EO,
                         0.0, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y))
    grad = jax.grad(loss)
    return jax.jit(lambda p, t: (grad(p), jax.jvp(grad, (p,), (t,))[1]))(params, tangent)

  got, ref = products(models["kernel"]), products(models["conv"])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  assert float(jnp.abs(jax.tree.leaves(got[1])[0]).max()) > 0
