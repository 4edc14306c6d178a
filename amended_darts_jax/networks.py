"""Discrete networks built from a genotype, for retraining (DARTS' `cnn/model.py` layout,
and NAS-Bench-201's skeleton for its genotypes).

`NetworkCIFAR`, `NetworkImageNet` and `NB201Network` return `(logits, aux_logits)`;
aux_logits is None unless the auxiliary head is on and `train=True` (NAS-Bench-201
has none). Drop-path (applied to
every non-identity op in training) needs a "dropout" rng; its rate is a call
argument so the caller can ramp it without recompiling.

`scan_cells=True` computes each run of consecutive normal cells of one gene whose
inputs share a shape (`cell_runs`) as one `nn.scan` (`scan_cells`), here and in
the search's supernet: the program then holds one copy of the cell per run,
whatever the depth. The configs' `scan_cells` ("auto", "on", "off"; `scans`)
sets it. A run's variables are its cells' stacked along a
leading axis; `stack_cells` and `unstack_cells` convert between that layout and
one submodule per cell (`cell<i>`), and `init_variables` draws the same weights
for both.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from amended_darts_jax import batch_norm, initializers, ops, spaces
from amended_darts_jax.cpu import dispatch
from amended_darts_jax.errors import ConfigError


def drop_path(x, rate, rng):
  """Zeroes whole samples with probability `rate`, scaling the rest by 1/(1-rate)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0], 1, 1, 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


# A run of cells computed by one scan is the submodule `stacked_cells<first>to<last>`;
# its variables are those of cells first..last stacked along a leading axis, under
# `stacked_cells<first>to<last>/cell` (`stack_cells` and `unstack_cells` convert).
SCAN_PREFIX = initializers.STACKED_PREFIX + "cells"
# The configs' `scan_cells`: "auto" scans on GPU and TPU, not on XLA:CPU.
SCAN_SETTINGS = ("auto", "on", "off")


def scans(setting: str) -> bool:
  """Whether the config setting `scan_cells` scans runs of cells on this backend.

  "auto" scans on GPU and TPU. On XLA:CPU a scanned 20-cell amended step compiled
  in two thirds of the unrolled one's time but ran 26% slower with a fifth more
  memory (BUILD_NOTES.md, "Compile time"), which a run of more than a few steps
  does not win back, so "auto" does not scan there. It touches the backend.
  """
  if setting not in SCAN_SETTINGS:
    raise ConfigError(f"scan_cells must be one of {', '.join(SCAN_SETTINGS)}; got {setting!r}")
  return setting == "on" or (setting == "auto" and jax.default_backend() != "cpu")


def cell_runs(layers: int, same: Callable[[int, int], bool] = lambda i, j: True
              ) -> tuple[tuple[int, int], ...]:
  """The runs (first, last) of two or more consecutive cells that one scan computes.

  Cell i can be a scan step when neither it nor cell i - 1 is a reduction cell and
  i >= 2: its inputs (the outputs of cells i - 2 and i - 1) and its output then
  have one shape, so (s0, s1) -> (s1, cell(s0, s1)) is the same function of
  different weights from cell to cell. `same(i, j)` says whether cells i and j
  have the same structure (the retraining networks' per-cell genotypes).
  """
  reductions = spaces.reduction_cells(layers)
  steppable = [i >= 2 and i not in reductions and i - 1 not in reductions for i in range(layers)]
  runs, first = [], None
  for i in range(layers + 1):
    if first is not None and (i == layers or not steppable[i] or not same(first, i)):
      if i - 1 > first:
        runs.append((first, i - 1))
      first = None
    if i < layers and steppable[i] and first is None:
      first = i
  return tuple(runs)


def _cells_dict(tree) -> bool:
  return isinstance(tree, dict) and any(re.fullmatch(r"cell\d+", k) for k in tree)


