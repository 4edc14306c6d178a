"""Operations, the supernet and its alpha gradients."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from amended_darts_jax import cpu_kernels, ops, spaces, supernet
from amended_darts_jax import hypergrad as hg
from amended_darts_jax.errors import ConfigError


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl", ["kernel", "shift", "dense"])
@pytest.mark.parametrize("k, stride, dilation", [(3, 1, 1), (3, 2, 1), (5, 1, 1), (5, 2, 1),
                                                 (3, 1, 2), (5, 2, 2)])
def test_cpu_depthwise_equals_grouped_conv_values_and_gradients(impl, k, stride, dilation):
  pad = dilation * (k - 1) // 2
  kx, kk, kc = jax.random.split(jax.random.PRNGKey(k * 10 + stride), 3)
  x = jax.random.normal(kx, (2, 9, 8, 5), jnp.float64)
  kernel = jax.random.normal(kk, (k, k, 5), jnp.float64)
  fn = {"shift": ops.depthwise_conv_shift, "dense": ops.depthwise_conv_dense,
        "kernel": cpu_kernels.depthwise_conv}[impl]
  if impl == "kernel":  # the C++ kernel must build wherever the tests run on CPU
    assert cpu_kernels.available(), cpu_kernels.why_unavailable()
  ref = ops.depthwise_conv_grouped(x, kernel, stride, pad, dilation)
  got = fn(x, kernel, stride, pad, dilation)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
  cot = jax.random.normal(kc, ref.shape, jnp.float64)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, stride, pad, dilation)) * cot)
  g_ref = jax.grad(loss(ops.depthwise_conv_grouped), (0, 1))(x, kernel)
  g_got = jax.grad(loss(fn), (0, 1))(x, kernel)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
  # Forward-over-reverse, as the exact amended products take it (the shifted sum's
  # VJP is hand-written, so its own derivative is checked here).
  tangents = (jax.random.normal(kx, x.shape, jnp.float64),
              jax.random.normal(kk, kernel.shape, jnp.float64))
  h_ref = jax.jvp(jax.grad(loss(ops.depthwise_conv_grouped), (0, 1)), (x, kernel), tangents)[1]
  h_got = jax.jvp(jax.grad(loss(fn), (0, 1)), (x, kernel), tangents)[1]
  for a, b in zip(h_got, h_ref):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
  # Under a vmap over edges, input and kernel both batched (edge groups).
  edges = lambda f: lambda xs, ws: jnp.sum(jnp.sin(jax.vmap(
      lambda x, w: f(x, w, stride, pad, dilation))(xs, ws)))
  xs, ws = jnp.stack([x, 2 * x]), jnp.stack([kernel, -kernel])
  for a, b in zip(jax.grad(edges(fn), (0, 1))(xs, ws),
                  jax.grad(edges(ops.depthwise_conv_grouped), (0, 1))(xs, ws)):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
  # ... and with the input shared by all edges (only the kernels batched).
  shared = lambda f: lambda x, ws: jnp.sum(jnp.sin(jax.vmap(
      lambda w: f(x, w, stride, pad, dilation))(ws)))
  for a, b in zip(jax.grad(shared(fn), (0, 1))(x, ws),
                  jax.grad(shared(ops.depthwise_conv_grouped), (0, 1))(x, ws)):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
  if impl != "kernel":
    return
  # The edge groups' form of the kernel: all edges in one call, the input gradient
  # summed inside it; values, gradients and forward-over-reverse under the shared
  # vmap, and the fallback to plain calls when the input is batched too.
  edge = cpu_kernels.depthwise_conv_edges
  np.testing.assert_allclose(
      jax.vmap(lambda w: edge(x, w, stride, pad, dilation))(ws),
      jax.vmap(lambda w: ops.depthwise_conv_grouped(x, w, stride, pad, dilation))(ws),
      rtol=1e-12, atol=1e-12)
  hvp = lambda f: jax.jvp(jax.grad(shared(f), (0, 1)), (x, ws), (tangents[0], 3 * ws))
  for a, b in zip(jax.tree.leaves(hvp(edge)), jax.tree.leaves(hvp(ops.depthwise_conv_grouped))):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
  for a, b in zip(jax.grad(edges(edge), (0, 1))(xs, ws),
                  jax.grad(edges(ops.depthwise_conv_grouped), (0, 1))(xs, ws)):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
  # Under an outer vmap as well (the kernels' leading batch axis B).
  nested = lambda f: lambda xs, wss: jnp.sum(jnp.sin(jax.vmap(lambda x, ws: jax.vmap(
      lambda w: f(x, w, stride, pad, dilation))(ws))(xs, wss)) * jnp.arange(1, 3).reshape(2, 1, 1, 1, 1, 1))
  wss = jnp.stack([ws, 2 * ws])
  for a, b in zip(jax.grad(nested(edge), (0, 1))(xs, wss),
                  jax.grad(nested(ops.depthwise_conv_grouped), (0, 1))(xs, wss)):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


def test_depthwise_impl_resolution(monkeypatch):
  assert ops.resolve_depthwise_impl("conv", 3) == "conv"
  if jax.default_backend() == "cpu":
    assert cpu_kernels.available(), cpu_kernels.why_unavailable()
    monkeypatch.setattr(jax, "device_count", lambda: 1)  # the tests have eight
    assert ops.resolve_depthwise_impl("auto", 3, 16) == "kernel"
    assert ops.resolve_depthwise_impl("auto", 5, 256, dtype=jnp.float64) == "kernel"
    # float16 has no C++ kernel: the pure-JAX rule below.
    assert ops.resolve_depthwise_impl("auto", 3, 16, dtype=jnp.float16) == "dense"
    with pytest.raises(ConfigError, match="takes float32 or float64, not float16"):
      ops.resolve_depthwise_impl("kernel", 3, 16, dtype=jnp.float16)
    # Several devices: XLA would gather the sharded batch for a custom call.
    with monkeypatch.context() as m:
      m.setattr(jax, "device_count", lambda: 2)
      assert ops.resolve_depthwise_impl("auto", 3, 64) == "shift"
    # Without the kernel, "auto" picks among the pure-JAX forms.
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert ops.resolve_depthwise_impl("auto", 3, 16) == "dense"
    assert ops.resolve_depthwise_impl("auto", 5, ops.DENSE_MAX_CHANNELS) == "dense"
    assert ops.resolve_depthwise_impl("auto", 5, ops.DENSE_MAX_CHANNELS + 1) == "shift"
    # Batched kernels over a batched input: the dense form would become a grouped conv.
    assert ops.resolve_depthwise_impl("auto", 3, 16, shared_input=False) == "shift"
    # A kernel whose extent reaches the map's side: the dense form leaves XLA:CPU's
    # fast path, so the shifted sum.
    assert ops.resolve_depthwise_impl("auto", 5, 16, size=8) == "dense"
    assert ops.resolve_depthwise_impl("auto", 5, 16, size=5) == "shift"
    assert ops.resolve_depthwise_impl("auto", 5, 16, dilation=2, size=8) == "shift"
    assert ops.resolve_depthwise_impl("auto", 3, 16, dilation=2, size=8) == "dense"
  with pytest.raises(ValueError, match="depthwise_impl must be one of"):
    ops.resolve_depthwise_impl("winograd", 3)


def test_cpu_kernel_that_cannot_build_leaves_auto_on_pure_jax(monkeypatch, tmp_path, caplog):
  # A fresh attempt with a "compiler" that fails and an empty cache directory.
  monkeypatch.setattr(cpu_kernels, "_state", {})
  monkeypatch.setenv("CXX", "false")
  monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))
  assert not cpu_kernels.available()
  assert "failed" in cpu_kernels.why_unavailable()
  assert "the C++ depthwise kernel is not available" in caplog.text
  assert list(tmp_path.iterdir()) == []  # no half-written library left behind
  if jax.default_backend() == "cpu":
    assert ops.resolve_depthwise_impl("auto", 3, 64) == "shift"
    with pytest.raises(ConfigError, match="depthwise_impl='kernel' could not be built: .*false"):
      ops.resolve_depthwise_impl("kernel", 3, 64)
  # The switch turns it off without trying to build.
  monkeypatch.setattr(cpu_kernels, "_state", {})
  monkeypatch.setenv(cpu_kernels.SWITCH_ENV, "0")
  assert not cpu_kernels.available()
  assert cpu_kernels.why_unavailable() == "turned off by AMENDED_DARTS_CPU_KERNEL=0"


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("channels", [16, 32, 64])
def test_cpu_depthwise_at_16_32_and_64_channels(channels):
  """cpu_kernels.cc has its own loops for 16, 32 and 64 channels (a fixed length, and
  register accumulators for the forward pass and the stride-1 input gradient)."""
  assert cpu_kernels.available(), cpu_kernels.why_unavailable()
  kx, kk, kc = jax.random.split(jax.random.PRNGKey(channels), 3)
  x = jax.random.normal(kx, (2, 6, 5, channels), jnp.float64)
  ws = jax.random.normal(kk, (3, 3, 3, channels), jnp.float64)  # three edges
  ws5 = jax.random.normal(kk, (3, 5, 5, channels), jnp.float64)
  for stride, pad, dilation, ws in ((1, 1, 1, ws), (2, 1, 1, ws), (1, 2, 2, ws), (1, 2, 1, ws5),
                                    (2, 4, 2, ws5)):
    edges = lambda f: lambda x, ws: jax.vmap(lambda w: f(x, w, stride, pad, dilation))(ws)
    out = jax.eval_shape(edges(ops.depthwise_conv_grouped), x, ws)
    cot = jax.random.normal(kc, out.shape, jnp.float64)
    loss = lambda f: lambda x, ws: jnp.sum(jnp.sin(edges(f)(x, ws)) * cot)
    tangents = (jnp.cos(x), jnp.sin(ws))  # the jvp's tangents are pair calls
    for fn in (cpu_kernels.depthwise_conv, cpu_kernels.depthwise_conv_edges):
      for a, b in zip(jax.grad(loss(fn), (0, 1))(x, ws),
                      jax.grad(loss(ops.depthwise_conv_grouped), (0, 1))(x, ws)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
      hvp = lambda f: jax.jvp(jax.grad(loss(f), (0, 1)), (x, ws), tangents)[1]
      for a, b in zip(hvp(fn), hvp(ops.depthwise_conv_grouped)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("channels", [5, 16])
@pytest.mark.parametrize("stride, pad, dilation, shared", [(1, 1, 1, False), (2, 2, 2, False),
                                                           (1, 2, 2, True), (2, 1, 1, True)])
def test_cpu_depthwise_call_sums_its_operand_pairs(channels, stride, pad, dilation, shared):
  """Each depthwise call takes 1 to 4 operand pairs and writes the sum of its bilinear
  map over them in one pass (the product rule's tangent f(a', b) + f(a, b') is one
  call): each kind against the same sum of XLA grouped convolutions and their VJPs."""
  assert cpu_kernels.available(), cpu_kernels.why_unavailable()
  keys = iter(jax.random.split(jax.random.PRNGKey(channels + 10 * stride), 20))
  normal = lambda shape: jax.random.normal(next(keys), shape, jnp.float64)
  edges = (3,) if shared else ()
  x_shape, k_shape = (2, 7, 6, channels), (*edges, 3, 3, channels)
  conv = lambda x, k: (jax.vmap(lambda w: ops.depthwise_conv_grouped(x, w, stride, pad, dilation))(k)
                       if shared else ops.depthwise_conv_grouped(x, k, stride, pad, dilation))
  y_shape = jax.eval_shape(conv, jnp.zeros(x_shape), jnp.zeros(k_shape)).shape
  xs, ks, gs = ([normal(shape) for _ in range(4)] for shape in (x_shape, k_shape, y_shape))
  geometry = lambda shape: cpu_kernels._Geometry(stride, pad, dilation, shape, shared)
  interleave = lambda a, b: [v for pair in zip(a, b) for v in pair]
  for terms in range(1, 5):
    pairs = list(zip(xs, ks, gs))[:terms]
    want_y = sum(conv(x, k) for x, k, _ in pairs)
    want_dx = sum(jax.vjp(lambda x: conv(x, k), x)[1](g)[0] for x, k, g in pairs)
    want_dk = sum(jax.vjp(lambda k: conv(x, k), k)[1](g)[0] for x, k, g in pairs)
    got_y = cpu_kernels._forward(geometry(None), *interleave(xs[:terms], ks[:terms]))
    got_dx = cpu_kernels._input_grad(geometry(x_shape), *interleave(gs[:terms], ks[:terms]))
    got_dk = cpu_kernels._kernel_grad(geometry(k_shape), *interleave(xs[:terms], gs[:terms]))
    for got, want in ((got_y, want_y), (got_dx, want_dx), (got_dk, want_dk)):
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  # The C++ side checks what it is given: at most four pairs, all alike.
  attributes = dict(stride=stride, pad=pad, dilation=dilation, shared=int(shared))
  with pytest.raises(Exception, match="1 to 4 pairs of operands"):
    cpu_kernels._ffi("forward", y_shape, jnp.float64, *interleave(xs + xs[:1], ks + ks[:1]),
                     **attributes)
  with pytest.raises(Exception, match="every pair of operands has the first pair's shapes"):
    cpu_kernels._ffi("forward", y_shape, jnp.float64, xs[0], ks[0], xs[1][:1], ks[1],
                     **attributes)


@pytest.mark.usefixtures("x64")
def test_cpu_depthwise_third_and_fourth_order_products():
  """A jvp of a pair call is a call on four pairs, and a jvp of that (eight pairs) is
  split into calls of at most four: derivatives of any order stay exact."""
  assert cpu_kernels.available(), cpu_kernels.why_unavailable()
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
    for a, b in zip(jax.tree.leaves(order(cpu_kernels.depthwise_conv)),
                    jax.tree.leaves(order(ops.depthwise_conv_grouped))):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("stride, size", [(1, 7), (2, 7), (2, 8)])
def test_cpu_max_pool_equals_reduce_window_and_breaks_ties_like_pytorch(stride, size):
  assert cpu_kernels.available(), cpu_kernels.why_unavailable()
  ref_pool = lambda x: nn.max_pool(x, (3, 3), (stride, stride), padding=((1, 1), (1, 1)))
  ours = lambda x: cpu_kernels.max_pool(x, 3, stride, 1)
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


@pytest.mark.usefixtures("x64")
def test_supernet_through_the_cpu_kernel_equals_grouped_conv_to_second_order():
  """darts space, one (reduction) cell, float64: the alpha and weight gradients and the amended
  term g2' = -eta M H v (forward-over-reverse through edge groups' vmaps) are the
  same with the C++ kernel as with XLA's grouped convolution."""
  assert cpu_kernels.available(), cpu_kernels.why_unavailable()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1), jnp.float64)
  batch = {"image": x, "label": jnp.array([0, 1, 2, 1])}

  def products(impl, remat=False):
    model = supernet.Supernet("darts", C=2, layers=1, num_classes=3, depthwise_impl=impl,
                              remat=remat)
    alpha = jax.tree.map(lambda a: a.astype(jnp.float64),
                         model.init_alpha(jax.random.PRNGKey(1)))
    variables = ops.init_variables(model, 2, x, alpha, train=False)
    stats = variables["batch_stats"]

    def loss(params, alpha, b):
      logits, _ = model.apply({"params": params, "batch_stats": stats}, b["image"], alpha,
                              train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()

    params = jax.tree.map(lambda p: p.astype(jnp.float64), variables["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    v = jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape, l.dtype)
                                     for k, l in zip(keys, leaves)])
    grads = jax.jit(jax.grad(loss, (0, 1)))(params, alpha, batch)
    g2p = jax.jit(lambda p, a, b, v: hg.amended_term(loss, p, a, b, v, eta=0.1))(
        params, alpha, batch, v)
    return grads, g2p

  ref = products("conv")
  # The edge groups' shared-input kernel call sits under nn.vmap, inside
  # jax.checkpoint as well when cells are rematerialized.
  for got in (products("kernel"), products("kernel", remat=True)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      assert a.dtype == jnp.float64
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  assert float(hg.tree_norm(got[1])) > 1e-6  # the amended term is not trivially zero


@pytest.mark.parametrize("stride", [1, 2])
def test_every_operation_gets_a_nonzero_alpha_gradient(stride):
  op_names = spaces.PRIMITIVES
  model = functools.partial(supernet.MixedOp, op_names, 4, stride, depthwise_impl="conv")
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 4))
  w = jnp.full((len(op_names),), 1.0 / len(op_names))
  variables = ops.init_variables(model(train=False), 1, x, w)

  def loss(alpha):
    y, _ = model(train=True).apply(variables, x, jax.nn.softmax(alpha), mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y))

  grad = jax.jit(jax.grad(loss))(jnp.zeros(len(op_names)))
  assert np.all(np.abs(np.asarray(grad)) > 1e-6), dict(zip(op_names, np.asarray(grad)))
  y = model(train=False).apply(variables, x, w)
  assert y.shape == (3, 8 // stride, 8 // stride, 4)


@pytest.mark.parametrize("space", ["darts", "s1", "s2"])
@pytest.mark.parametrize("C, layers, size", [(4, 3, 8), (6, 5, 16)])
def test_supernet_output_shapes(space, C, layers, size):
  model = supernet.Supernet(space, C=C, layers=layers, num_classes=7)
  x = jnp.zeros((2, size, size, 3))
  alpha = model.init_alpha(jax.random.PRNGKey(0))
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.PRNGKey(1), x, alpha)
  logits, updates = jax.eval_shape(
      lambda v: model.apply(v, x, alpha, train=True, mutable=["batch_stats"]), variables)
  assert logits.shape == (2, 7)
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])
  # Channels double at each reduction cell: the last cell outputs 4 nodes x 4C.
  assert variables["params"]["classifier"]["kernel"].shape == (4 * 4 * C, 7)
  # Every op of the space has statistics on every edge of cell 0: one group per
  # source state, stacked along the group's edges.
  sp = spaces.get_space(space)
  cell0 = variables["batch_stats"]["cell0"]
  groups = {k: v for k, v in cell0.items() if k.startswith(ops.STACKED_PREFIX)}
  for src in range(sp.steps + 2):
    n_edges = sum(1 for s, _ in sp.edges if s == src)
    name = f"{ops.STACKED_PREFIX}from{src}"
    assert (name in groups) == (n_edges > 0), name
    if n_edges:
      assert set(groups[name]) == {op for op in sp.ops if op not in ("none", "skip_connect")}
      assert {a.shape[0] for a in jax.tree.leaves(groups[name])} == {n_edges}


