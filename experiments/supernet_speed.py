r"""Compile time, step time and XLA memory of one supernet forward+backward.

Measures `jax.grad` of the cross-entropy in (omega, alpha) through the supernet
in train mode, jitted, for each `--impls` formulation of the depthwise
convolutions and each `--edge_groups` cell layout, compiled in one process and
timed in interleaved rounds. Defaults: the `darts` space at C=16, 8 layers,
batch 64, 32x32x3 (DARTS' CIFAR-10 search network).

  python experiments/supernet_speed.py [--impls=dense,shift,conv] [--steps=5]
  python experiments/supernet_speed.py --C=8 --layers=2 --batch=16 --size=16 \
      --impls=auto,shift,dense --edge_groups=true,false

`dense` (a full convolution with a block-diagonal kernel) is what
`conv_pool_impl="auto"` picks on CPU; `conv` is the grouped convolution
(`feature_group_count=C`) used on GPU/TPU.
"""

import json
import time

from absl import app, flags
import jax
import numpy as np
import optax

import common
from amended_darts_jax import initializers, supernet

_SPACE = flags.DEFINE_string("space", "darts", "Search space.")
_C = flags.DEFINE_integer("C", 16, "Initial channels.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Cells.")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size.")
_SIZE = flags.DEFINE_integer("size", 32, "Image height and width.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up step.")
_IMPLS = flags.DEFINE_list("impls", ["dense", "shift", "conv"], "Depthwise formulations to "
                           "compare (also: kernel, auto).")
_BATCH_EDGES = flags.DEFINE_list("edge_groups", ["true"], "Cell layouts: true (edge groups), "
                                 "false (one op per edge), or both.")


def compile_one(impl, edge_groups):
  """(row, run): the compiled gradient's record and a function that times one call."""
  model = supernet.Supernet(_SPACE.value, C=_C.value, layers=_LAYERS.value, num_classes=10,
                            conv_pool_impl=impl, edge_groups=edge_groups)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (_BATCH.value, _SIZE.value, _SIZE.value, 3))
  y = jax.random.randint(key, (_BATCH.value,), 0, 10)
  alpha = model.init_alpha(key)
  variables = initializers.init_variables(model, 0, x[:2], alpha, train=False)

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

  def run():
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t0

  temp_mb = getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0) / 2**20
  return dict(impl=impl, edge_groups=edge_groups, space=_SPACE.value, C=_C.value,
              layers=_LAYERS.value, batch=_BATCH.value, size=_SIZE.value,
              compile_s=round(compile_s, 2), xla_temp_mb=round(temp_mb, 1),
              backend=jax.default_backend()), run


def main(argv):
  del argv
  variants = []
  for edges in common.switches("edge_groups", _BATCH_EDGES.value):
    for impl in _IMPLS.value:
      row, run = compile_one(impl, edges)
      print(json.dumps(row), flush=True)
      variants.append((row, run, []))
  for _ in range(_STEPS.value):  # interleaved, so machine noise hits all variants alike
    for _, run, times in variants:
      times.append(run())
  for row, _, times in variants:
    row["median_step_s"] = round(float(np.median(times)), 4)
    print(json.dumps(row), flush=True)
  base = variants[-1][0]
  for row, _, _ in variants[:-1]:
    print(f"step time {row['impl']}, edge_groups={row['edge_groups']} / {base['impl']}, "
          f"edge_groups={base['edge_groups']} = "
          f"{row['median_step_s'] / base['median_step_s']:.3f}")


if __name__ == "__main__":
  app.run(main)
