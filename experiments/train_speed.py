r"""Compile time and steps per second of the retraining step on synthetic batches.

  python experiments/train_speed.py                      # DARTS_V2, CIFAR-10 setting
  python experiments/train_speed.py --C=8 --layers=5 --batch=64 --size=8 --channels=1
  python experiments/train_speed.py --layers=8 --noscan_cells

Defaults are DARTS' CIFAR-10 retraining: DARTS_V2, 36 channels, 20 cells,
batch 96, 32x32x3, auxiliary head, drop-path 0.2. Prints one JSON line, with
the lowered program's size (`program_ops`, as in benchmark.py), the time to
trace and lower it (`lower_s`) and, included in `compile_s`, to compile.
"""

import functools
import json
import statistics
import time

from absl import app, flags
import jax
import numpy as np

import common
from amended_darts_jax import networks, spaces, train
from amended_darts_jax.configs import train_cifar10

_GENOTYPE = flags.DEFINE_string("genotype", "DARTS_V2", "Genotype name or genotype.json path.")
_C = flags.DEFINE_integer("C", 36, "Initial channels.")
_LAYERS = flags.DEFINE_integer("layers", 20, "Cells.")
_BATCH = flags.DEFINE_integer("batch", 96, "Batch size.")
_SIZE = flags.DEFINE_integer("size", 32, "Image height and width.")
_CHANNELS = flags.DEFINE_integer("channels", 3, "Image channels.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after one warm-up step.")
_SCAN = flags.DEFINE_bool("scan_cells", True, "Runs of identical cells as one scan.")


def main(argv):
  del argv
  cfg = train_cifar10.get_config()
  cfg.genotype, cfg.init_channels, cfg.layers = _GENOTYPE.value, _C.value, _LAYERS.value
  cfg.scan_cells = "on" if _SCAN.value else "off"
  genotype = spaces.get_genotype(cfg.genotype)
  model = train.make_model(cfg, genotype, 10)
  tc = train.train_config(cfg, model, 500)
  tx = tc.tx
  shape = (_SIZE.value, _SIZE.value, _CHANNELS.value)
  state = train.initial_state(cfg, model, tx, shape)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(_BATCH.value, *shape)).astype(np.float32),
           "label": rng.integers(0, 10, _BATCH.value).astype(np.int32)}
  t0 = time.perf_counter()
  lowered = jax.jit(functools.partial(train.train_step, tc), donate_argnums=0).lower(state, batch)
  lower_s = time.perf_counter() - t0
  step = lowered.compile()
  compile_s = time.perf_counter() - t0
  state, _ = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  print(json.dumps(dict(genotype=_GENOTYPE.value, C=_C.value, layers=_LAYERS.value,
                        batch=_BATCH.value, image=list(shape), scan_cells=_SCAN.value,
                        cell_runs=model.cell_runs, params=networks.count_params(state.params),
                        program_ops=common.program_ops(lowered), lower_s=round(lower_s, 1),
                        compile_s=round(compile_s, 1), median_step_s=round(median, 3),
                        steps_per_s=round(1.0 / median, 4),
                        loss_finite=bool(np.isfinite(float(metrics["train_loss"]))),
                        backend=jax.default_backend())))


if __name__ == "__main__":
  app.run(main)
