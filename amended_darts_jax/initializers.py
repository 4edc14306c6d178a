"""PyTorch's initialisation for the Flax modules, and drawing it on the host.

The modules declare `torch_init` and `torch_bias_init` (uniform in
+-1/sqrt(fan_in), PyTorch's default for convolutions and linear layers), so
that search dynamics match DARTS'. `init_variables` draws the same values
without compiling `module.init`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# PyTorch's default for conv and linear weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
  """PyTorch's default bias of a linear layer: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


# A submodule whose name starts with this holds its variables stacked along a
# leading axis (`nn.vmap` or `nn.scan`: the edges leaving one state in a supernet
# cell, a run of cells); stacked submodules nest, one axis each.
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

  def fill(collection, tree, stacked=0):
    # Under `stacked` stacked modules each slice along the first `stacked` axes is
    # one module's variable.
    def uniform_fan_in(shape, kernel_shape):  # U(+-1/sqrt(fan_in)) of that kernel
      bound = 1.0 / np.sqrt(_kernel_fan_in(kernel_shape[stacked:]))
      return rng.uniform(-bound, bound, shape)

    out = {}
    for name, leaf in tree.items():
      if isinstance(leaf, dict):
        out[name] = fill(collection, leaf, stacked + name.startswith(STACKED_PREFIX))
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

  # Variables only: what a module sows (the supernet's auxiliary logits) is output.
  return {collection: fill(collection, tree) for collection, tree in shapes.items()
          if collection in ("params", "batch_stats")}
