"""The one place that decides how the depthwise convolutions and max pooling run.

`conv_pool_impl` (a config field of the search and the retraining) is one of
IMPLS. "auto" keeps XLA's own operations on GPU and TPU and picks a
formulation for XLA:CPU by the device count, whether the C++ kernels build,
dtype, channels, kernel extent, map size and edge group at trace time
(`resolve`). "kernel" is the C++ kernels (kernels.py) for both the depthwise
convolutions and the max pooling; "conv", "shift" and "dense" are the
formulations of depthwise.py, with XLA's `reduce_window` pooling. The search
also asks `remat_ineffective` whether per-cell rematerialization pays under
this jax, and a checkpoint policy `is_kernel_call` whether an operation is one of
the C++ kernels.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from amended_darts_jax.cpu import depthwise, kernels
from amended_darts_jax.errors import ConfigError

IMPLS = ("auto", "conv", "kernel", "shift", "dense")
# Where a depthwise convolution sits in the supernet's edge groups (the `vmap`
# over the edges leaving one state): not in one, in one with the input shared
# by the edges (the first convolution of a sep_conv or dil_conv), or in one with
# an input per edge (the second convolution of a sep_conv).
EDGE_GROUP_PLACES = ("", "shared", "per_edge")

# On CPU the dense formulation does C times the work of a depthwise filter; above
# this many channels the shifted sum wins by 3-6x (experiments/depthwise_speed.py).
DENSE_MAX_CHANNELS = 32


def is_kernel_call(primitive) -> bool:
  """Whether `primitive` (as a checkpoint policy sees it) is one of the C++ kernels."""
  return primitive.name.startswith(kernels.PRIMITIVE_PREFIX)


def resolve(impl: str, kernel_size: int, channels: int = 0, edge_group: str = "",
            dilation: int = 1, size: int = 0, dtype=None) -> str:
  """The formulation `impl` means for a k x k kernel over `channels` on this backend.

  "auto" keeps XLA's grouped convolution on GPU/TPU. On CPU it takes the C++
  kernel for float32 and float64 (`dtype` None: float32) where it builds and
  there is one CPU device; its gradient is 3.9-12x faster than the pure-JAX
  forms' (experiments/depthwise_speed.py). Max pooling follows the same
  choice. With the batch sharded over several devices XLA's partitioner,
  which cannot split a custom call, would gather the whole batch on each.
  Otherwise "auto" on CPU takes the dense diagonal-kernel convolution up to
  DENSE_MAX_CHANNELS channels (as fast as the grouped one or faster, and it
  compiles faster than the shifted sum, whose k*k slices and their tangents
  each become a kernel) and the shifted sum above (3-6x faster than both at
  36-144 channels). In an edge group with an input per edge
  (`edge_group="per_edge"`) the dense form batches into a grouped
  convolution, slow on CPU, so "auto" takes the shifted sum there; with a
  shared input it batches into one convolution with more output channels.
  Where the kernel's extent, dilation * (k - 1) + 1, reaches the smaller side
  `size` of the input map (a 5x5 kernel on a 4x4 map, a dilated 5x5 on 8x8),
  XLA:CPU runs the dense convolution and its gradients off its fast library
  path, so "auto" takes the shifted sum there too (`size` 0: unknown, not
  checked). BUILD_NOTES.md has the measurements.
  """
  if impl not in IMPLS:
    raise ValueError(f"conv_pool_impl must be one of {IMPLS}, got {impl!r}")
  if edge_group not in EDGE_GROUP_PLACES:
    raise ValueError(f"edge_group must be one of {EDGE_GROUP_PLACES}, got {edge_group!r}")
  if impl == "kernel":
    if jax.default_backend() != "cpu":
      raise ConfigError("conv_pool_impl='kernel' is a CPU kernel; the backend is "
                        f"{jax.default_backend()} (use 'auto' or 'conv')")
    if not kernels.available():
      raise ConfigError("conv_pool_impl='kernel' could not be built: "
                        f"{kernels.why_unavailable().splitlines()[0]}")
    if dtype is not None and not kernels.supports(dtype):
      raise ConfigError(f"conv_pool_impl='kernel' takes float32 or float64, not {np.dtype(dtype)}")
  if impl == "auto":
    if jax.default_backend() != "cpu":
      return "conv"
    if (jax.device_count() == 1 and (dtype is None or kernels.supports(dtype))
        and kernels.available()):
      return "kernel"
    covers_map = bool(size) and dilation * (kernel_size - 1) + 1 >= size
    dense = edge_group != "per_edge" and channels <= DENSE_MAX_CHANNELS and not covers_map
    return "dense" if dense else "shift"
  return impl


def check(impl: str) -> None:
  """Checks `impl` on this backend and says in one log line whether "auto" takes the C++ kernels.

  Touches the backend: a multi-process run calls it after jax.distributed.initialize.
  """
  resolve(impl, 3)  # ConfigError where "kernel" cannot run
  if impl != "auto" or jax.default_backend() != "cpu":
    return
  if jax.device_count() > 1:
    logging.info("the C++ depthwise and max-pooling kernels are off: the batch is sharded over "
                 "%d devices and XLA cannot split a custom call; using the pure-JAX formulations",
                 jax.device_count())
  elif kernels.available():
    logging.info("the C++ depthwise and max-pooling kernels are on (one CPU device)")
  elif kernels.SWITCH_ENV in kernels.why_unavailable():  # a failed build warned already
    logging.info("the C++ depthwise and max-pooling kernels are off (%s); using the pure-JAX "
                 "formulations", kernels.why_unavailable())


def depthwise_conv(impl: str, x_NHWC, kernel_KKC, stride: int, pad: int, dilation: int,
                   edge_group: str = ""):
  """The depthwise convolution of x by kernel in the formulation `resolve` picks.

  In an edge group with a shared input the C++ kernel convolves all edges in
  one call and sums their input gradients itself (kernels.depthwise_conv_edges).
  """
  chosen = resolve(impl, kernel_KKC.shape[0], x_NHWC.shape[-1], edge_group, dilation,
                   min(x_NHWC.shape[-3:-1]), x_NHWC.dtype)
  if chosen == "kernel":
    fn = kernels.depthwise_conv_edges if edge_group == "shared" else kernels.depthwise_conv
  else:
    fn = {"shift": depthwise.shift, "conv": depthwise.grouped, "dense": depthwise.dense}[chosen]
  return fn(x_NHWC, kernel_KKC, stride, pad, dilation)


def max_pool_3x3(impl: str, x_NHWC, stride: int):
  """3x3 max pooling, padding 1: the C++ kernel where `impl` resolves to it, else
  `lax.reduce_window`."""
  if resolve(impl, 3, dtype=x_NHWC.dtype) == "kernel":
    return kernels.max_pool(x_NHWC, 3, stride, 1)
  return nn.max_pool(x_NHWC, (3, 3), (stride, stride), padding=((1, 1), (1, 1)))


def remat_ineffective() -> bool:
  """Whether per-cell rematerialization is known not to save memory here.

  jax 0.10's XLA:CPU schedules the recomputation as early as its inputs allow,
  so the saved activations live as long as without remat; those of jax 0.11
  and 0.12 do not (BUILD_NOTES.md).
  """
  major_minor = tuple(int(p) for p in jax.__version__.split(".")[:2])
  return jax.default_backend() == "cpu" and major_minor < (0, 11)
