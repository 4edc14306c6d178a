"""The search supernet: a pure Linen module with alpha as an input.

    variables = Supernet(...).init(key, x, alpha, train=False)
    logits, updates = Supernet(...).apply(variables, x, alpha, train=True,
                                          mutable=["batch_stats"])

`variables["params"]` is omega; alpha is a separate pytree (spaces.SearchSpace.
init_alpha) and each cell mixes its ops by softmax(alpha) (paper eq. 1). The
layout follows DARTS' search network: a 3C-channel stem, non-affine batch norm
in the cells, channels doubled at the reduction cells (1/3 and 2/3 of depth),
each cell the concatenation of its 4 nodes, global average pooling, a linear
classifier.

By default (`edge_groups=True`) a cell computes the edges leaving each state as
one MixedOp under `nn.vmap` (an EdgeGroup): the input is shared, so the
activation and the parameter-free operations run once, and the program holds
one op per source state instead of one per edge (fewer, larger kernels; it
compiles in about half the time on CPU, BUILD_NOTES.md). Variables are stacked
along the group's edges under `cell<i>/stacked_from<src>`, in the order of
`space.edges`. `edge_groups=False` is the literal one-MixedOp-per-edge cell
(`cell<i>/edge<e>`); both compute the same function.

With `scan_cells=True` each run of two or more normal cells whose
inputs share one shape (`networks.cell_runs`: between two reduction cells, from
the second cell after each) is one `nn.scan`, so the program holds that cell
once whatever the depth; its variables are the run's cells' stacked under
`stacked_cells<first>to<last>/cell`, its per-cell alphas' softmax weights are
stacked as scanned inputs, and `networks.stack_cells` and `unstack_cells`
convert to and from the `cell<i>` layout. Below 10 cells there is no such run;
NAS-Bench-201's network scans each stage's cells (`networks.nb201_cell_runs`).

The regularizers of DARTS' retraining, each off by default, for a search that
trains its supernet as the evaluation trains the network (the paper's
"consistent" setting, configs/s1_consistent.py): `drop_path` (every
non-identity operation's output on every edge, before its softmax weight, at the
rate given as a call argument so that it can ramp without recompiling),
`dropout` before the classifier, and `auxiliary`: DARTS' auxiliary head after
the second reduction cell, whose logits are sown as `("aux", "logits")` in train
mode (apply with `mutable=["batch_stats", "aux"]`). Drop-path and dropout draw
from the "dropout" rng; the masks depend on the layout (edge groups or not), the
function at a fixed mask does not.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amended_darts_jax import batch_norm, initializers, networks, ops, spaces


class MixedOp(nn.Module):
  """sum_o softmax(alpha)_o * o(x) over the space's ops (paper eq. 1).

  `in_edge_group`: it runs as an EdgeGroup, under `nn.vmap` over edges sharing x.
  """
  op_names: tuple[str, ...]
  features: int
  stride: int
  train: bool
  act: str = "relu"
  conv_pool_impl: str = "auto"
  in_edge_group: bool = False
  drop_path: bool = False
  pool_bn: bool = True  # DARTS' BN after the pools; NAS-Bench-201's search cell has none

  @nn.compact
  def __call__(self, x, weights_O, drop_path_rate=0.0):
    train = self.train
    out = None
    for k, op in enumerate(self.op_names):
      if op == "none":  # contributes zeros; its weight still enters the softmax
        continue
      y = ops.Op(op, self.features, self.stride, affine=False, pool_bn=self.pool_bn, act=self.act,
                 conv_pool_impl=self.conv_pool_impl, in_edge_group=self.in_edge_group,
                 name=op)(x, train)
      if self.drop_path and train and not ops.is_identity(op, self.stride):
        y = networks.drop_path(y, drop_path_rate, self.make_rng("dropout"))
      y = weights_O[k].astype(y.dtype) * y
      out = y if out is None else out + y
    if out is None:
      out = jnp.zeros_like(x[:, ::self.stride, ::self.stride])
    return out


# MixedOp over a leading edge axis: one weight set, one set of statistics and one
# drop-path key per edge. Called as (x, weights_EO, drop_path_rate), all three given.
EdgeGroup = nn.vmap(MixedOp, in_axes=(None, 0, None), out_axes=0,
                    variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True, "dropout": True})


def mixed_edges(x, src, edges, ops_of, features, stride, weights_ExO, drop_path_rate, add, *,
                edge_groups, **mixed):
  """The mixed operations of the edges that leave state `src` (input `x`), each
  output handed to `add(destination, y)`; called inside a cell's compact method.

  With `edge_groups`, one EdgeGroup per set of operations (one set, and one
  group, unless the space gives each edge its own operations), named
  `stacked_from<src>`; otherwise one MixedOp per edge, `edge<e>`. `mixed` holds
  the MixedOp fields shared by every edge (train, act, ...).
  """
  leaving = [e for e, (s, _) in enumerate(edges) if s == src]
  if not edge_groups:
    for e in leaving:
      add(edges[e][1], MixedOp(ops_of(e), features, stride, name=f"edge{e}", **mixed)(
          x, weights_ExO[e], drop_path_rate))
    return
  groups = {}
  for e in leaving:
    groups.setdefault(ops_of(e), []).append(e)
  for k, (op_names, group) in enumerate(groups.items()):
    suffix = f"_{k}" if len(groups) > 1 else ""
    # A group of one edge has no per-edge inputs to speak of (vmap of size 1
    # batches the dense depthwise form into a plain convolution).
    y_ENHWC = EdgeGroup(op_names, features, stride, in_edge_group=len(group) > 1,
                        name=f"{initializers.STACKED_PREFIX}from{src}{suffix}", **mixed)(
                            x, weights_ExO[np.asarray(group)], drop_path_rate)
    for i, e in enumerate(group):
      add(edges[e][1], y_ENHWC[i])


class SearchCell(nn.Module):
  """A cell of the supernet: preprocess both inputs, then each node sums its mixed edges."""
  space: spaces.SearchSpace
  features: int
  reduction: bool
  reduction_prev: bool
  train: bool
  act: str = "relu"
  conv_pool_impl: str = "auto"
  edge_groups: bool = True
  drop_path: bool = False

  @nn.compact
  def __call__(self, s0, s1, weights_ExO, drop_path_rate=0.0):
    c, train = self.features, self.train
    if self.reduction_prev:
      s0 = ops.FactorizedReduce(c, affine=False, act=self.act, name="pre0")(s0, train)
    else:
      s0 = ops.ReLUConvBN(c, affine=False, act=self.act, name="pre0")(s0, train)
    s1 = ops.ReLUConvBN(c, affine=False, act=self.act, name="pre1")(s1, train)
    states = [s0, s1]
    # Node j sums the mixed ops on its incoming edges; the sums
    # fill up as the states they come from become available.
    node_sums = [None] * self.space.steps

    def add(dst, y):
      node_sums[dst] = y if node_sums[dst] is None else node_sums[dst] + y

    mixed = dict(train=train, act=self.act, conv_pool_impl=self.conv_pool_impl,
                 drop_path=self.drop_path)
    edges_from = lambda src: mixed_edges(
        states[src], src, self.space.edges, lambda e: self.space.ops_of(e, self.reduction), c,
        2 if self.reduction and src < 2 else 1, weights_ExO, drop_path_rate, add,
        edge_groups=self.edge_groups, **mixed)

    edges_from(0)
    edges_from(1)
    for node in range(self.space.steps):
      states.append(node_sums[node])
      edges_from(node + 2)
    return jnp.concatenate(states[2:], axis=-1)


class NB201SearchCell(nn.Module):
  """NAS-Bench-201's cell in search: node j sums the mixed ops of every earlier state.

  State 0 is the input; the output is node 3. Non-affine batch norm, no BN
  after the pools, no preprocessing (the benchmark's search cell). Edges as in
  SearchCell (`mixed_edges`).
  """
  space: spaces.SearchSpace
  features: int
  train: bool
  act: str = "relu"
  conv_pool_impl: str = "auto"
  edge_groups: bool = True
  drop_path: bool = False

  @nn.compact
  def __call__(self, x, weights_ExO, drop_path_rate=0.0):
    states, node_sums = [x], {}

    def add(dst, y):
      node_sums[dst] = y if dst not in node_sums else node_sums[dst] + y

    for src in range(self.space.steps):
      mixed_edges(states[src], src, self.space.edges, lambda e: self.space.ops, self.features,
                  1, weights_ExO, drop_path_rate, add, edge_groups=self.edge_groups,
                  train=self.train, act=self.act, conv_pool_impl=self.conv_pool_impl,
                  drop_path=self.drop_path, pool_bn=False)
      states.append(node_sums[src + 1])  # every edge into node src + 1 is in
    return states[-1]


class Supernet(nn.Module):
  """The DARTS search network for any space; `remat` rematerializes per cell."""
  space_name: str = "darts"
  C: int = 16
  layers: int = 8
  num_classes: int = 10
  stem_multiplier: int = 3
  act: str = "relu"
  conv_pool_impl: str = "auto"
  remat: bool = False
  edge_groups: bool = True
  drop_path: bool = False
  dropout: float = 0.0
  auxiliary: bool = False
  scan_cells: bool = False

  @property
  def space(self) -> spaces.SearchSpace:
    return spaces.get_space(self.space_name)

  @property
  def cell_runs(self) -> tuple[tuple[int, int], ...]:
    """The runs of cells computed by one scan each (networks.cell_runs), with `scan_cells`."""
    if not self.scan_cells:
      return ()
    if self.space.cell == "nb201":
      return networks.nb201_cell_runs(self.layers)
    return networks.cell_runs(self.layers)

  def init_alpha(self, key, dtype=jnp.float32):
    return self.space.init_alpha(key, self.layers, dtype)

  @nn.compact
  def __call__(self, x_NHWC, alpha, train: bool = True, drop_path_rate=0.0):
    space = self.space
    if space.cell == "nb201":
      return self._nb201(x_NHWC, alpha, train, drop_path_rate)
    c_curr = self.stem_multiplier * self.C
    x = nn.Conv(c_curr, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=initializers.torch_init, name="stem_conv")(x_NHWC)
    x = batch_norm.batch_norm(train, affine=True, name="stem_bn")(x)
    s0 = s1 = x
    c_curr = self.C
    reductions = spaces.reduction_cells(self.layers)
    runs = dict(self.cell_runs)
    cell_cls = nn.remat(SearchCell) if self.remat else SearchCell
    reduction_prev, i = False, 0
    while i < self.layers:
      reduction = i in reductions
      if reduction:
        c_curr *= 2
      cell = lambda name: cell_cls(space, c_curr, reduction, reduction_prev, train, self.act,
                                   self.conv_pool_impl, self.edge_groups, self.drop_path,
                                   name=name)
      softmax = lambda j: jax.nn.softmax(space.cell_alpha(alpha, j, reduction), axis=-1)
      if i in runs:  # normal cells i..last as one scan, their weights stacked
        last = runs[i]
        weights_NxExO = jnp.stack([softmax(j) for j in range(i, last + 1)])
        s0, s1 = networks.scan_cells(
            lambda s0, s1, weights_ExO, rate: cell("cell")(s0, s1, weights_ExO, rate),
            i, last, s0, s1, stacked=(weights_NxExO,), broadcast=(drop_path_rate,))
        reduction_prev, i = False, last + 1
        continue
      s0, s1 = s1, cell(f"cell{i}")(s0, s1, softmax(i), drop_path_rate)
      reduction_prev = reduction
      if i == 2 * self.layers // 3 and self.auxiliary and train:
        self.sow("aux", "logits", networks.AuxiliaryHead(self.num_classes, act=self.act,
                                                         name="auxiliary_head")(s1, train))
      i += 1
    return self._classify(s1, train)

  def _classify(self, x_NHWC, train):
    """Global average pooling, dropout where it is on, the linear classifier."""
    pooled = jnp.mean(x_NHWC, axis=(1, 2))
    if self.dropout:
      pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
    return nn.Dense(self.num_classes, kernel_init=initializers.torch_init,
                    bias_init=initializers.torch_bias_init(pooled.shape[-1]), name="classifier")(pooled)

  def _nb201(self, x_NHWC, alpha, train, drop_path_rate):
    """NAS-Bench-201's search network: a C-channel stem, three stages of layers / 3
    cells with residual reduction blocks between them, BN-act, pooling, classifier."""
    networks.check_nb201(self.layers, self.auxiliary)
    weights_ExO = jax.nn.softmax(self.space.cell_alpha(alpha, 0, False), axis=-1)
    cell_cls = nn.remat(NB201SearchCell) if self.remat else NB201SearchCell
    cell = lambda name, c, x: cell_cls(self.space, c, train, self.act, self.conv_pool_impl,
                                       self.edge_groups, self.drop_path, name=name)(
                                           x, weights_ExO, drop_path_rate)
    x = networks.nb201_skeleton(x_NHWC, self.C, self.layers, self.act, train, cell,
                                self.cell_runs)
    return self._classify(x, train)
