r"""Compile and step time of one supernet forward+backward, per depthwise formulation.

Measures `jax.grad` of the cross-entropy in (omega, alpha) through the supernet
in train mode, jitted, for each `--impls` formulation of the depthwise
convolutions, side by side in one run. Defaults: the `darts` space at C=16,
8 layers, batch 64, 32x32x3 (DARTS' CIFAR-10 search network).

  python experiments/supernet_speed.py [--impls=dense,shift,conv] [--steps=5]

`dense` (a full convolution with a block-diagonal kernel) is what
`depthwise_impl="auto"` picks on CPU; `conv` is the grouped convolution
(`feature_group_count=C`) used on GPU/TPU.
"""

import json
import time

from absl import app, flags
import jax
import numpy as np
import optax

from amended_darts_jax import ops, supernet

_SPACE = flags.DEFINE_string("space", "darts", "Search space.")
_C = flags.DEFINE_integer("C", 16, "Initial channels.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Cells.")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size.")
_SIZE = flags.DEFINE_integer("size", 32, "Image height and width.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up step.")
_IMPLS = flags.DEFINE_list("impls", ["dense", "shift", "conv"], "Depthwise formulations to compare.")


def measure(impl):
  model = supernet.Supernet(_SPACE.value, C=_C.value, layers=_LAYERS.value, num_classes=10,
                            depthwise_impl=impl)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (_BATCH.value, _SIZE.value, _SIZE.value, 3))
  y = jax.random.randint(key, (_BATCH.value,), 0, 10)
  alpha = model.init_alpha(key)
  variables = ops.init_variables(model, 0, x[:2], alpha, train=False)

  @jax.jit
  def grad_step(params, stats, alpha, x, y):
    def loss(p, a):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, x, a, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    (l, upd), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, alpha)
    return l, grads, upd

  args = (variables["params"], variables["batch_stats"], alpha, x, y)
  t0 = time.perf_counter()
  compiled = grad_step.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return dict(impl=impl, space=_SPACE.value, C=_C.value, layers=_LAYERS.value,
              batch=_BATCH.value, size=_SIZE.value, compile_s=round(compile_s, 2),
              median_step_s=round(float(np.median(times)), 4), backend=jax.default_backend())


def main(argv):
  del argv
  rows = []
  for impl in _IMPLS.value:
    rows.append(measure(impl))
    print(json.dumps(rows[-1]), flush=True)
  base = rows[-1]
  for row in rows[:-1]:
    print(f"step time {row['impl']} / {base['impl']} = "
          f"{row['median_step_s'] / base['median_step_s']:.3f}")


if __name__ == "__main__":
  app.run(main)
