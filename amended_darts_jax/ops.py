"""The eight DARTS operations as Flax Linen modules (NHWC).

They follow DARTS' reference definitions: activation-conv-BN order, separable
convolutions applied twice, dilated convolutions with dilation 2, factorized
reduce for a strided skip, average pooling that does not count padding. Weights
are initialised as PyTorch does (uniform in +-1/sqrt(fan_in)) so that search
dynamics match.

Depthwise convolutions have four formulations with the same parameters: XLA's
grouped convolution (`feature_group_count=C`), fast on GPU/TPU but 10-80x slow
on XLA:CPU; a C++ kernel for XLA:CPU (`cpu_kernels.py`, compiled on first use);
a sum of k*k shifted multiplies; and a full convolution with a diagonal kernel.
`depthwise_impl="auto"` picks by backend, whether the C++ kernel builds, dtype,
channels, kernel extent and map size at trace time (`resolve_depthwise_impl`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from amended_darts_jax import cpu_kernels
from amended_darts_jax.errors import ConfigError

# PyTorch's default for conv and linear weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
  """PyTorch's default bias of a linear layer: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


# A submodule whose name starts with this holds its variables stacked along a
# leading axis (`nn.vmap`, e.g. the edges leaving one state in a supernet cell).
STACKED_PREFIX = "stacked_"


def _kernel_fan_in(shape) -> int:
  if len(shape) == 3:  # depthwise (k, k, C): each output sees a k x k window
    return shape[0] * shape[1]
  return int(np.prod(shape[:-1]))  # HWIO conv or (in, out) dense


def init_variables(module: nn.Module, seed: int, *args, **kwargs) -> dict[str, Any]:
  """`module.init` without compiling it: shapes by tracing, values drawn on the host.

  Compiling `init` costs more than the training step here (a random-number
  program per parameter; longer than a step for a 3-cell supernet on CPU). The
  values follow the same rules the modules declare: kernels U(+-1/sqrt(fan_in))
  (`torch_init`), a dense bias U(+-1/sqrt(fan_in)) of its kernel, batch-norm
  scale 1 and bias 0, running mean 0 and variance 1.
  """
  key = jax.random.PRNGKey(0)  # shapes only; "dropout" serves drop-path in train mode
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs),
                          {"params": key, "dropout": key}, *args)
  rng = np.random.default_rng(seed)

  def fill(collection, tree, stacked=False):
    # Under a stacked module each slice along the first axis is one module's variable.
    def uniform_fan_in(shape, kernel_shape):  # U(+-1/sqrt(fan_in)) of that kernel
      bound = 1.0 / np.sqrt(_kernel_fan_in(kernel_shape[1:] if stacked else kernel_shape))
      return rng.uniform(-bound, bound, shape)

    out = {}
    for name, leaf in tree.items():
      if isinstance(leaf, dict):
        out[name] = fill(collection, leaf, stacked or name.startswith(STACKED_PREFIX))
        continue
      shape, dtype = leaf.shape, leaf.dtype
      if collection == "batch_stats":
        value = np.ones(shape) if name == "var" else np.zeros(shape)
      elif name == "kernel":
        value = uniform_fan_in(shape, shape)
      elif name == "bias" and "kernel" in tree:
        value = uniform_fan_in(shape, tree["kernel"].shape)
      elif name == "scale":
        value = np.ones(shape)
      elif name == "bias":
        value = np.zeros(shape)
      else:
        raise ValueError(f"init_variables has no rule for parameter {name!r}")
      out[name] = jnp.asarray(value, dtype)
    return out

  return {collection: fill(collection, tree) for collection, tree in shapes.items()}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    # Smooth stand-ins, for comparisons of exact and finite-difference products.
    "softplus": nn.softplus,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
}
DEPTHWISE_IMPLS = ("auto", "conv", "kernel", "shift", "dense")


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}") from None


# On CPU the dense formulation does C times the work of a depthwise filter; above
# this many channels the shifted sum wins by 3-6x (experiments/depthwise_speed.py).
DENSE_MAX_CHANNELS = 32