def _convert_cells(variables, runs, scanned: bool):
  def convert(tree):
    if not isinstance(tree, dict):
      return tree
    if not _cells_dict(tree) and not any(k.startswith(SCAN_PREFIX) for k in tree):
      return {k: convert(v) for k, v in tree.items()}
    out = dict(tree)
    for first, last in runs:
      name = f"{SCAN_PREFIX}{first}to{last}"
      if scanned:
        cells = [out.pop(f"cell{i}") for i in range(first, last + 1)]
        out[name] = {"cell": jax.tree_util.tree_map(lambda *x: jnp.stack(x), *cells)}
      else:
        stacked = out.pop(name)["cell"]
        for k, i in enumerate(range(first, last + 1)):
          out[f"cell{i}"] = jax.tree_util.tree_map(lambda x: x[k], stacked)
    return out
  return {collection: convert(tree) for collection, tree in variables.items()}


def stack_cells(variables, runs):
  """Variables in the one-submodule-per-cell layout (`cell<i>`) in the layout of a
  network that scans `runs`; `unstack_cells` is the inverse."""
  return _convert_cells(variables, runs, scanned=True)


def unstack_cells(variables, runs):
  """Variables of a network that scans `runs` in the one-submodule-per-cell layout."""
  return _convert_cells(variables, runs, scanned=False)


class CellStep(nn.Module):
  """A cell as one step of a scan over cells: carry (s0, s1) -> (s1, cell output).
  `cell(s0, s1, *args)` builds the cell (named "cell") and applies it."""
  cell: Callable

  @nn.compact
  def __call__(self, carry, *args):
    s0, s1 = carry
    return (s1, self.cell(s0, s1, *args)), None


def _save_products(prim, *args, **params):
  """Checkpoint policy: save the results of matrix products, convolutions and the C++ kernels."""
  del args, params
  return prim.name in ("dot_general", "conv_general_dilated") or dispatch.is_kernel_call(prim)


