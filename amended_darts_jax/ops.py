"""The eight DARTS operations, and NAS-Bench-201's, as Flax Linen modules (NHWC).

They follow DARTS' reference definitions: activation-conv-BN order, separable
convolutions applied twice, dilated convolutions with dilation 2, factorized
reduce for a strided skip, average pooling that does not count padding.
NAS-Bench-201 adds `nor_conv_1x1` and `nor_conv_3x3` (act-conv-BN, ReLUConvBN)
and its residual reduction block (ResNetBlock). Weights
are initialised as PyTorch does (initializers.py) so that search dynamics match.

How the depthwise convolutions and the max pooling are computed is the
`conv_pool_impl` switch, decided in one place for every backend
(cpu/dispatch.py): XLA's own operations on GPU and TPU, C++ kernels or
pure-JAX formulations on XLA:CPU.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from amended_darts_jax.batch_norm import batch_norm
from amended_darts_jax.cpu import dispatch
from amended_darts_jax.initializers import torch_init

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    # Smooth stand-ins, for comparisons of exact and finite-difference products.
    "softplus": nn.softplus,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}") from None


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution without bias, computed as `conv_pool_impl` says
  (cpu/dispatch.py). `edge_group` says where it sits in the supernet's edge
  groups: "" (not in one), "shared" (the edges share its input) or "per_edge"."""
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  conv_pool_impl: str = "auto"
  edge_group: str = ""

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    # fan_in of a depthwise filter is k*k, as PyTorch's grouped conv counts it.
    kernel = self.param("kernel", lambda key, shape: torch_init(key, (k, k, 1, shape[-1]))[:, :, 0],
                        (k, k, x.shape[-1]))
    return dispatch.depthwise_conv(self.conv_pool_impl, x, kernel.astype(x.dtype), self.stride,
                                   self.padding, self.dilation, self.edge_group)


def pointwise(features: int, name: str | None = None) -> nn.Dense:
  """A 1x1 convolution without bias, as a matrix product over the channel axis."""
  return nn.Dense(features, use_bias=False, kernel_init=torch_init, name=name)


