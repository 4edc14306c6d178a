r"""Forward+backward time of one depthwise convolution per formulation, side by side.

  python experiments/depthwise_speed.py [--batch=96]

For the channel counts and map sizes of DARTS' CIFAR networks (36 channels at
32x32, 72 at 16x16, 144 at 8x8) and kernels 3 and 5: the dense diagonal-kernel
convolution, the shifted sum and XLA's grouped convolution. Median of 5 runs
after one warm-up, in milliseconds, one JSON line per shape.
"""

import json
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from amended_darts_jax import ops

_BATCH = flags.DEFINE_integer("batch", 96, "Batch size.")
_SHAPES = ((36, 32), (72, 16), (144, 8))


def main(argv):
  del argv
  impls = (("dense", ops.depthwise_conv_dense), ("shift", ops.depthwise_conv_shift),
           ("conv", ops.depthwise_conv_grouped))
  for channels, size in _SHAPES:
    for k in (3, 5):
      x = jax.random.normal(jax.random.PRNGKey(0), (_BATCH.value, size, size, channels))
      w = jax.random.normal(jax.random.PRNGKey(1), (k, k, channels))
      row = dict(channels=channels, size=size, kernel=k, batch=_BATCH.value)
      for name, fn in impls:
        grad = jax.jit(jax.grad(
            lambda x, w, fn=fn: jnp.sum(fn(x, w, 1, k // 2, 1) ** 2), (0, 1)))
        jax.block_until_ready(grad(x, w))
        times = []
        for _ in range(5):
          t0 = time.perf_counter()
          jax.block_until_ready(grad(x, w))
          times.append(time.perf_counter() - t0)
        row[f"{name}_ms"] = round(sorted(times)[2] * 1000, 1)
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
