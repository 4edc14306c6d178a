"""Operations, the supernet and its alpha gradients."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from amended_darts_jax import initializers, networks, ops, spaces, supernet
from amended_darts_jax.cpu import kernels
from amended_darts_jax import hypergrad as hg


@pytest.mark.usefixtures("x64")
def test_supernet_through_the_cpu_kernel_equals_grouped_conv_to_second_order(monkeypatch):
  """The darts cell (one reduction cell, all 14 edges in edge groups) with operations
  the kernels compute (max pooling and a dilated depthwise convolution),
  float64: the alpha and weight gradients and the amended term g2' = -eta M H v
  (forward-over-reverse through edge groups' vmaps) are the same with the C++ kernel
  as with XLA's grouped convolution. (tests/test_cpu_kernels.py covers every kernel
  size, stride and dilation one operation at a time.)"""
  assert kernels.available(), kernels.why_unavailable()
  monkeypatch.setitem(spaces.SPACES, "kernel_ops", dataclasses.replace(
      spaces.get_space("darts"), name="kernel_ops",
      ops=("max_pool_3x3", "dil_conv_5x5")))
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1), jnp.float64)
  batch = {"image": x, "label": jnp.array([0, 1, 2, 1])}

  def products(impl):
    model = supernet.Supernet("kernel_ops", C=2, layers=1, num_classes=3, conv_pool_impl=impl)
    alpha = jax.tree.map(lambda a: a.astype(jnp.float64),
                         model.init_alpha(jax.random.PRNGKey(1)))
    variables = initializers.init_variables(model, 2, x, alpha, train=False)
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
    return jax.jit(lambda p, a, b, v: (jax.grad(loss, (0, 1))(p, a, b),
                                       hg.amended_term(loss, p, a, b, v, eta=0.1)))(
                                           params, alpha, batch, v)

  ref = products("conv")
  # The edge groups' shared-input kernel call sits under nn.vmap (and inside
  # jax.checkpoint as well when cells are rematerialized: tests/test_cpu_kernels.py).
  got = products("kernel")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert a.dtype == jnp.float64
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  assert float(hg.tree_norm(got[1])) > 1e-6  # the amended term is not trivially zero


@pytest.mark.parametrize("stride", [1, 2])
def test_every_operation_gets_a_nonzero_alpha_gradient(stride):
  op_names = spaces.PRIMITIVES
  model = functools.partial(supernet.MixedOp, op_names, 4, stride, conv_pool_impl="conv")
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 4))
  w = jnp.full((len(op_names),), 1.0 / len(op_names))
  variables = initializers.init_variables(model(train=False), 1, x, w)

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
  groups = {k: v for k, v in cell0.items() if k.startswith(initializers.STACKED_PREFIX)}
  for src in range(sp.steps + 2):
    n_edges = sum(1 for s, _ in sp.edges if s == src)
    name = f"{initializers.STACKED_PREFIX}from{src}"
    assert (name in groups) == (n_edges > 0), name
    if n_edges:
      assert set(groups[name]) == {op for op in sp.ops if op not in ("none", "skip_connect")}
      assert {a.shape[0] for a in jax.tree.leaves(groups[name])} == {n_edges}


def test_supernet_alpha_gradient_reaches_every_edge_and_op():
  """darts space, 3 cells (normal, reduce, reduce): dL/dalpha is non-zero everywhere."""
  model = supernet.Supernet("darts", C=2, layers=3, num_classes=3, conv_pool_impl="conv")
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  y = jnp.array([0, 1, 2, 1])
  alpha = model.init_alpha(jax.random.PRNGKey(1))
  variables = initializers.init_variables(model, 2, x, alpha, train=False)

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
  variables = initializers.init_variables(model, 1, x, alpha, train=False)
  other = {"cells": alpha["cells"].at[:, :, 1].add(3.0)}
  apply = jax.jit(lambda a: model.apply(variables, x, a, train=False))
  assert not np.allclose(apply(alpha), apply(other))


def test_parameter_count_matches_darts_search_network():
  """DARTS' model_search.Network(C=16, layers=8) has 1,930,618 parameters (its logs)."""
  model = supernet.Supernet("darts", C=16, layers=8, num_classes=10)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                             x, model.init_alpha(jax.random.PRNGKey(1)))
  assert sum(a.size for a in jax.tree.leaves(variables["params"])) == 1_930_618