def test_supernet_alpha_gradient_reaches_every_edge_and_op():
  """darts space, 3 cells (normal, reduce, reduce): dL/dalpha is non-zero everywhere."""
  model = supernet.Supernet("darts", C=2, layers=3, num_classes=3, depthwise_impl="conv")
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  y = jnp.array([0, 1, 2, 1])
  alpha = model.init_alpha(jax.random.PRNGKey(1))
  variables = ops.init_variables(model, 2, x, alpha, train=False)

  @jax.jit
  def alpha_grad(alpha):
    def loss(a):
      logits, _ = model.apply(variables, x, a, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jax.grad(loss)(alpha)

  grad = alpha_grad(alpha)
  for name in ("normal", "reduce"):
    g = np.abs(np.asarray(grad[name]))
    assert g.shape == (14, 8)
    assert np.all(g > 0), (name, np.argwhere(g == 0))


def test_alpha_is_an_input_not_a_parameter():
  model = supernet.Supernet("s2", C=2, layers=3, num_classes=3)
  x = jnp.zeros((2, 8, 8, 1))
  alpha = model.init_alpha(jax.random.PRNGKey(0))
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.PRNGKey(1), x, alpha)
  assert set(variables) == {"params", "batch_stats"}
  assert alpha["cells"].shape == (3, 8, 2)
  assert not any("alpha" in jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(variables["params"])[0])
  # Changing alpha changes the output without touching the variables.
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 1))
  variables = ops.init_variables(model, 1, x, alpha, train=False)
  other = {"cells": alpha["cells"].at[:, :, 1].add(3.0)}
  assert not np.allclose(model.apply(variables, x, alpha, train=False),
                         model.apply(variables, x, other, train=False))