def scan_cells(cell, first: int, last: int, s0, s1, stacked=(), broadcast=()):
  """Cells first..last as one `nn.scan`, called inside a compact method; returns
  the (s0, s1) after the last. `stacked` are per-cell inputs with a leading cell
  axis (a per-cell space's softmax weights), `broadcast` inputs shared by all
  (the drop-path rate). Weights and batch statistics are stacked per cell, and
  each cell draws its own "params" and "dropout" keys."""
  # What the reverse pass keeps of each cell: the products' outputs; the
  # elementwise rest (activations, batch norm, pooling sums) is recomputed. A
  # scan keeps every residual it saves in memory, where XLA fuses most of them
  # away in an unrolled network: saving all of them doubled the 20-cell step's
  # buffers (BUILD_NOTES.md, "Compile time").
  step = nn.remat(CellStep, prevent_cse=False, policy=_save_products)
  scan = nn.scan(step, variable_axes={"params": 0, "batch_stats": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(0,) * len(stacked) + (nn.broadcast,) * len(broadcast),
                 length=last - first + 1)
  carry, _ = scan(cell, name=f"{SCAN_PREFIX}{first}to{last}")((s0, s1), *stacked, *broadcast)
  return carry


def init_variables(model: nn.Module, seed: int, *args, **kwargs) -> dict[str, Any]:
  """`initializers.init_variables` for a network that may scan runs of cells: the
  values drawn for its one-submodule-per-cell form, then stacked, so that a
  network draws the same weights whether it scans or not."""
  runs = getattr(model, "cell_runs", ())
  if runs:
    model = model.clone(scan_cells=False)
  return stack_cells(initializers.init_variables(model, seed, *args, **kwargs), runs)


class Cell(nn.Module):
  gene: spaces.Gene
  concat: tuple[int, ...]
  features: int
  reduction: bool
  reduction_prev: bool
  act: str = "relu"
  conv_pool_impl: str = "auto"

  @nn.compact
  def __call__(self, s0, s1, drop_path_rate, train: bool):
    c = self.features
    if self.reduction_prev:
      s0 = ops.FactorizedReduce(c, act=self.act, name="pre0")(s0, train)
    else:
      s0 = ops.ReLUConvBN(c, act=self.act, name="pre0")(s0, train)
    s1 = ops.ReLUConvBN(c, act=self.act, name="pre1")(s1, train)
    states = [s0, s1]
    for node in range(len(self.gene) // 2):
      total = None
      for k in (2 * node, 2 * node + 1):
        op, src = self.gene[k]
        stride = 2 if self.reduction and src < 2 else 1
        h = ops.Op(op, c, stride, act=self.act, conv_pool_impl=self.conv_pool_impl,
                   name=f"op{k}")(states[src], train)
        if train and not ops.is_identity(op, stride):
          h = drop_path(h, drop_path_rate, self.make_rng("dropout"))
        total = h if total is None else total + h
      states.append(total)
    return jnp.concatenate([states[i] for i in self.concat], axis=-1)


class AuxiliaryHead(nn.Module):
  """DARTS' auxiliary classifier; `imagenet` pools with stride 2 and drops the second BN.
  Its activations are `act`, so that a smooth network is smooth throughout.

  DARTS sizes it for an 8x8 (CIFAR) or 14x14 (ImageNet) feature map; on smaller
  maps (the 8x8 digits give 2x2) the pooling and convolution windows shrink to fit.
  """
  num_classes: int
  imagenet: bool = False
  act: str = "relu"

  @nn.compact
  def __call__(self, x, train: bool):
    act = ops.activation(self.act)
    x = act(x)
    pool = min(5, x.shape[1], x.shape[2])
    x = nn.avg_pool(x, (pool, pool), (2, 2) if self.imagenet else (3, 3), padding="VALID")
    x = ops.pointwise(128)(x)
    x = act(batch_norm.batch_norm(train, affine=True)(x))
    k = min(2, x.shape[1], x.shape[2])
    x = nn.Conv(768, (k, k), padding="VALID", use_bias=False, kernel_init=initializers.torch_init)(x)
    if not self.imagenet:
      x = batch_norm.batch_norm(train, affine=True)(x)
    x = act(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, kernel_init=initializers.torch_init,
                    bias_init=initializers.torch_bias_init(x.shape[-1]))(x)


def _check_genotype(genotype: spaces.Genotype, layers: int):
  if genotype.per_cell and len(genotype.cells) != layers:
    raise spaces.GenotypeError(f"the genotype has {len(genotype.cells)} per-cell genes but the "
                               f"network has {layers} cells; set layers={len(genotype.cells)}")


def genotype_cell_runs(genotype: spaces.Genotype, layers: int) -> tuple[tuple[int, int], ...]:
  """`cell_runs` of a retraining network: runs of normal cells with one gene."""
  if genotype.per_cell and len(genotype.cells) != layers:
    return ()  # not a network (_check_genotype says why)
  return cell_runs(layers, lambda i, j: genotype.gene(i, False) == genotype.gene(j, False))


class _CellStack(nn.Module):
  """The cells of either network, with the auxiliary head after cell 2*layers//3."""
  genotype: spaces.Genotype
  C: int
  layers: int
  num_classes: int
  auxiliary: bool
  imagenet: bool
  reduction_prev: bool
  act: str
  conv_pool_impl: str
  runs: tuple[tuple[int, int], ...]  # the network's cell_runs

  @nn.compact
  def __call__(self, s0, s1, drop_path_rate, train):
    _check_genotype(self.genotype, self.layers)
    reductions = spaces.reduction_cells(self.layers)
    runs = dict(self.runs)
    c_curr, reduction_prev, logits_aux = self.C, self.reduction_prev, None
    i = 0
    while i < self.layers:
      reduction = i in reductions
      if reduction:
        c_curr *= 2
      gene, concat = self.genotype.gene(i, reduction)
      cell = lambda s0, s1, rate, name: Cell(gene, concat, c_curr, reduction, reduction_prev,
                                             self.act, self.conv_pool_impl, name=name)(
                                                 s0, s1, rate, train)
      if i in runs:  # a run of cells with one gene, none of them a reduction
        s0, s1 = scan_cells(lambda s0, s1, rate: cell(s0, s1, rate, "cell"), i, runs[i], s0, s1,
                            broadcast=(drop_path_rate,))
        i = runs[i] + 1
        reduction_prev = False
        continue
      s0, s1 = s1, cell(s0, s1, drop_path_rate, f"cell{i}")
      reduction_prev = reduction
      if i == 2 * self.layers // 3 and self.auxiliary and train:
        logits_aux = AuxiliaryHead(self.num_classes, self.imagenet, self.act,
                                   name="auxiliary_head")(s1, train)
      i += 1
    return s1, logits_aux


class NetworkCIFAR(nn.Module):
  genotype: spaces.Genotype
  C: int = 36
  layers: int = 20
  num_classes: int = 10
  auxiliary: bool = True
  act: str = "relu"
  conv_pool_impl: str = "auto"
  scan_cells: bool = False  # scan runs of identical cells (cell_runs): a flat compile time

  @property
  def cell_runs(self) -> tuple[tuple[int, int], ...]:
    return genotype_cell_runs(self.genotype, self.layers) if self.scan_cells else ()

  @nn.compact
  def __call__(self, x_NHWC, drop_path_rate=0.0, train: bool = False):
    x = nn.Conv(3 * self.C, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=initializers.torch_init, name="stem_conv")(x_NHWC)
    x = batch_norm.batch_norm(train, affine=True, name="stem_bn")(x)
    s1, logits_aux = _CellStack(self.genotype, self.C, self.layers, self.num_classes,
                                self.auxiliary, False, False, self.act, self.conv_pool_impl,
                                self.cell_runs, name="cells")(x, x, drop_path_rate, train)
    return _classifier(self.num_classes, s1), logits_aux


def _classifier(num_classes, features_NHWC):
  pooled = jnp.mean(features_NHWC, axis=(1, 2))
  return nn.Dense(num_classes, kernel_init=initializers.torch_init,
                  bias_init=initializers.torch_bias_init(pooled.shape[-1]), name="classifier")(pooled)


class NetworkImageNet(nn.Module):
  genotype: spaces.Genotype
  C: int = 48
  layers: int = 14
  num_classes: int = 1000
  auxiliary: bool = True
  act: str = "relu"
  conv_pool_impl: str = "auto"
  scan_cells: bool = False  # scan runs of identical cells (cell_runs): a flat compile time

  @property
  def cell_runs(self) -> tuple[tuple[int, int], ...]:
    return genotype_cell_runs(self.genotype, self.layers) if self.scan_cells else ()

  @nn.compact
  def __call__(self, x_NHWC, drop_path_rate=0.0, train: bool = False):
    conv = lambda c, name: nn.Conv(c, (3, 3), (2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                                   kernel_init=initializers.torch_init, name=name)
    x = batch_norm.batch_norm(train, True, name="stem0_bn0")(conv(self.C // 2, "stem0_conv0")(x_NHWC))
    act = ops.activation(self.act)
    s0 = batch_norm.batch_norm(train, True, name="stem0_bn1")(conv(self.C, "stem0_conv1")(act(x)))
    s1 = batch_norm.batch_norm(train, True, name="stem1_bn")(conv(self.C, "stem1_conv")(act(s0)))
    s1, logits_aux = _CellStack(self.genotype, self.C, self.layers, self.num_classes,
                                self.auxiliary, True, True, self.act, self.conv_pool_impl,
                                self.cell_runs, name="cells")(s0, s1, drop_path_rate, train)
    # DARTS pools 7x7 at 224x224 input; a global mean is the same there and works at any size.
    return _classifier(self.num_classes, s1), logits_aux


class NB201Cell(nn.Module):
  """NAS-Bench-201's cell: node j sums the genotype's op on each edge from an earlier state."""
  gene: spaces.Gene
  features: int
  act: str = "relu"

  @nn.compact
  def __call__(self, x, drop_path_rate, train: bool):
    states, sums = [x], {}
    for k, ((op, src), (_, dst)) in enumerate(zip(self.gene, spaces.NB201_EDGES)):
      h = ops.Op(op, self.features, 1, act=self.act, name=f"op{k}")(states[src], train)
      if train and op != "none" and not ops.is_identity(op, 1):
        h = drop_path(h, drop_path_rate, self.make_rng("dropout"))
      sums[dst] = h if dst not in sums else sums[dst] + h
      if k + 1 == len(self.gene) or spaces.NB201_EDGES[k + 1][1] != dst:
        states.append(sums[dst])  # node dst has all its edges
    return states[-1]


def check_nb201(layers: int, auxiliary: bool = False) -> None:
  """ConfigError unless NAS-Bench-201's network can be built with these settings
  (the search's and the retraining's, for the search and the retraining network)."""
  if layers % 3:
    raise ConfigError(f"NAS-Bench-201's network has three stages of equal depth, so layers "
                      f"must be a multiple of 3; got {layers}")
  if auxiliary:
    raise ConfigError("NAS-Bench-201's network has no auxiliary head: set "
                      "--config.auxiliary=False")


def nb201_cell_runs(layers: int) -> tuple[tuple[int, int], ...]:
  """The runs of NAS-Bench-201's network: each stage's layers / 3 cells, which share
  one input shape (from 2 cells a stage on)."""
  n = layers // 3
  return tuple((s * n, s * n + n - 1) for s in range(3)) if n >= 2 else ()


def nb201_skeleton(x_NHWC, C, layers, act, train, cell, runs=()):
  """NAS-Bench-201's macro skeleton up to the pooling, called inside a compact
  method: a C-channel stem, three stages of layers / 3 cells with a residual
  reduction block between stages (channels doubled), then BN-act. `cell(name, c,
  x)` applies a cell named `name` at c channels; the search and the retraining
  network differ only there. `runs` (the network's `cell_runs`, one per stage
  from `nb201_cell_runs`) are scanned."""
  x = nn.Conv(C, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
              kernel_init=initializers.torch_init, name="stem_conv")(x_NHWC)
  x = batch_norm.batch_norm(train, affine=True, name="stem_bn")(x)
  runs = dict(runs)
  c, n = C, layers // 3
  for stage in range(3):
    if stage:
      c *= 2
      x = ops.ResNetBlock(c, act, name=f"block{stage}")(x, train)
    first = stage * n
    if first in runs:  # the carry's first half is unused: one-input cells
      x = scan_cells(lambda _, x: cell("cell", c, x), first, runs[first], x, x)[1]
      continue
    for i in range(first, first + n):
      x = cell(f"cell{i}", c, x)
  return ops.activation(act)(batch_norm.batch_norm(train, affine=True, name="last_bn")(x))


class NB201Network(nn.Module):
  """NAS-Bench-201's network: stem, three stages of layers / 3 cells, with its
  residual block between them, BN-ReLU, global pooling, classifier (C=16, 15 cells
  in the benchmark)."""
  genotype: spaces.Genotype
  C: int = 16
  layers: int = 15
  num_classes: int = 10
  act: str = "relu"
  scan_cells: bool = False  # each stage's cells as one scan (nb201_cell_runs)

  @property
  def cell_runs(self) -> tuple[tuple[int, int], ...]:
    return nb201_cell_runs(self.layers) if self.scan_cells else ()

  @nn.compact
  def __call__(self, x_NHWC, drop_path_rate=0.0, train: bool = False):
    if not self.genotype.is_nb201:
      raise spaces.GenotypeError("NB201Network builds NAS-Bench-201 genotypes only")
    check_nb201(self.layers)
    cell = lambda name, c, x: NB201Cell(self.genotype.nb201, c, self.act, name=name)(
        x, drop_path_rate, train)
    x = nb201_skeleton(x_NHWC, self.C, self.layers, self.act, train, cell, self.cell_runs)
    return _classifier(self.num_classes, x), None


def count_params(params: Any, exclude: str = "auxiliary_head") -> int:
  """Number of parameters, leaving out any whose path contains `exclude` (as DARTS reports)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return sum(int(x.size) for path, x in flat
             if exclude is None or exclude not in jax.tree_util.keystr(path))


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for item in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      lhs, rhs = (v.aval for v in eqn.invars)
      out = eqn.outvars[0].aval
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
      window = 1
      for d in spec[2:]:
        window *= rhs.shape[d]
      in_per_group = rhs.shape[spec[1]]
      total += int(out.size) * window * in_per_group
    elif name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      k = 1
      for d in contract:
        k *= lhs.shape[d]
      total += int(eqn.outvars[0].aval.size) * k
    for sub in _sub_jaxprs(eqn):
      total += _macs(sub)
  return total


def count_macs(model: nn.Module, variables: Any, input_shape: tuple[int, ...]) -> int:
  """Multiply-adds of convolutions and matrix products for one image, in eval mode.

  Counted from the traced program, with depthwise convolutions as grouped
  convolutions (the formulation whose count is k*k*C per output pixel).
  """
  if hasattr(model, "conv_pool_impl"):
    model = model.clone(conv_pool_impl="conv")
  x = jnp.zeros((1, *input_shape), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, 0.0, train=False,
                                               rngs={"dropout": jax.random.PRNGKey(0)})[0])(variables)
  return _macs(jaxpr.jaxpr)