def test_smooth_activation_option_changes_the_function():
  kw = dict(space_name="s2", C=2, layers=1, num_classes=3, conv_pool_impl="conv")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  relu_net, soft_net = supernet.Supernet(**kw), supernet.Supernet(**kw, act="softplus")
  alpha = relu_net.init_alpha(jax.random.PRNGKey(1))
  variables = initializers.init_variables(relu_net, 2, x, alpha, train=False)
  a = relu_net.apply(variables, x, alpha, train=False)
  b = soft_net.apply(variables, x, alpha, train=False)
  assert not np.allclose(a, b)
  with pytest.raises(ValueError, match="unknown activation"):
    supernet.Supernet(**{**kw, "act": "swishy"}).init(jax.random.PRNGKey(2), x, alpha, train=False)


@pytest.mark.usefixtures("x64")
def test_edge_groups_equal_one_mixed_op_per_edge():
  """The vmapped edge groups compute eq. 1 edge by edge: outputs, statistics, gradients.

  A reduction cell after a reduction cell (strided edges and the factorized reduce
  of c_{k-2} both), over all 14 DARTS edges with one op of each kind (`none`, a pool,
  `skip_connect`, which is a FactorizedReduce on a strided edge, and a sep_conv,
  whose second depthwise convolution sees per-edge inputs and takes the
  shifted sum on CPU). Reference: the same cell with one MixedOp per edge
  (`edge_groups=False`), each edge's variables sliced out of the stacked ones.
  """
  reduction = reduction_prev = True
  space = spaces.SearchSpace("test", ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"),
                             spaces.get_space("darts").edges, per_cell=False, discretize="top2",
                             default_layers=3)
  cell = functools.partial(supernet.SearchCell, space, 4, reduction, reduction_prev, True,
                           "softplus")
  grouped, per_edge = cell(edge_groups=True), cell(edge_groups=False)
  k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
  s0 = jax.random.normal(k0, (3, 8 if reduction_prev else 4, 8 if reduction_prev else 4, 6),
                         jnp.float64)
  s1 = jax.random.normal(k1, (3, 4, 4, 5), jnp.float64)
  w_ExO = jax.nn.softmax(jax.random.normal(k2, (space.num_edges, space.num_ops), jnp.float64))
  variables = jax.tree.map(lambda a: a.astype(jnp.float64),
                           initializers.init_variables(grouped, 0, s0, s1, w_ExO))

  def unstack(tree):  # {"stacked_from<src>": leaves E x ...} -> {"edge<e>": leaves ...}
    out = {}
    for name, sub in tree.items():
      if not name.startswith(initializers.STACKED_PREFIX):
        out[name] = unstack(sub) if isinstance(sub, dict) else sub
        continue
      src = int(name.removeprefix(initializers.STACKED_PREFIX + "from"))
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

  got = jax.jit(jax.value_and_grad(functools.partial(outputs, grouped, variables), (0, 1, 2),
                                   has_aux=True))(variables["params"], w_ExO, s1)
  ref = jax.jit(jax.value_and_grad(functools.partial(outputs, per_edge, ref_vars), (0, 1, 2),
                                   has_aux=True))(ref_vars["params"], w_ExO, s1)
  (_, (out_g, upd_g)), (gp_g, gw_g, gs_g) = got
  (_, (out_r, upd_r)), (gp_r, gw_r, gs_r) = ref
  assert out_g.shape == (3, 2 if reduction else 4, 2 if reduction else 4, 4 * 4)
  for a, b in ((out_g, out_r), (unstack(upd_g), upd_r), (unstack(gp_g), gp_r), (gw_g, gw_r),
               (gs_g, gs_r)):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
  assert float(jnp.min(jnp.abs(gw_r[:, 1:]))) > 0  # every op on every edge matters


