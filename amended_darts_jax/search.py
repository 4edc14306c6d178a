r"""The architecture search: a jitted, data-parallel, resumable bilevel loop.

  python -m amended_darts_jax.search --workdir=DIR [--config=FILE] [--config.FIELD=VALUE ...]

One step = the architecture step (Adam on alpha with `hypergrad.arch_gradient`
of the configured method) followed by the weight step (SGD with momentum,
cosine schedule, weight decay, clipping) that reuses the training gradient the
architecture step computed where it computed one. Everything under DIR:
checkpoints/ and checkpoint_digests/ (checkpointing.py), genotype.json,
alphas.json, alpha_history.jsonl, config.json, metrics.jsonl, TensorBoard
events, figure1.png and cells.{png,svg,dot}.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax loads: rerun once with huge pages (hostmem.py)
  from amended_darts_jax import hostmem
  hostmem.reexec()

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from amended_darts_jax import (checkpointing, hypergrad, input_pipeline, ops, parallel, plots,
                               rundir, spaces, supernet, validation)
from amended_darts_jax.errors import ConfigError
from amended_darts_jax import metrics as metrics_lib
from amended_darts_jax.metrics import MetricWriter

# Fields that may change between a run and its resumption; any other difference
# means the checkpoint belongs to another experiment.
RESUMABLE_FIELDS = ("max_steps", "log_every", "checkpoint_every", "monitor_every",
                    "eval_every_epochs", "compilation_cache_dir", "data_dir", "download",
                    "distributed", "coordinator_address", "num_processes", "process_id",
                    "depthwise_impl", "remat")


@flax.struct.dataclass
class SearchState:
  step: jax.Array
  params: Any
  batch_stats: Any
  alpha: Any
  w_opt_state: Any
  a_opt_state: Any
  rng: jax.Array
  bad_step: jax.Array  # -1, or the first step whose loss or gradient was not finite


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static part of a search step (hashable; the jitted step closes over it)."""
  model: supernet.Supernet
  method: str
  products: str
  eta: float
  fd_r: float
  hessian_weight_decay: float
  damping: float
  cg_maxiter: int
  cg_tol: float
  momentum: float
  w_tx: Any
  a_tx: Any
  lr_fn: Callable[[jax.Array], jax.Array]


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Checks every field that can be checked without a JAX backend; ConfigError names the first bad one."""
  spaces.get_space(cfg.space)
  positive = ("batch_size", "epochs", "layers", "init_channels", "log_every", "checkpoint_every",
              "lr", "arch_lr", "grad_clip", "fd_r", "cg_maxiter", "cg_tol", "monitor_cg_iters",
              "monitor_power_iters")
  non_negative = ("eta", "max_steps", "lr_min", "weight_decay", "arch_weight_decay", "damping",
                  "eval_every_epochs", "monitor_every", "crop_padding", "cutout", "seed")
  validation.check(cfg, {
      "method": validation.one_of(hypergrad.METHODS),
      "products": validation.one_of(hypergrad.PRODUCTS),
      "activation": validation.one_of(tuple(ops.ACTIVATIONS)),
      "depthwise_impl": validation.one_of(ops.DEPTHWISE_IMPLS),
      "dataset": validation.one_of(input_pipeline.DATASETS),
      **dict.fromkeys(positive, validation.POSITIVE),
      **dict.fromkeys(non_negative, validation.NON_NEGATIVE),
      **dict.fromkeys(("momentum", "arch_beta1", "arch_beta2"), validation.FRACTION),
      "train_portion": validation.OPEN_UNIT})
  if cfg.init_channels % 2:
    raise ConfigError(f"init_channels must be even (factorized reduce halves it), "
                      f"got {cfg.init_channels}")
  validation.check_cluster(cfg)


def make_model(cfg, num_classes: int) -> supernet.Supernet:
  return supernet.Supernet(cfg.space, C=cfg.init_channels, layers=cfg.layers,
                           num_classes=num_classes, act=cfg.activation,
                           depthwise_impl=cfg.depthwise_impl, remat=cfg.remat,
                           batch_edges=cfg.batch_edges)


def make_optimizers(cfg, steps_per_epoch: int):
  """DARTS' optimizers: SGD+momentum with a per-epoch cosine to lr_min; Adam on alpha."""
  def lr_fn(step):
    epoch = jnp.minimum(step // steps_per_epoch, cfg.epochs)
    cos = 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / cfg.epochs))
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * cos

  # Clip the raw gradient, then add the decay, then momentum: PyTorch's SGD order.
  clip = optax.stateless(lambda g, _: hypergrad.tree_clip_by_norm(g, cfg.grad_clip))
  w_tx = optax.chain(clip,
                     optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(lr_fn, momentum=cfg.momentum))
  # PyTorch's Adam weight decay is an L2 term added to the gradient.
  a_tx = optax.chain(optax.add_decayed_weights(cfg.arch_weight_decay),
                     optax.adam(cfg.arch_lr, b1=cfg.arch_beta1, b2=cfg.arch_beta2))
  return w_tx, a_tx, lr_fn