def test_parameter_count_matches_darts_search_network():
  """DARTS' model_search.Network(C=16, layers=8) has 1,930,618 parameters (its logs)."""
  model = supernet.Supernet("darts", C=16, layers=8, num_classes=10)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                             x, model.init_alpha(jax.random.PRNGKey(1)))
  assert sum(a.size for a in jax.tree.leaves(variables["params"])) == 1_930_618


def test_smooth_activation_option_changes_the_function():
  kw = dict(space_name="s2", C=2, layers=3, num_classes=3, depthwise_impl="conv")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  relu_net, soft_net = supernet.Supernet(**kw), supernet.Supernet(**kw, act="softplus")
  alpha = relu_net.init_alpha(jax.random.PRNGKey(1))
  variables = ops.init_variables(relu_net, 2, x, alpha, train=False)
  a = relu_net.apply(variables, x, alpha, train=False)
  b = soft_net.apply(variables, x, alpha, train=False)
  assert not np.allclose(a, b)
  with pytest.raises(ValueError, match="unknown activation"):
    supernet.Supernet(**{**kw, "act": "swishy"}).init(jax.random.PRNGKey(2), x, alpha, train=False)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("reduction, reduction_prev", [(False, True), (True, False)])
def test_edge_groups_equal_one_mixed_op_per_edge(reduction, reduction_prev):
  """The vmapped edge groups compute eq. 1 edge by edge: outputs, statistics, gradients.

  One cell over all 14 DARTS edges with one op of each kind (`none`, a pool,
  `skip_connect`, which is a FactorizedReduce on a strided edge, and a sep_conv,
  whose second depthwise convolution sees per-edge inputs and takes the
  shifted sum on CPU). Reference: the same cell with one MixedOp per edge
  (`batch_edges=False`), each edge's variables sliced out of the stacked ones.
  """
  space = spaces.SearchSpace("test", ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"),
                             spaces.get_space("darts").edges, per_cell=False, discretize="top2",
                             default_layers=3)
  cell = functools.partial(supernet.SearchCell, space, 4, reduction, reduction_prev, True,
                           "softplus")
  grouped, per_edge = cell(batch_edges=True), cell(batch_edges=False)
  k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
  s0 = jax.random.normal(k0, (3, 8 if reduction_prev else 4, 8 if reduction_prev else 4, 6),
                         jnp.float64)
  s1 = jax.random.normal(k1, (3, 4, 4, 5), jnp.float64)
  w_ExO = jax.nn.softmax(jax.random.normal(k2, (space.num_edges, space.num_ops), jnp.float64))
  variables = jax.tree.map(lambda a: a.astype(jnp.float64),
                           ops.init_variables(grouped, 0, s0, s1, w_ExO))

  def unstack(tree):  # {"stacked_from<src>": leaves E x ...} -> {"edge<e>": leaves ...}
    out = {}
    for name, sub in tree.items():
      if not name.startswith(ops.STACKED_PREFIX):
        out[name] = unstack(sub) if isinstance(sub, dict) else sub
        continue
      src = int(name.removeprefix(ops.STACKED_PREFIX + "from"))
      group = [e for e, (s, _) in enumerate(space.edges) if s == src]
      for k, e in enumerate(group):
        out[f"edge{e}"] = jax.tree.map(lambda a, k=k: a[k], sub)
    return out

  ref_vars = unstack(variables)
  assert jax.tree.structure(ref_vars) == jax.tree.structure(
      jax.eval_shape(per_edge.init, jax.random.PRNGKey(0), s0, s1, w_ExO))

  def outputs(model, v, p, w, s1):
    out, upd = model.apply({**v, "params": p}, s0, s1, w, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(out)), (out, upd)

  got = jax.value_and_grad(functools.partial(outputs, grouped, variables), (0, 1, 2),
                           has_aux=True)(variables["params"], w_ExO, s1)
  ref = jax.value_and_grad(functools.partial(outputs, per_edge, ref_vars), (0, 1, 2),
                           has_aux=True)(ref_vars["params"], w_ExO, s1)
  (_, (out_g, upd_g)), (gp_g, gw_g, gs_g) = got
  (_, (out_r, upd_r)), (gp_r, gw_r, gs_r) = ref
  assert out_g.shape == (3, 2 if reduction else 4, 2 if reduction else 4, 4 * 4)
  for a, b in ((out_g, out_r), (unstack(upd_g), upd_r), (unstack(gp_g), gp_r), (gw_g, gw_r),
               (gs_g, gs_r)):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
  assert float(jnp.min(jnp.abs(gw_r[:, 1:]))) > 0  # every op on every edge matters