def test_per_edge_operations_group_by_operation_set_and_equal_one_mixed_op_per_edge():
  """RobustDARTS' S1 reduction cell: edges leaving one state with different operation
  pairs form one group per pair, and the cell equals its one-MixedOp-per-edge form."""
  space = spaces.get_space("rdarts_s1")
  cell = functools.partial(supernet.SearchCell, space, 4, True, False, True, conv_pool_impl="conv")
  grouped, per_edge = cell(edge_groups=True), cell(edge_groups=False)
  k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
  s0, s1 = (jax.random.normal(k, (3, 8, 8, 5)) for k in (k0, k1))
  w_ExO = jax.nn.softmax(jax.random.normal(k2, (space.num_edges, space.num_ops)))
  variables = initializers.init_variables(grouped, 0, s0, s1, w_ExO)
  names = set(variables["batch_stats"])
  # From c_{k-2} edges 0, 2, 5, 9 all mix max/avg pools: one group. From c_{k-1} edges 1, 3,
  # 6, 10 mix max/dil3, max/avg, max/sep3, max/avg: three groups, the second of two edges.
  assert {n for n in names if "from0" in n} == {"stacked_from0"}
  assert {n for n in names if "from1" in n} == {f"stacked_from1_{k}" for k in range(3)}
  assert variables["batch_stats"]["stacked_from1_1"]["max_pool_3x3"]["BatchNorm_0"][
      "mean"].shape[0] == 2
  leaving = lambda src: [e for e, (s, _) in enumerate(space.edges) if s == src]

  def unstack(tree):
    out = {}
    for name, sub in tree.items():
      if not name.startswith(initializers.STACKED_PREFIX):
        out[name] = sub
        continue
      src, _, k = name.removeprefix(initializers.STACKED_PREFIX + "from").partition("_")
      sets = list(dict.fromkeys(space.ops_of(e, True) for e in leaving(int(src))))
      group = [e for e in leaving(int(src)) if space.ops_of(e, True) == sets[int(k or 0)]]
      for i, e in enumerate(group):
        out[f"edge{e}"] = jax.tree.map(lambda a, i=i: a[i], sub)
    return out

  ref = jax.tree.map(lambda a: a, {c: unstack(t) for c, t in variables.items()})
  run = lambda m, v: jax.jit(lambda v: m.apply(v, s0, s1, w_ExO, mutable=["batch_stats"])[0])(v)
  np.testing.assert_allclose(run(grouped, variables), run(per_edge, ref), rtol=1e-5, atol=1e-5)


def test_noise_operation_is_standard_normal_of_the_output_shape_whatever_the_input():
  op = ops.Op("noise", 4, 2)
  x = jnp.full((8, 16, 16, 4), 7.0)
  draw = jax.jit(lambda x, key: op.apply({}, x, False, rngs={"dropout": key}))
  y = np.asarray(draw(x, jax.random.PRNGKey(0)))
  assert y.shape == (8, 8, 8, 4)
  assert abs(y.mean()) < 0.1 and abs(y.std() - 1) < 0.06  # 2,048 draws: sds 0.022, 0.016
  np.testing.assert_array_equal(draw(-x, jax.random.PRNGKey(0)), y)
  assert not np.array_equal(draw(x, jax.random.PRNGKey(1)), y)


def test_cell_runs_are_the_normal_cells_whose_inputs_share_a_shape():
  """A run holds cells i >= 2 that neither reduce nor follow a reduction cell."""
  assert networks.cell_runs(20) == ((2, 5), (8, 12), (15, 19))
  assert networks.cell_runs(14) == ((2, 3), (6, 8), (11, 13))
  assert networks.cell_runs(8) == ()  # cells 4 and 7 stand alone: nothing to scan
  assert networks.cell_runs(3) == ()
  # Cells of different structure split a run.
  assert networks.cell_runs(20, lambda i, j: (i < 4) == (j < 4)) == (
      (2, 3), (4, 5), (8, 12), (15, 19))
  assert networks.cell_runs(20, lambda i, j: i == j) == ()


def _float64(tree):
  return jax.tree.map(lambda a: a.astype(jnp.float64), tree)


class _TwoCells(nn.Module):
  """Two normal s2 cells (C=2, softplus) as one scan or as two submodules."""
  scan: bool
  remat: bool = False

  @nn.compact
  def __call__(self, s0, s1, weights_NxExO):
    cls = nn.remat(supernet.SearchCell) if self.remat else supernet.SearchCell
    cell = lambda name: cls(spaces.get_space("s2"), 2, False, False, True, "softplus",
                            name=name)
    if self.scan:
      return networks.scan_cells(lambda a, b, w, rate: cell("cell")(a, b, w, rate), 0, 1, s0,
                                 s1, stacked=(weights_NxExO,), broadcast=(0.0,))
    for i in range(2):
      s0, s1 = s1, cell(f"cell{i}")(s0, s1, weights_NxExO[i], 0.0)
    return s0, s1