def remat_ineffective() -> bool:
  """Whether per-cell rematerialization is known not to save memory here.

  jax 0.10's XLA:CPU schedules the recomputation as early as its inputs allow,
  so the saved activations live as long as without remat; those of jax 0.11
  and 0.12 do not (BUILD_NOTES.md).
  """
  major_minor = tuple(int(p) for p in jax.__version__.split(".")[:2])
  return jax.default_backend() == "cpu" and major_minor < (0, 11)


def step_config(cfg, model: supernet.Supernet, steps_per_epoch: int) -> StepConfig:
  """The static part of the search step for `cfg`, its optimizers included."""
  w_tx, a_tx, lr_fn = make_optimizers(cfg, steps_per_epoch)
  return StepConfig(model, cfg.method, cfg.products, cfg.eta, cfg.fd_r,
                    cfg.weight_decay if cfg.hessian_weight_decay else 0.0, cfg.damping,
                    cfg.cg_maxiter, cfg.cg_tol, cfg.momentum, w_tx, a_tx, lr_fn)


def initial_state(cfg, sc: StepConfig, image_shape) -> SearchState:
  """Step 0 of a search: omega drawn on the host (ops.init_variables), alpha from the space."""
  alpha = spaces.get_space(cfg.space).init_alpha(jax.random.PRNGKey(cfg.seed), cfg.layers)
  sample = jnp.zeros((2, *image_shape), jnp.float32)
  variables = ops.init_variables(sc.model, cfg.seed, sample, alpha, train=False)
  return SearchState(
      step=jnp.array(0, jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], alpha=alpha,
      w_opt_state=sc.w_tx.init(variables["params"]), a_opt_state=sc.a_tx.init(alpha),
      rng=jax.random.PRNGKey(cfg.seed + 2), bad_step=jnp.array(-1, jnp.int32))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def supernet_loss(model: supernet.Supernet, params, alpha, batch):
  """Loss in train mode (batch statistics); aux = (logits, updated batch_stats)."""
  logits, updates = model.apply({"params": params, "batch_stats": batch["batch_stats"]},
                                batch["image"], alpha, train=True, mutable=["batch_stats"])
  return cross_entropy(logits, batch["label"]), (logits, updates["batch_stats"])


def accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def search_step(sc: StepConfig, state: SearchState, train_batch, val_batch):
  """One architecture step and one weight step; returns (new_state, metrics)."""
  loss_fn = functools.partial(supernet_loss, sc.model)
  train = {**train_batch, "batch_stats": state.batch_stats}
  val = {**val_batch, "batch_stats": state.batch_stats}
  lr = sc.lr_fn(state.step)
  momentum_term = None
  if sc.method == "darts":  # DARTS folds the momentum buffer into its unrolled step
    trace = optax.tree_utils.tree_get(state.w_opt_state, "trace")
    momentum_term = hypergrad.tree_scale(sc.momentum, trace)
  g, aux = hypergrad.arch_gradient(
      loss_fn, loss_fn, state.params, state.alpha, train, val, method=sc.method,
      products=sc.products, eta=sc.eta, xi=lr, weight_decay=sc.hessian_weight_decay,
      r=sc.fd_r, momentum_term=momentum_term, damping=sc.damping, cg_maxiter=sc.cg_maxiter,
      cg_tol=sc.cg_tol, has_aux=True)
  a_updates, a_opt_state = sc.a_tx.update(g, state.a_opt_state, state.alpha)
  alpha = optax.apply_updates(state.alpha, a_updates)

  if aux["train_grad"] is not None:  # reuse: the arch step evaluated Lt at (w, alpha)
    w_grad, train_loss, (train_logits, batch_stats) = (aux["train_grad"], aux["train_loss"],
                                                       aux["train_aux"])
  else:
    (train_loss, (train_logits, batch_stats)), w_grad = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params, state.alpha, train)
  w_updates, w_opt_state = sc.w_tx.update(w_grad, state.w_opt_state, state.params)
  params = optax.apply_updates(state.params, w_updates)

  val_logits = aux["val_aux"][0]
  metrics = {
      "train_loss": train_loss, "train_acc": accuracy(train_logits, train_batch["label"]),
      "val_loss": aux["val_loss"], "val_acc": accuracy(val_logits, val_batch["label"]),
      "lr": lr, "arch_grad_norm": hypergrad.tree_norm(g),
      "g1_norm": hypergrad.tree_norm(aux["g1"]), "g2_norm": hypergrad.tree_norm(aux["g2"]),
      "weight_grad_norm": hypergrad.tree_norm(w_grad),
  }
  if "cg" in aux:
    metrics["cg_iterations"] = aux["cg"].iterations
    metrics["cg_residual"] = aux["cg"].relative_residual
    metrics["cg_negative_curvature"] = jnp.asarray(aux["cg"].negative_curvature, jnp.float32)
  finite = hypergrad.tree_all_finite((train_loss, aux["val_loss"], g, w_grad, params, alpha))
  new = state.replace(params=params, batch_stats=batch_stats, alpha=alpha,
                      w_opt_state=w_opt_state, a_opt_state=a_opt_state)
  # A non-finite step changes nothing and is recorded; the host stops at its next check.
  kept = jax.lax.cond(finite, lambda: new, lambda: state)
  bad_step = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
  return kept.replace(step=state.step + 1, bad_step=bad_step), metrics


def eval_step(model: supernet.Supernet, state: SearchState, batch):
  """Summed loss and correct count over the unmasked rows, in eval mode (running stats)."""
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       batch["image"], state.alpha, train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return {"loss_sum": jnp.sum(losses * batch["mask"]), "correct": jnp.sum(correct * batch["mask"]),
          "count": jnp.sum(batch["mask"])}


