"""Batch normalization as DARTS uses it (PyTorch's BatchNorm2d defaults), with its
per-channel values broadcast as one stack."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


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
