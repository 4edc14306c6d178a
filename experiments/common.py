"""Named network sizes and a synthetic search setup shared by the benchmark scripts.

Batches are random and in memory, so nothing here needs tensorflow-datasets.
"""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from amended_darts_jax import search
from amended_darts_jax.configs import default

SIZES = {
    # The default search's own network and batch (configs/default.py: the 8x8 digits).
    "digits": dict(space="s2", C=8, layers=5, batch=64, image=(8, 8, 1), classes=10),
    "tiny": dict(space="s2", C=8, layers=2, batch=16, image=(16, 16, 3), classes=10),
    "darts_search": dict(space="darts", C=16, layers=8, batch=64, image=(32, 32, 3), classes=10),
    "s2_search": dict(space="s2", C=16, layers=20, batch=64, image=(32, 32, 3), classes=10),
    # The two sizes of the PyTorch DARTS comparison (experiments/pytorch_darts.py).
    "tiny_darts": dict(space="darts", C=8, layers=2, batch=16, image=(16, 16, 3), classes=10),
    "darts_5": dict(space="darts", C=16, layers=5, batch=32, image=(32, 32, 3), classes=10),
}


CIFAR10_SEARCH_IMAGES = 25_000  # DARTS' search: half of CIFAR-10's training set trains omega


def step_flops(compiled) -> float:
  """XLA's count of one call's floating-point operations (0 where the backend has none)."""
  return float((compiled.cost_analysis() or {}).get("flops", 0.0))


def program_ops(lowered) -> int:
  """Operations in a lowered program: the lines of its StableHLO text that define
  values or end a region (constants and loop bodies included, as XLA receives them)."""
  return sum(1 for line in lowered.as_text().splitlines()
             if " = " in line or line.lstrip().startswith(("stablehlo.return", "func.return",
                                                          "return")))


def epoch_minutes(step_s: float, batch: int, images: int = CIFAR10_SEARCH_IMAGES) -> float:
  """Minutes for one search epoch over `images` training images at `step_s` a step."""
  return math.ceil(images / batch) * step_s / 60


def switches(flag: str, values: list[str]) -> list[bool]:
  """A list flag of booleans (`--remat=false,true`) as bools; anything else exits with
  one sentence."""
  known = {"true": True, "false": False}
  if not values or any(v not in known for v in values):
    sys.exit(f"error: --{flag} takes true and/or false, got {','.join(values) or 'nothing'}")
  return [known[v] for v in values]


def setup(size_name, *, method="amended", products="exact", remat=False, conv_pool_impl="auto",
          batch=0, space="", layers=0, edge_groups=True, scan_cells=True):
  """(size, cfg, StepConfig, initial SearchState, make_batch) for a named size.

  `batch`, `space` and `layers` override the size's values when given.
  """
  size = dict(SIZES[size_name])
  for key, value in (("batch", batch), ("space", space), ("layers", layers)):
    if value:
      size[key] = value
  cfg = default.get_config()
  cfg.space, cfg.init_channels, cfg.layers = size["space"], size["C"], size["layers"]
  cfg.remat, cfg.conv_pool_impl, cfg.edge_groups = remat, conv_pool_impl, edge_groups
  cfg.scan_cells = "on" if scan_cells else "off"
  cfg.method, cfg.products = method, products
  sc = search.step_config(cfg, search.make_model(cfg, size["classes"]), steps_per_epoch=100)
  state = search.initial_state(cfg, sc, size["image"])
  rng = np.random.default_rng(0)

  def make_batch():
    return {"image": jnp.asarray(rng.normal(size=(size["batch"], *size["image"])), jnp.float32),
            "label": jnp.asarray(rng.integers(0, size["classes"], size["batch"]), jnp.int32)}

  return size, cfg, sc, state, make_batch