@pytest.mark.usefixtures("x64")
def test_a_scanned_run_of_cells_computes_the_cells_one_by_one_to_second_order():
  """Two s2 cells through the C++ kernels, float64: as one scan (rematerialized per
  cell inside it) and as two submodules, from the same weights (`unstack_cells`),
  they give the same outputs, batch statistics, weight gradient, gradient in the
  per-cell softmax weights, and amended term -eta M H v."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  s0, s1 = (jax.random.normal(k, (3, 4, 4, 8), jnp.float64) for k in keys[:2])
  weights = jax.nn.softmax(jax.random.normal(keys[2], (2, 8, 2), jnp.float64))
  scanned, plain, runs = _TwoCells(scan=True, remat=True), _TwoCells(scan=False), ((0, 1),)
  variables = _float64(networks.stack_cells(initializers.init_variables(plain, 1, s0, s1,
                                                                        weights), runs))
  assert variables["params"]["stacked_cells0to1"]["cell"]["pre0"]["Dense_0"]["kernel"].shape == (
      2, 8, 2)  # two cells, each a 1x1 convolution from 4 nodes x C to C channels
  v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)),
                   variables["params"])

  def quantities(model, variables, v):
    stats = variables["batch_stats"]

    def apply(params, weights, inputs):
      return model.apply({"params": params, "batch_stats": stats}, *inputs, weights,
                         mutable=["batch_stats"])

    def loss(params, weights, inputs):
      (a, b), _ = apply(params, weights, inputs)
      return jnp.sum(jnp.sin(a)) + jnp.sum(jnp.cos(b) * b)

    def run(params, weights, inputs, v):
      outputs, updates = apply(params, weights, inputs)
      g_w, g_weights = jax.grad(loss, (0, 1))(params, weights, inputs)
      return (outputs, {"batch_stats": updates["batch_stats"], "params": g_w}, g_weights,
              hg.amended_term(loss, params, weights, inputs, v, eta=0.1))
    return jax.jit(run)(variables["params"], weights, (s0, s1), v)

  got = quantities(scanned, variables, v)
  want = quantities(plain, networks.unstack_cells(variables, runs),
                    networks.unstack_cells({"params": v}, runs)["params"])
  got = (got[0], networks.unstack_cells(got[1], runs), got[2], got[3])
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
  assert float(hg.tree_norm(got[3])) > 1e-6  # the amended term is not trivially zero


@pytest.mark.usefixtures("x64")
def test_a_scanning_supernet_computes_the_unscanned_one(monkeypatch):
  """10 cells (8 and 9 scanned), alphas shared by all normal cells (the darts cell
  with skip_connect and avg_pool_3x3 on its 14 edges), float64: from the same draw,
  the scanned and the one-submodule-per-cell supernet give the same logits, batch
  statistics and alpha gradient."""
  monkeypatch.setitem(spaces.SPACES, "shared_light", dataclasses.replace(
      spaces.get_space("rdarts_s2"), name="shared_light", ops=("skip_connect", "avg_pool_3x3")))
  scanned = supernet.Supernet("shared_light", C=2, layers=10, num_classes=3, act="softplus",
                              scan_cells=True)
  plain = scanned.clone(scan_cells=False)
  assert scanned.cell_runs == ((8, 9),) and plain.cell_runs == ()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1), jnp.float64)
  labels = jnp.array([0, 1, 2, 1])
  alpha = _float64(scanned.init_alpha(jax.random.PRNGKey(1)))
  variables = _float64(networks.init_variables(scanned, 2, x, alpha, train=True))
  assert "stacked_cells8to9" in variables["params"] and "cell8" not in variables["params"]
  for a, b in zip(jax.tree.leaves(networks.unstack_cells(variables, scanned.cell_runs)),
                  jax.tree.leaves(_float64(networks.init_variables(plain, 2, x, alpha,
                                                                   train=True)))):
    np.testing.assert_array_equal(a, b)  # the same draw, restacked

  def quantities(model, variables):
    def loss(alpha):
      logits, updates = model.apply(variables, x, alpha, train=True, mutable=["batch_stats"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return ce, (logits, updates)
    (_, (logits, updates)), g_alpha = jax.value_and_grad(loss, has_aux=True)(alpha)
    return logits, updates, g_alpha

  got = jax.jit(functools.partial(quantities, scanned))(variables)
  want = jax.jit(functools.partial(quantities, plain))(
      networks.unstack_cells(variables, scanned.cell_runs))
  got = (got[0], networks.unstack_cells(got[1], scanned.cell_runs), got[2])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_init_variables_draws_stacked_kernels_within_their_own_fan_in():
  """A kernel under two stacked modules (a scanned run of cells, an edge group) is
  drawn from U(+-1/sqrt(fan_in)) of one module's kernel, not of the stack."""
  model = supernet.Supernet("s2", C=4, layers=10, num_classes=3, scan_cells=True)
  x = jnp.zeros((2, 8, 8, 1))
  variables = initializers.init_variables(model, 0, x, model.init_alpha(jax.random.PRNGKey(0)))
  group = variables["params"]["stacked_cells8to9"]["cell"]["stacked_from0"]
  pointwise = np.asarray(group["sep_conv_3x3"]["SepConv_0"]["Dense_0"]["kernel"])
  cells, edges, c_in, _ = pointwise.shape
  assert (cells, edges) == (2, 4)  # two cells, four edges leave state 0
  bound = 1.0 / np.sqrt(c_in)
  assert np.abs(pointwise).max() <= bound and np.abs(pointwise).max() > 0.9 * bound
