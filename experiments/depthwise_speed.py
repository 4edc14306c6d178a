r"""Forward+backward time of one depthwise convolution per formulation, side by side.

  python experiments/depthwise_speed.py [--batch=96] [--impls=kernel,dense,shift,conv]

For the channel counts and map sizes of DARTS' CIFAR networks (36 channels at
32x32, 72 at 16x16, 144 at 8x8) and kernels 3 and 5: the C++ kernel of
`kernels.py` (CPU only), the dense diagonal-kernel convolution, the shifted
sum and XLA's grouped convolution. The gradient of a squared sum, in (input,
kernel); all formulations are compiled first, then timed in `--rounds`
interleaved rounds (so machine noise hits them alike). Median in milliseconds,
one JSON line per shape.
"""

import json
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from amended_darts_jax.cpu import depthwise, kernels

_BATCH = flags.DEFINE_integer("batch", 96, "Batch size.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds after one warm-up.")
_IMPLS = flags.DEFINE_list("impls", ["kernel", "dense", "shift", "conv"], "Formulations.")
_SHAPES = ((36, 32), (72, 16), (144, 8))
_FNS = {"kernel": kernels.depthwise_conv, "dense": depthwise.dense,
        "shift": depthwise.shift, "conv": depthwise.grouped}


def main(argv):
  del argv
  unknown = [i for i in _IMPLS.value if i not in _FNS]
  if unknown:
    raise app.UsageError(f"unknown --impls {unknown}; known: {', '.join(_FNS)}")
  if "kernel" in _IMPLS.value and not (jax.default_backend() == "cpu" and
                                       kernels.available()):
    raise app.UsageError("the C++ kernel needs the CPU backend and a C++ compiler: "
                         f"{kernels.why_unavailable() or jax.default_backend()}")
  for channels, size in _SHAPES:
    for k in (3, 5):
      x = jax.random.normal(jax.random.PRNGKey(0), (_BATCH.value, size, size, channels))
      w = jax.random.normal(jax.random.PRNGKey(1), (k, k, channels))
      grads = {}
      for name in _IMPLS.value:
        fn = _FNS[name]
        grads[name] = jax.jit(jax.grad(
            lambda x, w, fn=fn: jnp.sum(fn(x, w, 1, k // 2, 1) ** 2), (0, 1)))
        jax.block_until_ready(grads[name](x, w))
      times = {name: [] for name in grads}
      for _ in range(_ROUNDS.value):
        for name, grad in grads.items():
          t0 = time.perf_counter()
          jax.block_until_ready(grad(x, w))
          times[name].append(time.perf_counter() - t0)
      row = dict(channels=channels, size=size, kernel=k, batch=_BATCH.value)
      row.update({f"{name}_ms": round(statistics.median(t) * 1000, 2) for name, t in times.items()})
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