def resolve_depthwise_impl(impl: str, kernel_size: int, channels: int = 0,
                           shared_input: bool = True, dilation: int = 1,
                           size: int = 0, dtype=None) -> str:
  """The formulation `impl` means for a k x k kernel over `channels` on this backend.

  "auto" keeps XLA's grouped convolution on GPU/TPU. On CPU it takes the C++
  kernel (`cpu_kernels.py`) for float32 and float64 (`dtype` None: float32)
  where it builds and there is one CPU device; its gradient is 3.9-12x faster
  than the pure-JAX forms' (experiments/depthwise_speed.py). Max pooling
  follows the same choice (`max_pool_3x3`). With the batch
  sharded over several devices XLA's partitioner, which cannot split a custom
  call, would gather the whole batch on each. Otherwise "auto" on CPU takes the
  dense diagonal-kernel convolution up to DENSE_MAX_CHANNELS channels (as fast as the
  grouped one or faster, and it compiles faster than the shifted sum, whose
  k*k slices and their tangents each become a kernel) and the shifted sum above
  (3-6x faster than both at 36-144 channels). Under a `vmap` over kernels whose
  input is batched as well (`shared_input=False`) the dense form batches into a
  grouped convolution, slow on CPU, so "auto" takes the shifted sum there; with a
  shared input it batches into one convolution with more output channels.
  Where the kernel's extent, dilation * (k - 1) + 1, reaches the smaller side
  `size` of the input map (a 5x5 kernel on a 4x4 map, a dilated 5x5 on 8x8), XLA:CPU
  runs the dense convolution and its gradients off its fast library path, so
  "auto" takes the shifted sum there too (`size` 0: unknown, not checked).
  BUILD_NOTES.md has the measurements.
  """
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
  if impl == "kernel":
    if jax.default_backend() != "cpu":
      raise ConfigError("depthwise_impl='kernel' is a CPU kernel; the backend is "
                        f"{jax.default_backend()} (use 'auto' or 'conv')")
    if not cpu_kernels.available():
      raise ConfigError("depthwise_impl='kernel' could not be built: "
                        f"{cpu_kernels.why_unavailable().splitlines()[0]}")
    if dtype is not None and not cpu_kernels.supports(dtype):
      raise ConfigError(f"depthwise_impl='kernel' takes float32 or float64, not {np.dtype(dtype)}")
  if impl == "auto":
    if jax.default_backend() != "cpu":
      return "conv"
    if (jax.device_count() == 1 and (dtype is None or cpu_kernels.supports(dtype))
        and cpu_kernels.available()):
      return "kernel"
    covers_map = bool(size) and dilation * (kernel_size - 1) + 1 >= size
    dense = shared_input and channels <= DENSE_MAX_CHANNELS and not covers_map
    return "dense" if dense else "shift"
  return impl


def check_depthwise_impl(impl: str) -> None:
  """Checks `impl` on this backend and says in one log line whether "auto" takes the C++ kernels.

  Touches the backend: a multi-process run calls it after jax.distributed.initialize.
  """
  resolve_depthwise_impl(impl, 3)  # ConfigError where "kernel" cannot run
  if impl != "auto" or jax.default_backend() != "cpu":
    return
  if jax.device_count() > 1:
    logging.info("the C++ depthwise and max-pooling kernels are off: the batch is sharded over "
                 "%d devices and XLA cannot split a custom call; using the pure-JAX formulations",
                 jax.device_count())
  elif cpu_kernels.available():
    logging.info("the C++ depthwise and max-pooling kernels are on (one CPU device)")
  elif cpu_kernels.SWITCH_ENV in cpu_kernels.why_unavailable():  # a failed build warned already
    logging.info("the C++ depthwise and max-pooling kernels are off (%s); using the pure-JAX "
                 "formulations", cpu_kernels.why_unavailable())