def monitor_step(sc: StepConfig, power_iters: int, cg_iters: int, state: SearchState,
                 train_batch, val_batch):
  """Gradient-quality diagnostics from exact products (off the training path).

  cos(g2', g2) and cos(g2'', g2) with g2 = -M (H + wd I)^-1 v from conjugate
  gradient, and the dominant eigenvalue of d2 Lv / dalpha2 (RobustDARTS'
  collapse signal) by power iteration on alpha-Hessian-vector products.
  """
  loss_fn = functools.partial(supernet_loss, sc.model)
  train = {**train_batch, "batch_stats": state.batch_stats}
  val = {**val_batch, "batch_stats": state.batch_stats}
  wd, lr = sc.hessian_weight_decay, sc.lr_fn(state.step)
  plain = lambda w, a, b: loss_fn(w, a, b)[0]
  v = jax.grad(plain)(state.params, state.alpha, val)
  g2, info = hypergrad.implicit_term(plain, state.params, state.alpha, train, v,
                                     weight_decay=wd, damping=sc.damping, maxiter=cg_iters,
                                     tol=1e-6)
  g2_amended = hypergrad.amended_term(plain, state.params, state.alpha, train, v, eta=sc.eta,
                                      weight_decay=wd)
  train_grad = jax.grad(plain)(state.params, state.alpha, train)
  unrolled = hypergrad.unrolled_weights(train_grad, state.params, lr, weight_decay=wd)
  v_unrolled = jax.grad(plain)(unrolled, state.alpha, val)
  g2_darts = hypergrad.darts_term(plain, state.params, state.alpha, train, v_unrolled, xi=lr)

  hess_alpha = lambda u: jax.jvp(lambda a: jax.grad(plain, 1)(state.params, a, val),
                                 (state.alpha,), (u,))[1]

  def power(_, u):
    hu = hess_alpha(u)
    return hypergrad.tree_scale(1.0 / jnp.maximum(hypergrad.tree_norm(hu), 1e-30), hu)

  u0 = jax.tree.map(lambda a: jnp.ones_like(a) / np.sqrt(a.size), state.alpha)
  u = jax.lax.fori_loop(0, power_iters, power, hypergrad.tree_scale(
      1.0 / hypergrad.tree_norm(u0), u0))
  eigenvalue = hypergrad.tree_vdot(u, hess_alpha(u))
  return {"cos_amended_implicit": hypergrad.tree_cosine(g2_amended, g2),
          "cos_darts_implicit": hypergrad.tree_cosine(g2_darts, g2),
          "inner_amended_implicit": hypergrad.tree_vdot(g2_amended, g2),
          "cg_iterations": info.iterations, "cg_residual": info.relative_residual,
          "cg_negative_curvature": jnp.asarray(info.negative_curvature, jnp.float32),
          "alpha_hessian_eigenvalue": eigenvalue}


