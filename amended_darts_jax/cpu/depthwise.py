"""Depthwise convolution in three formulations of the same function and parameters.

`grouped` is XLA's grouped convolution (`feature_group_count=C`): what GPU and
TPU run, and 10-80x slower than the others on XLA:CPU. For XLA:CPU without the
C++ kernel (kernels.py) there are two pure-JAX forms: `dense`, a full
convolution with a diagonal kernel (C times the work, but on XLA:CPU's fast
convolution path), and `shift`, a sum of k*k shifted, strided slices with its
gradient written out. dispatch.py decides which one runs.

All take x (N, H, W, C), a kernel (k, k, C), the stride, the padding on each
side and the dilation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def out_size(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
  return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def grouped(x_NHWC, kernel_KKC, stride, pad, dilation):
  """Depthwise convolution as XLA's grouped convolution."""
  channels = x_NHWC.shape[-1]
  return jax.lax.conv_general_dilated(
      x_NHWC, kernel_KKC[:, :, None, :], (stride, stride), [(pad, pad), (pad, pad)],
      rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=channels)


def dense(x_NHWC, kernel_KKC, stride, pad, dilation):
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
def shift(x_NHWC, kernel_KKC, stride, pad, dilation):
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


def _shift_fwd(x_NHWC, kernel_KKC, stride, pad, dilation):
  return _shifted_sum(x_NHWC, kernel_KKC, stride, pad, dilation), (x_NHWC, kernel_KKC)


def _unshift(g_NHWC, i, j, padded_shape, stride, dilation):
  """The transpose of reading tap (i, j): g put back where the tap was read in the
  padded input (low padding i*dilation, interior stride-1, the rest high)."""
  spread = [(0, 0, 0)]
  for axis, offset in ((1, i * dilation), (2, j * dilation)):
    high = padded_shape[axis] - offset - (g_NHWC.shape[axis] - 1) * stride - 1
    spread.append((offset, high, stride - 1))
  return jax.lax.pad(g_NHWC, jnp.zeros((), g_NHWC.dtype), spread + [(0, 0, 0)])


def _shift_bwd(stride, pad, dilation, residuals, g_NHWC):
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


shift.defvjp(_shift_fwd, _shift_bwd)