def out_size(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
  return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def depthwise_conv_grouped(x_NHWC, kernel_KKC, stride, pad, dilation):
  """Depthwise convolution as XLA's grouped convolution."""
  channels = x_NHWC.shape[-1]
  return jax.lax.conv_general_dilated(
      x_NHWC, kernel_KKC[:, :, None, :], (stride, stride), [(pad, pad), (pad, pad)],
      rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=channels)


def depthwise_conv_dense(x_NHWC, kernel_KKC, stride, pad, dilation):
  """The same depthwise convolution as a full convolution with a diagonal kernel."""
  channels = x_NHWC.shape[-1]
  kernel_KKCC = kernel_KKC[:, :, :, None] * jnp.eye(channels, dtype=kernel_KKC.dtype)
  return jax.lax.conv_general_dilated(
      x_NHWC, kernel_KKCC, (stride, stride), [(pad, pad), (pad, pad)],
      rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _shifted_taps(xp_NHWC, k, out_shape, stride, dilation):
  """(i, j, tap) for the k*k strided slices of the padded input that tap (i, j) reads."""
  n, h_out, w_out, c = out_shape
  for i in range(k):
    for j in range(k):
      start = (0, i * dilation, j * dilation, 0)
      limit = (n, i * dilation + (h_out - 1) * stride + 1,
               j * dilation + (w_out - 1) * stride + 1, c)
      yield i, j, jax.lax.slice(xp_NHWC, start, limit, (1, stride, stride, 1))


def _pad_same(x_NHWC, pad):
  return jnp.pad(x_NHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _shifted_sum(x_NHWC, kernel_KKC, stride, pad, dilation):
  k = kernel_KKC.shape[0]
  n, h, w, c = x_NHWC.shape
  out_shape = (n, out_size(h, k, stride, pad, dilation), out_size(w, k, stride, pad, dilation), c)
  out = None
  for i, j, tap in _shifted_taps(_pad_same(x_NHWC, pad), k, out_shape, stride, dilation):
    out = tap * kernel_KKC[i, j] if out is None else out + tap * kernel_KKC[i, j]
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_conv_shift(x_NHWC, kernel_KKC, stride, pad, dilation):
  """The same depthwise convolution as a sum of k*k shifted, strided slices.

  Its VJP is written out: differentiated as it stands, every tap's slice is kept
  for the backward pass (k*k times the input's memory, and as many writes in the
  forward pass); the rule below keeps only the input and slices it again in the
  backward pass, where XLA fuses each slice into its reduction. The rule is
  itself differentiable, so forward-over-reverse products (`jax.jvp` of
  `jax.grad`) see exact second derivatives; forward mode on the convolution
  alone is what `jax.custom_vjp` does not allow.
  """
  return _shifted_sum(x_NHWC, kernel_KKC, stride, pad, dilation)


def _depthwise_conv_shift_fwd(x_NHWC, kernel_KKC, stride, pad, dilation):
  return _shifted_sum(x_NHWC, kernel_KKC, stride, pad, dilation), (x_NHWC, kernel_KKC)


def _unshift(g_NHWC, i, j, padded_shape, stride, dilation):
  """The transpose of reading tap (i, j): g put back where the tap was read in the
  padded input (low padding i*dilation, interior stride-1, the rest high)."""
  spread = [(0, 0, 0)]
  for axis, offset in ((1, i * dilation), (2, j * dilation)):
    high = padded_shape[axis] - offset - (g_NHWC.shape[axis] - 1) * stride - 1
    spread.append((offset, high, stride - 1))
  return jax.lax.pad(g_NHWC, jnp.zeros((), g_NHWC.dtype), spread + [(0, 0, 0)])


def _depthwise_conv_shift_bwd(stride, pad, dilation, residuals, g_NHWC):
  x_NHWC, kernel_KKC = residuals
  k = kernel_KKC.shape[0]
  xp = _pad_same(x_NHWC, pad)
  dkernel_TC, dxp = [], None
  for i, j, tap in _shifted_taps(xp, k, g_NHWC.shape, stride, dilation):
    dkernel_TC.append((tap * g_NHWC).sum((0, 1, 2)))  # d out / d kernel[i, j] = tap
    term = _unshift(g_NHWC * kernel_KKC[i, j], i, j, xp.shape, stride, dilation)  # d out / d tap
    dxp = term if dxp is None else dxp + term
  dx = dxp[:, pad:pad + x_NHWC.shape[1], pad:pad + x_NHWC.shape[2], :]
  return dx, jnp.stack(dkernel_TC).reshape(kernel_KKC.shape)


depthwise_conv_shift.defvjp(_depthwise_conv_shift_fwd, _depthwise_conv_shift_bwd)


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution without bias; `impl` picks the formulation.

  `shared_input=False` says the module runs under a `vmap` whose input is
  batched too (resolve_depthwise_impl). `edge_shared=True` says it runs under
  the edge group's `vmap` with the input shared by the edges: the C++ kernel
  then convolves all edges in one call and sums their input gradients itself
  (cpu_kernels.depthwise_conv_edges).
  """
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  impl: str = "auto"
  shared_input: bool = True
  edge_shared: bool = False

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    # fan_in of a depthwise filter is k*k, as PyTorch's grouped conv counts it.
    kernel = self.param("kernel", lambda key, shape: torch_init(key, (k, k, 1, shape[-1]))[:, :, 0],
                        (k, k, x.shape[-1]))
    kernel_fn = cpu_kernels.depthwise_conv_edges if self.edge_shared else cpu_kernels.depthwise_conv
    fn = {"shift": depthwise_conv_shift, "conv": depthwise_conv_grouped,
          "dense": depthwise_conv_dense, "kernel": kernel_fn}[
              resolve_depthwise_impl(self.impl, k, x.shape[-1], self.shared_input,
                                     self.dilation, min(x.shape[-3:-1]), x.dtype)]
    return fn(x, kernel.astype(x.dtype), self.stride, self.padding, self.dilation)


def pointwise(features: int, name: str | None = None) -> nn.Dense:
  """A 1x1 convolution without bias, as a matrix product over the channel axis."""
  return nn.Dense(features, use_bias=False, kernel_init=torch_init, name=name)


class BatchNorm(nn.Module):
  """Batch normalization over every axis but the last: flax's `nn.BatchNorm`
  (fast variance E[x^2] - E[x]^2, clipped at 0; running averages of the mean
  and the biased variance, not updated at init; the same variables, `mean` and
  `var` in `batch_stats`, `scale` and `bias` in `params` when affine, so
  checkpoints are interchangeable), with its per-channel values broadcast as
  one stack.

  The per-channel mean, multiplier and bias reach the map through one broadcast
  of their stack, so the gradient's sums over the map (the transposes of those
  broadcasts) are one reduction, and so are their tangents in
  forward-over-reverse products, where flax's separate broadcasts give one
  reduction each. The arithmetic is flax's: y = (x - mean) * rsqrt(var + eps)
  * scale + bias. (Stacking the two statistics' reductions as well made more
  kernels and slower steps on XLA:CPU: the stack copies the map, where XLA
  already takes both means in one pass.)
  """
  use_running_average: bool
  affine: bool
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      axes = tuple(range(x.ndim - 1))
      mean, mean2 = jnp.mean(xf, axes), jnp.mean(xf * xf, axes)
      var = jnp.maximum(0.0, mean2 - mean * mean)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    mul = jax.lax.rsqrt(var + self.epsilon)
    params, per_channel = [], [mean, mul]
    if self.affine:
      scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
      bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
      params, per_channel = [scale, bias], [mean, mul * scale, bias]
    k = len(per_channel)
    stacked_KC = jnp.stack(per_channel)
    on_map = jnp.broadcast_to(stacked_KC.reshape(k, *[1] * (x.ndim - 1), c), (k, *x.shape))
    y = (x - on_map[0]) * on_map[1]
    if self.affine:
      y = y + on_map[2]
    return y.astype(jnp.result_type(x, *params))


def batch_norm(train: bool, affine: bool, name: str | None = None) -> BatchNorm:
  """PyTorch's BatchNorm2d defaults: momentum 0.1 (flax: 0.9), eps 1e-5."""
  return BatchNorm(use_running_average=not train, affine=affine, name=name)


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

  `edge_batched`: the module runs under `nn.vmap` over edges that share its input,
  so the second depthwise convolution sees a different input per edge.
  """
  features: int
  kernel_size: int
  stride: int
  padding: int
  affine: bool = True
  act: str = "relu"
  depthwise_impl: str = "auto"
  edge_batched: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    c_in = x.shape[-1]
    act = activation(self.act)
    x = DepthwiseConv(self.kernel_size, self.stride, self.padding, 1, self.depthwise_impl,
                      edge_shared=self.edge_batched)(act(x))
    x = batch_norm(train, self.affine)(pointwise(c_in)(x))
    x = DepthwiseConv(self.kernel_size, 1, self.padding, 1, self.depthwise_impl,
                      shared_input=not self.edge_batched)(act(x))
    return batch_norm(train, self.affine)(pointwise(self.features)(x))


class DilConv(nn.Module):
  """act -> dilated depthwise conv -> 1x1 conv -> BN.

  `edge_batched`: the module runs under `nn.vmap` over edges that share its input.
  """
  features: int
  kernel_size: int
  stride: int
  padding: int
  dilation: int
  affine: bool = True
  act: str = "relu"
  depthwise_impl: str = "auto"
  edge_batched: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    x = activation(self.act)(x)
    x = DepthwiseConv(self.kernel_size, self.stride, self.padding, self.dilation,
                      self.depthwise_impl, edge_shared=self.edge_batched)(x)
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


def max_pool_3x3(x, stride, impl: str = "auto"):
  """3x3 max pooling, padding 1; the C++ kernel where `impl` resolves to it (as the
  depthwise convolutions do), else `lax.reduce_window`."""
  if resolve_depthwise_impl(impl, 3, dtype=x.dtype) == "kernel":
    return cpu_kernels.max_pool(x, 3, stride, 1)
  return nn.max_pool(x, (3, 3), (stride, stride), padding=((1, 1), (1, 1)))


def avg_pool_3x3(x, stride):
  return nn.avg_pool(x, (3, 3), (stride, stride), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


class Op(nn.Module):
  """One named DARTS operation at `stride`, producing `features` channels.

  `pool_bn` appends a non-affine BN to the pools, as DARTS' MixedOp does in search.
  `edge_batched`: it runs under `nn.vmap` over edges that share its input (SepConv, DilConv).
  `none` returns zeros of the output shape.
  """
  op_name: str
  features: int
  stride: int
  affine: bool = True
  pool_bn: bool = False
  act: str = "relu"
  depthwise_impl: str = "auto"
  edge_batched: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    op, s, c = self.op_name, self.stride, self.features
    common = dict(affine=self.affine, act=self.act)
    dw = dict(depthwise_impl=self.depthwise_impl)
    if op == "none":
      return jnp.zeros_like(x[:, ::s, ::s])
    if op in ("max_pool_3x3", "avg_pool_3x3"):
      y = max_pool_3x3(x, s, self.depthwise_impl) if op == "max_pool_3x3" else avg_pool_3x3(x, s)
      return batch_norm(train, affine=False)(y) if self.pool_bn else y
    if op == "skip_connect":
      return x if s == 1 else FactorizedReduce(c, **common)(x, train)
    if op == "sep_conv_3x3":
      return SepConv(c, 3, s, 1, **common, **dw, edge_batched=self.edge_batched)(x, train)
    if op == "sep_conv_5x5":
      return SepConv(c, 5, s, 2, **common, **dw, edge_batched=self.edge_batched)(x, train)
    if op == "dil_conv_3x3":
      return DilConv(c, 3, s, 2, 2, **common, **dw, edge_batched=self.edge_batched)(x, train)
    if op == "dil_conv_5x5":
      return DilConv(c, 5, s, 4, 2, **common, **dw, edge_batched=self.edge_batched)(x, train)
    raise ValueError(f"unknown operation {op!r}")


def is_identity(op: str, stride: int) -> bool:
  """Whether the op is a plain identity (DARTS skips drop-path for those)."""
  return op == "skip_connect" and stride == 1