def collapse_stats(space: spaces.SearchSpace, alpha) -> dict[str, float]:
  """Mean softmax weight of `none` and the number of skip-dominated edges (normal cells)."""
  weights = np.asarray(jax.nn.softmax(jnp.asarray(alpha["cells"] if space.per_cell
                                                  else alpha["normal"], jnp.float32), -1))
  if space.per_cell:
    reductions = spaces.reduction_cells(weights.shape[0])
    weights = weights[[i for i in range(weights.shape[0]) if i not in reductions]]
  weights = weights.reshape(-1, space.num_ops)
  ops_ = list(space.ops)
  stats = {"skip_dominated_edges": float(np.sum(np.argmax(weights, -1)
                                                 == ops_.index("skip_connect"))),
           "normal_edges": float(weights.shape[0])}
  if "none" in ops_:
    stats["none_weight"] = float(weights[:, ops_.index("none")].mean())
  return stats


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) a search in workdir; returns a summary of the final state."""
  t_run = time.perf_counter()
  validate_config(cfg)  # nothing before jax.distributed.initialize touches a backend
  rundir.setup_compilation_cache(cfg.compilation_cache_dir)
  if cfg.distributed:
    parallel.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  ops.check_depthwise_impl(cfg.depthwise_impl)
  if cfg.remat and remat_ineffective():
    logging.warning("config.remat=True does not shrink XLA:CPU's buffer plan under jax %s "
                    "(measured with 0.10.2; it does under 0.11.2 and 0.12, BUILD_NOTES.md): the step "
                    "will take longer for no memory saved", jax.__version__)
  rundir.prepare_workdir(workdir)
  rundir.check_resumable(workdir, cfg, RESUMABLE_FIELDS)
  space = spaces.get_space(cfg.space)
  mesh = parallel.make_mesh()
  parallel.check_batch_split(cfg.batch_size, mesh)
  parallel.log_devices(mesh)
  is_main = jax.process_index() == 0

  # Data: the training split divided into search-train and search-validation halves.
  splits, info = input_pipeline.load(cfg.dataset, cfg.data_dir, cfg.download)
  train_idx, val_idx = input_pipeline.search_split(len(splits["train"]), cfg.train_portion,
                                                   cfg.seed)
  search_train = input_pipeline.Subset(splits["train"], train_idx)
  search_val = input_pipeline.Subset(splits["train"], val_idx)
  augment = input_pipeline.Augment(cfg.crop_padding, cfg.flip, cfg.cutout)
  local = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_batches = input_pipeline.Batches(search_train, info, cfg.batch_size, cfg.seed, augment,
                                         **local)
  val_batches = input_pipeline.Batches(search_val, info, cfg.batch_size, cfg.seed + 1, augment,
                                       **local)
  steps_per_epoch = min(train_batches.steps_per_epoch, val_batches.steps_per_epoch)
  total_steps = cfg.epochs * steps_per_epoch
  if cfg.max_steps:
    total_steps = min(total_steps, cfg.max_steps)

  # Model, optimizers, state.
  model = make_model(cfg, info.num_classes)
  sc = step_config(cfg, model, steps_per_epoch)
  state = initial_state(cfg, sc, info.image_shape)
  state = parallel.put_replicated(state, mesh)

  checkpointer = checkpointing.Checkpointer(workdir)
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state = restored
    logging.info("resumed from the checkpoint of step %d", int(state.step))
  start_step = int(state.step)

  # Compile once, ahead of time: the run never retraces.
  repl, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  step_fn = jax.jit(functools.partial(search_step, sc), in_shardings=(repl, shard, shard),
                    out_shardings=(repl, repl), donate_argnums=0)
  first_train = parallel.put_batch(train_batches.batch(start_step), mesh)
  first_val = parallel.put_batch(val_batches.batch(start_step), mesh)
  t0 = time.perf_counter()
  compiled_step = step_fn.lower(state, first_train, first_val).compile()
  compile_s = time.perf_counter() - t0
  startup_s = time.perf_counter() - t_run  # until the first step can start
  logging.info("compiled the %s/%s search step in %.1f s (%.1f s since start)", cfg.method,
               cfg.products, compile_s, startup_s)
  eval_fn = jax.jit(functools.partial(eval_step, model), in_shardings=(repl, shard),
                    out_shardings=repl)
  monitor_fn = None
  if cfg.monitor_every:
    monitor_fn = jax.jit(functools.partial(monitor_step, sc, cfg.monitor_power_iters,
                                           cfg.monitor_cg_iters),
                         in_shardings=(repl, shard, shard), out_shardings=repl)

  rundir.begin(workdir, cfg, start_step)
  writer = MetricWriter(workdir, enabled=is_main, resumed_step=start_step)
  writer.write({"kind": "resume" if start_step else "setup", "step": start_step,
                "compile_s": compile_s,
                "startup_s": startup_s,
                "devices": parallel.describe(mesh), "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps})
  history_path = os.path.join(workdir, "alpha_history.jsonl")

  def checkpoint(state_now):
    writer.flush()  # first: once a checkpoint exists, the events up to it are on disk
    checkpointer.save_or_stop(state_now)

  negative_curvature = NegativeCurvatureNote(cfg.damping)
  pending: list[dict[str, jax.Array]] = []
  train_iter = train_batches.iterate(start_step)
  val_iter = val_batches.iterate(start_step)
  t_log, steps_since_log = time.perf_counter(), 0
  t_start = time.perf_counter()
  try:
    for step in range(start_step, total_steps):
      train_batch = parallel.put_batch(next(train_iter), mesh)
      val_batch = parallel.put_batch(next(val_iter), mesh)
      if monitor_fn is not None and step % cfg.monitor_every == 0:
        mon = _floats(jax.device_get(monitor_fn(state, train_batch, val_batch)))
        negative_curvature.check(mon, step, "the monitor's reference g2")
        # A cosine with a zero vector is NaN: left out of the record.
        writer.write({"kind": "monitor", "step": step,
                      **{k: v for k, v in mon.items() if math.isfinite(v)}})
      state, metrics = compiled_step(state, train_batch, val_batch)
      pending.append(metrics)
      steps_since_log += 1
      done = step + 1
      epoch_end = done % steps_per_epoch == 0 or done == total_steps
      if done % cfg.log_every == 0 or epoch_end:
        averaged = metrics_lib.mean_of(pending)
        pending = []
        negative_curvature.check(averaged, done, "the implicit term")
        if int(state.bad_step) >= 0:
          checkpoint(state)  # raises NonFiniteError naming the step
        now = time.perf_counter()
        rate = steps_since_log / (now - t_log)
        t_log, steps_since_log = now, 0
        record = {"kind": "step", "step": done, "epoch": (done - 1) // steps_per_epoch + 1,
                  **averaged, "steps_per_s": rate}
        writer.write(record)
        logging.info("epoch %d/%d step %d/%d | train loss %.4f acc %.3f | val loss %.4f acc %.3f"
                     " | %.2f steps/s | %s left", record["epoch"], cfg.epochs, done,
                     total_steps, averaged["train_loss"], averaged["train_acc"],
                     averaged["val_loss"], averaged["val_acc"], rate,
                     rundir.hms((total_steps - done) / max(rate, 1e-9)))
      if epoch_end:
        epoch = (done - 1) // steps_per_epoch + 1
        record = {"kind": "epoch", "step": done, "epoch": epoch,
                  **collapse_stats(space, jax.device_get(state.alpha))}
        if cfg.eval_every_epochs and epoch % cfg.eval_every_epochs == 0:
          record.update(_evaluate(eval_fn, state, search_val, info, cfg.batch_size, mesh))
          logging.info("epoch %d: supernet validation accuracy %.4f (eval mode)", epoch,
                       record["eval_val_acc"])
        writer.write(record)
        if is_main:
          with open(history_path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "step": done,
                                **spaces.alpha_to_lists(space, jax.device_get(state.alpha))})
                    + "\n")
      if done % cfg.checkpoint_every == 0 or done == total_steps:
        checkpoint(state)
  finally:
    checkpointer.close()
    writer.close()

  final_alpha = jax.device_get(state.alpha)
  genotype = space.genotype(final_alpha)
  summary = {"steps": int(state.step), "compile_s": compile_s,
             "wall_s": time.perf_counter() - t_start, "genotype": genotype.to_dict()}
  if is_main:
    genotype.save(os.path.join(workdir, "genotype.json"))
    rundir.write_json(os.path.join(workdir, "alphas.json"),
                      spaces.alpha_to_lists(space, final_alpha))
    plots.figure1(workdir)
    from amended_darts_jax import visualize
    visualize.render(genotype, os.path.join(workdir, "cells"))
  logging.info("genotype: %s", json.dumps(genotype.to_dict()))
  return summary


class NegativeCurvatureNote:
  """Logs once per run that conjugate gradient met negative curvature, with the remedy."""

  def __init__(self, damping: float):
    self.damping, self.said = damping, False

  def check(self, metrics: dict[str, float], step: int, what: str) -> None:
    if self.said or not metrics.get("cg_negative_curvature", 0.0) > 0:
      return
    self.said = True
    logging.warning("conjugate gradient for %s met negative curvature by step %d: H + (weight "
                    "decay + damping) I is not positive definite there, so the solve is not "
                    "H^-1 v; raise config.damping (now %g). Said once per run; the metric "
                    "cg_negative_curvature counts it per step", what, step, self.damping)


def _evaluate(eval_fn, state, source, info, batch_size, mesh) -> dict[str, float]:
  batches = input_pipeline.eval_batches(source, info, batch_size,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
  totals = parallel.sum_over_batches(functools.partial(eval_fn, state), batches, mesh)
  return {"eval_val_loss": float(totals["loss_sum"] / totals["count"]),
          "eval_val_acc": float(totals["correct"] / totals["count"])}


def _floats(tree) -> dict[str, float]:
  return {k: float(v) for k, v in tree.items()}


def main(argv, config_flag) -> None:
  from amended_darts_jax import cli
  del argv
  cli.run_or_exit(lambda: run(config_flag.value, cli.workdir()))


if __name__ == "__main__":
  from amended_darts_jax import cli
  cli.launch(main, default_config="default.py")