def step_fn(sc, method):
  """The step `benchmark.py` times for `method`, as a function (state, train, val) ->
  (state, metrics) to jit: `weight_only` is the weight step alone (SGD on the
  training gradient), `monitor` the search's gradient-quality diagnostics at the
  default config's monitor settings (search.monitor_step; the state passes through),
  any other method the full `search.search_step`."""
  if method == "monitor":
    from amended_darts_jax.configs import default
    c = default.get_config()
    mc = search.MonitorConfig(c.monitor_solver, c.monitor_solve_iters, c.monitor_tol,
                              c.monitor_damping, c.monitor_power_iters)
    return lambda state, train_batch, val_batch: (
        state, search.monitor_step(sc, mc, state, train_batch, val_batch))
  if method != "weight_only":
    return lambda state, train_batch, val_batch: search.search_step(sc, state, train_batch,
                                                                    val_batch)

  def step(state, train_batch, val_batch):
    train, _ = search.search_batches(sc, state, train_batch, val_batch)
    params, stats, w_opt_state, _, loss, _ = search.weight_step(sc, state, train)
    return state.replace(params=params, batch_stats=stats, w_opt_state=w_opt_state,
                         step=state.step + 1), {"train_loss": loss}

  return step


def setup_step(size_name, spec, **overrides):
  """`setup` plus the step to time for `spec`, "method" or "method/products"
  (products default to exact; `weight_only` is set up as first_order):
  (method, products, size, cfg, state, make_batch, step)."""
  method, _, products = spec.partition("/")
  products = products or "exact"
  size, cfg, sc, state, make_batch = setup(
      size_name, method="first_order" if method in ("weight_only", "monitor") else method,
      products=products, **overrides)
  return method, products, size, cfg, state, make_batch, step_fn(sc, method)


def digits_trajectory(cfg, checkpoints, method="first_order"):
  """Search states along a search on the embedded digits, without augmentation.

  Runs `method` steps of `amended_darts_jax.search` with `cfg` and yields
  `(step, state, train_batch, val_batch, lr)` at each step count in
  `checkpoints` (0 is the initialisation); the batches are the next ones the
  search would see, as host arrays, and lr is the weight learning rate there.
  """
  import functools

  from amended_darts_jax import input_pipeline

  splits, info = input_pipeline.load("digits")
  tr, va = input_pipeline.search_split(len(splits["train"]), cfg.train_portion, cfg.seed)
  make = lambda idx, seed: input_pipeline.Batches(input_pipeline.Subset(splits["train"], idx),
                                                  info, cfg.batch_size, seed, None)
  train_b, val_b = make(tr, cfg.seed), make(va, cfg.seed + 1)
  steps_per_epoch = min(train_b.steps_per_epoch, val_b.steps_per_epoch)
  cfg = cfg.copy_and_resolve_references()
  cfg.method, cfg.products = method, "exact"
  sc = search.step_config(cfg, search.make_model(cfg, info.num_classes), steps_per_epoch)
  state = search.initial_state(cfg, sc, info.image_shape)
  step_fn = jax.jit(functools.partial(search.search_step, sc))
  done = 0
  for target in sorted(checkpoints):
    while done < target:
      state, _ = step_fn(state, train_b.batch(done), val_b.batch(done))
      done += 1
    yield done, state, train_b.batch(done), val_b.batch(done), float(sc.lr_fn(done))


def counterexample():
  """The counterexample of docs/math.md §8 to `<g2', g2> >= 0`: H = diag(1, 10), M = [1, 1],
  v = (1, -1), eta = 0.1. Returns (g2, g2', g2'', <g2', g2>) from the library."""
  from amended_darts_jax import hypergrad as hg

  h = jnp.array([1.0, 10.0])
  lt = lambda w, a, b: 0.5 * jnp.sum(h * w["w"] ** 2) + a["a"] * jnp.sum(w["w"])
  lv = lambda w, a, b: w["w"][0] - w["w"][1]
  omega, alpha = {"w": jnp.zeros(2)}, {"a": jnp.array(0.0)}
  _, aux = hg.arch_gradient(lt, lv, omega, alpha, None, None, method="implicit", cg_tol=1e-14)
  g2p = hg.amended_term(lt, omega, alpha, None, aux["v"], eta=0.1)
  g2pp = hg.darts_term(lt, omega, alpha, None, aux["v"], xi=0.1)
  return (float(aux["g2"]["a"]), float(g2p["a"]), float(g2pp["a"]),
          float(hg.tree_vdot(g2p, aux["g2"])))