class ReLUConvBN(nn.Module):
  """act -> k x k conv -> BN (DARTS' ReLUConvBN; the cells' preprocessing)."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  padding: int = 0
  affine: bool = True
  act: str = "relu"

  @nn.compact
  def __call__(self, x, train: bool):
    x = activation(self.act)(x)
    if self.kernel_size == 1 and self.stride == 1:
      x = pointwise(self.features)(x)
    else:
      p = self.padding
      x = nn.Conv(self.features, (self.kernel_size,) * 2, (self.stride,) * 2,
                  padding=((p, p), (p, p)), use_bias=False, kernel_init=torch_init)(x)
    return batch_norm(train, self.affine)(x)


class SepConv(nn.Module):
  """Separable conv applied twice: (act, depthwise, 1x1, BN) x 2; only the first strides.

  `in_edge_group`: the module runs in an edge group (`nn.vmap` over the edges that
  share its input), so the second depthwise convolution sees an input per edge.
  """
  features: int
  kernel_size: int
  stride: int
  padding: int
  affine: bool = True
  act: str = "relu"
  conv_pool_impl: str = "auto"
  in_edge_group: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    c_in = x.shape[-1]
    act = activation(self.act)
    x = DepthwiseConv(self.kernel_size, self.stride, self.padding, 1, self.conv_pool_impl,
                      "shared" if self.in_edge_group else "")(act(x))
    x = batch_norm(train, self.affine)(pointwise(c_in)(x))
    x = DepthwiseConv(self.kernel_size, 1, self.padding, 1, self.conv_pool_impl,
                      "per_edge" if self.in_edge_group else "")(act(x))
    return batch_norm(train, self.affine)(pointwise(self.features)(x))


class DilConv(nn.Module):
  """act -> dilated depthwise conv -> 1x1 conv -> BN.

  `in_edge_group`: the module runs in an edge group (`nn.vmap` over the edges that
  share its input).
  """
  features: int
  kernel_size: int
  stride: int
  padding: int
  dilation: int
  affine: bool = True
  act: str = "relu"
  conv_pool_impl: str = "auto"
  in_edge_group: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    x = activation(self.act)(x)
    x = DepthwiseConv(self.kernel_size, self.stride, self.padding, self.dilation,
                      self.conv_pool_impl, "shared" if self.in_edge_group else "")(x)
    return batch_norm(train, self.affine)(pointwise(self.features)(x))


class FactorizedReduce(nn.Module):
  """Halves the resolution: act, two stride-2 1x1 convs offset by one pixel, concat, BN."""
  features: int
  affine: bool = True
  act: str = "relu"

  @nn.compact
  def __call__(self, x, train: bool):
    if self.features % 2:
      raise ValueError(f"FactorizedReduce needs an even channel count, got {self.features}")
    x = activation(self.act)(x)
    a = pointwise(self.features // 2)(x[:, ::2, ::2])
    b = pointwise(self.features // 2)(x[:, 1::2, 1::2])
    return batch_norm(train, self.affine)(jnp.concatenate([a, b], axis=-1))


def max_pool_3x3(x, stride, conv_pool_impl: str = "auto"):
  """3x3 max pooling, padding 1, computed as `conv_pool_impl` says (cpu/dispatch.py)."""
  return dispatch.max_pool_3x3(conv_pool_impl, x, stride)


def avg_pool_3x3(x, stride):
  return nn.avg_pool(x, (3, 3), (stride, stride), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


class Op(nn.Module):
  """One named DARTS operation at `stride`, producing `features` channels.

  `pool_bn` appends a non-affine BN to the pools, as DARTS' MixedOp does in search.
  `in_edge_group`: it runs in an edge group, under `nn.vmap` over edges that share its input.
  `none` returns zeros of the output shape; `noise` (RobustDARTS' S4) standard
  normal noise of that shape, drawn from the "dropout" rng in training and in
  evaluation alike, as RobustDARTS' operation does.
  """
  op_name: str
  features: int
  stride: int
  affine: bool = True
  pool_bn: bool = False
  act: str = "relu"
  conv_pool_impl: str = "auto"
  in_edge_group: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    op, s, c = self.op_name, self.stride, self.features
    common = dict(affine=self.affine, act=self.act)
    dw = dict(conv_pool_impl=self.conv_pool_impl, in_edge_group=self.in_edge_group)
    if op == "none":
      return jnp.zeros_like(x[:, ::s, ::s])
    if op == "noise":
      return jax.random.normal(self.make_rng("dropout"), x[:, ::s, ::s].shape, x.dtype)
    if op in ("max_pool_3x3", "avg_pool_3x3"):
      y = max_pool_3x3(x, s, self.conv_pool_impl) if op == "max_pool_3x3" else avg_pool_3x3(x, s)
      return batch_norm(train, affine=False)(y) if self.pool_bn else y
    if op == "skip_connect":
      return x if s == 1 else FactorizedReduce(c, **common)(x, train)
    if op == "sep_conv_3x3":
      return SepConv(c, 3, s, 1, **common, **dw)(x, train)
    if op == "sep_conv_5x5":
      return SepConv(c, 5, s, 2, **common, **dw)(x, train)
    if op == "dil_conv_3x3":
      return DilConv(c, 3, s, 2, 2, **common, **dw)(x, train)
    if op == "dil_conv_5x5":
      return DilConv(c, 5, s, 4, 2, **common, **dw)(x, train)
    if op == "nor_conv_1x1":
      return ReLUConvBN(c, 1, s, 0, **common)(x, train)
    if op == "nor_conv_3x3":
      return ReLUConvBN(c, 3, s, 1, **common)(x, train)
    raise ValueError(f"unknown operation {op!r}")


class ResNetBlock(nn.Module):
  """NAS-Bench-201's reduction block: halves the resolution to `features` channels.

  Two act-conv3x3-BN layers (the first strided) added to a shortcut of 2x2
  average pooling and a 1x1 convolution, with affine batch norm, as the
  benchmark's ResNetBasicblock.
  """
  features: int
  act: str = "relu"

  @nn.compact
  def __call__(self, x, train: bool):
    y = ReLUConvBN(self.features, 3, 2, 1, act=self.act, name="conv_a")(x, train)
    y = ReLUConvBN(self.features, 3, 1, 1, act=self.act, name="conv_b")(y, train)
    return pointwise(self.features, name="shortcut")(nn.avg_pool(x, (2, 2), (2, 2))) + y


def is_identity(op: str, stride: int) -> bool:
  """Whether the op is a plain identity (DARTS skips drop-path for those)."""
  return op == "skip_connect" and stride == 1