def test_host_init_follows_the_declared_initializers():
  """ops.init_variables draws what module.init would: same tree, constants, bounds."""
  model = supernet.Supernet("s2", C=4, layers=3, num_classes=5)
  x = jnp.zeros((2, 8, 8, 3))
  alpha = model.init_alpha(jax.random.PRNGKey(0))
  host = ops.init_variables(model, 0, x, alpha, train=False)
  ref = model.init(jax.random.PRNGKey(0), x, alpha, train=False)
  assert jax.tree.structure(host) == jax.tree.structure(ref)
  flat_host = jax.tree_util.tree_flatten_with_path(host)[0]
  flat_ref = jax.tree.leaves(ref)
  for (path, h), r in zip(flat_host, flat_ref):
    name = jax.tree_util.keystr(path)
    assert h.shape == r.shape and h.dtype == r.dtype, name
    if np.all(np.asarray(r) == np.asarray(r).ravel()[0]):  # a constant: ones or zeros
      np.testing.assert_array_equal(h, r, err_msg=name)
    else:  # random: U(+-1/sqrt(fan_in)) in both; fan_in of a kernel, or of a bias's kernel
      kernel = h if name.endswith("['kernel']") else None
      if kernel is None:
        kernel_path = name.replace("['bias']", "['kernel']")
        kernel = next(x for p, x in flat_host if jax.tree_util.keystr(p) == kernel_path)
      shape = kernel.shape[1:] if ops.STACKED_PREFIX in name else kernel.shape
      fan_in = shape[0] * shape[1] if len(shape) == 3 else int(np.prod(shape[:-1]))
      bound = 1.0 / np.sqrt(fan_in)
      for values in (h, r):
        assert float(np.abs(values).max()) <= bound * (1 + 1e-6), name
        if values.size >= 200:
          assert float(np.abs(values).max()) > 0.9 * bound, name


