"""Discrete networks built from a genotype, for retraining (DARTS' `cnn/model.py` layout,
and NAS-Bench-201's skeleton for its genotypes).

`NetworkCIFAR`, `NetworkImageNet` and `NB201Network` return `(logits, aux_logits)`;
aux_logits is None unless the auxiliary head is on and `train=True` (NAS-Bench-201
has none). Drop-path (applied to
every non-identity op in training) needs a "dropout" rng; its rate is a call
argument so the caller can ramp it without recompiling.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from amended_darts_jax import batch_norm, initializers, ops, spaces
from amended_darts_jax.errors import ConfigError


def drop_path(x, rate, rng):
  """Zeroes whole samples with probability `rate`, scaling the rest by 1/(1-rate)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0], 1, 1, 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


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

  @nn.compact
  def __call__(self, s0, s1, drop_path_rate, train):
    _check_genotype(self.genotype, self.layers)
    reductions = spaces.reduction_cells(self.layers)
    c_curr, reduction_prev, logits_aux = self.C, self.reduction_prev, None
    for i in range(self.layers):
      reduction = i in reductions
      if reduction:
        c_curr *= 2
      gene, concat = self.genotype.gene(i, reduction)
      s0, s1 = s1, Cell(gene, concat, c_curr, reduction, reduction_prev, self.act,
                        self.conv_pool_impl, name=f"cell{i}")(s0, s1, drop_path_rate, train)
      reduction_prev = reduction
      if i == 2 * self.layers // 3 and self.auxiliary and train:
        logits_aux = AuxiliaryHead(self.num_classes, self.imagenet, self.act,
                                   name="auxiliary_head")(s1, train)
    return s1, logits_aux


class NetworkCIFAR(nn.Module):
  genotype: spaces.Genotype
  C: int = 36
  layers: int = 20
  num_classes: int = 10
  auxiliary: bool = True
  act: str = "relu"
  conv_pool_impl: str = "auto"

  @nn.compact
  def __call__(self, x_NHWC, drop_path_rate=0.0, train: bool = False):
    x = nn.Conv(3 * self.C, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=initializers.torch_init, name="stem_conv")(x_NHWC)
    x = batch_norm.batch_norm(train, affine=True, name="stem_bn")(x)
    s1, logits_aux = _CellStack(self.genotype, self.C, self.layers, self.num_classes,
                                self.auxiliary, False, False, self.act, self.conv_pool_impl,
                                name="cells")(x, x, drop_path_rate, train)
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
                                name="cells")(s0, s1, drop_path_rate, train)
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


def nb201_skeleton(x_NHWC, C, layers, act, train, cell):
  """NAS-Bench-201's macro skeleton up to the pooling, called inside a compact
  method: a C-channel stem, three stages of layers / 3 cells with a residual
  reduction block between stages (channels doubled), then BN-act. `cell(i, c, x)`
  applies cell i at c channels; the search and the retraining network differ
  only there."""
  x = nn.Conv(C, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
              kernel_init=initializers.torch_init, name="stem_conv")(x_NHWC)
  x = batch_norm.batch_norm(train, affine=True, name="stem_bn")(x)
  c, i = C, 0
  for stage in range(3):
    if stage:
      c *= 2
      x = ops.ResNetBlock(c, act, name=f"block{stage}")(x, train)
    for _ in range(layers // 3):
      x = cell(i, c, x)
      i += 1
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

  @nn.compact
  def __call__(self, x_NHWC, drop_path_rate=0.0, train: bool = False):
    if not self.genotype.is_nb201:
      raise spaces.GenotypeError("NB201Network builds NAS-Bench-201 genotypes only")
    check_nb201(self.layers)
    cell = lambda i, c, x: NB201Cell(self.genotype.nb201, c, self.act, name=f"cell{i}")(
        x, drop_path_rate, train)
    x = nb201_skeleton(x_NHWC, self.C, self.layers, self.act, train, cell)
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
