"""cpu/depthwise.py's formulations and the C++ kernel against XLA's grouped convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amended_darts_jax.cpu import depthwise, kernels


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl", ["kernel", "shift", "dense"])
@pytest.mark.parametrize("k, stride, dilation", [(3, 1, 1), (3, 2, 1), (5, 1, 1), (5, 2, 1),
                                                 (3, 1, 2), (5, 2, 2)])
def test_cpu_depthwise_equals_grouped_conv_values_and_gradients(impl, k, stride, dilation):
  pad = dilation * (k - 1) // 2
  kx, kk, kc = jax.random.split(jax.random.PRNGKey(k * 10 + stride), 3)
  x = jax.random.normal(kx, (2, 9, 8, 5), jnp.float64)
  kernel = jax.random.normal(kk, (k, k, 5), jnp.float64)
  fn = {"shift": depthwise.shift, "dense": depthwise.dense,
        "kernel": kernels.depthwise_conv}[impl]
  if impl == "kernel":  # the C++ kernel must build wherever the tests run on CPU
    assert kernels.available(), kernels.why_unavailable()
  ref = depthwise.grouped(x, kernel, stride, pad, dilation)
  got = fn(x, kernel, stride, pad, dilation)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
  cot = jax.random.normal(kc, ref.shape, jnp.float64)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, stride, pad, dilation)) * cot)
  g_ref = jax.grad(loss(depthwise.grouped), (0, 1))(x, kernel)
  g_got = jax.grad(loss(fn), (0, 1))(x, kernel)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
  # Forward-over-reverse, as the exact amended products take it (the shifted sum's
  # VJP is hand-written, so its own derivative is checked here).
  tangents = (jax.random.normal(kx, x.shape, jnp.float64),
              jax.random.normal(kk, kernel.shape, jnp.float64))
  h_ref = jax.jvp(jax.grad(loss(depthwise.grouped), (0, 1)), (x, kernel), tangents)[1]
  h_got = jax.jvp(jax.grad(loss(fn), (0, 1)), (x, kernel), tangents)[1]
  for a, b in zip(h_got, h_ref):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
  # Under a vmap over edges, input and kernel both batched (edge groups).
  edges = lambda f: lambda xs, ws: jnp.sum(jnp.sin(jax.vmap(
      lambda x, w: f(x, w, stride, pad, dilation))(xs, ws)))
  xs, ws = jnp.stack([x, 2 * x]), jnp.stack([kernel, -kernel])
  for a, b in zip(jax.grad(edges(fn), (0, 1))(xs, ws),
                  jax.grad(edges(depthwise.grouped), (0, 1))(xs, ws)):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
  # ... and with the input shared by all edges (only the kernels batched).
  shared = lambda f: lambda x, ws: jnp.sum(jnp.sin(jax.vmap(
      lambda w: f(x, w, stride, pad, dilation))(ws)))
  for a, b in zip(jax.grad(shared(fn), (0, 1))(x, ws),
                  jax.grad(shared(depthwise.grouped), (0, 1))(x, ws)):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
  if impl != "kernel":
    return
  # The edge groups' form of the kernel: all edges in one call, the input gradient
  # summed inside it; values, gradients and forward-over-reverse under the shared
  # vmap, and the fallback to plain calls when the input is batched too.
  edge = kernels.depthwise_conv_edges
  np.testing.assert_allclose(
      jax.vmap(lambda w: edge(x, w, stride, pad, dilation))(ws),
      jax.vmap(lambda w: depthwise.grouped(x, w, stride, pad, dilation))(ws),
      rtol=1e-12, atol=1e-12)
  hvp = lambda f: jax.jvp(jax.grad(shared(f), (0, 1)), (x, ws), (tangents[0], 3 * ws))
  for a, b in zip(jax.tree.leaves(hvp(edge)), jax.tree.leaves(hvp(depthwise.grouped))):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
  for a, b in zip(jax.grad(edges(edge), (0, 1))(xs, ws),
                  jax.grad(edges(depthwise.grouped), (0, 1))(xs, ws)):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
  # Under an outer vmap as well (the kernels' leading batch axis B).
  nested = lambda f: lambda xs, wss: jnp.sum(jnp.sin(jax.vmap(lambda x, ws: jax.vmap(
      lambda w: f(x, w, stride, pad, dilation))(ws))(xs, wss)) * jnp.arange(1, 3).reshape(2, 1, 1, 1, 1, 1))
  wss = jnp.stack([ws, 2 * ws])
  for a, b in zip(jax.grad(nested(edge), (0, 1))(xs, wss),
                  jax.grad(nested(depthwise.grouped), (0, 1))(xs, wss)):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