@pytest.mark.parametrize("affine", [False, True])
def test_batch_norm_equals_flax_to_second_order(x64, affine):
  """ops.BatchNorm (one broadcast of the stacked per-channel values) against flax's
  nn.BatchNorm with the same settings, in float64: the variables' tree, the output and
  new statistics in train mode, the output in eval mode, the gradient in the input and
  the parameters, and a forward-over-reverse product of that gradient."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(1.5, 2.0, size=(3, 5, 4, 6)))
  ours = lambda train: ops.BatchNorm(use_running_average=not train, affine=affine)
  ref = lambda train: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                   use_scale=affine, use_bias=affine)
  v_ours, v_ref = ours(True).init(jax.random.PRNGKey(0), x), ref(True).init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_ref)
  variables = {"batch_stats": {"mean": jnp.asarray(rng.normal(size=6)),
                               "var": jnp.asarray(rng.uniform(0.5, 2.0, size=6))}}
  if affine:
    variables["params"] = {"scale": jnp.asarray(rng.normal(size=6)),
                           "bias": jnp.asarray(rng.normal(size=6))}
  y, new = ours(True).apply(variables, x, mutable=["batch_stats"])
  y_ref, new_ref = ref(True).apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
  chex.assert_trees_all_close(new, new_ref, rtol=1e-12)
  np.testing.assert_allclose(ours(False).apply(variables, x), ref(False).apply(variables, x),
                             rtol=1e-12, atol=1e-12)

  def loss(module):
    def f(x, params):
      v = {**variables, **({"params": params} if affine else {})}
      out, _ = module.apply(v, x, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(out) * jnp.arange(out.size).reshape(out.shape) / out.size)
    return f

  params = variables.get("params", {})
  g = jax.grad(loss(ours(True)), (0, 1))(x, params)
  g_ref = jax.grad(loss(ref(True)), (0, 1))(x, params)
  chex.assert_trees_all_close(g, g_ref, rtol=1e-10, atol=1e-12)
  t = (jnp.asarray(rng.normal(size=x.shape)), jax.tree.map(jnp.ones_like, params))
  hv = jax.jvp(lambda *a: jax.grad(loss(ours(True)), (0, 1))(*a), (x, params), t)[1]
  hv_ref = jax.jvp(lambda *a: jax.grad(loss(ref(True)), (0, 1))(*a), (x, params), t)[1]
  chex.assert_trees_all_close(hv, hv_ref, rtol=1e-9, atol=1e-11)
