r"""The architecture search: a jitted, data-parallel, resumable bilevel loop.

  python -m amended_darts_jax.search --workdir=DIR [--config=FILE] [--config.FIELD=VALUE ...]

One step = the architecture step (Adam on alpha with `hypergrad.arch_gradient`
of the configured method) followed by the weight step (SGD with momentum,
cosine schedule, weight decay, clipping) that reuses the training gradient the
architecture step computed where it computed one. Everything under DIR:
checkpoints/ and checkpoint_digests/ (checkpointing.py), genotype.json,
alphas.json, alpha_history.jsonl, config.json, metrics.jsonl, TensorBoard
events, figure1.png and cells.{png,svg,dot}; in the `nb201` space also
nb201_arch.txt (the benchmark's architecture string) and, where
`config.nb201_benchmark` names the benchmark's file, nb201_lookup.json (the
searched cell's recorded accuracies, nb201.py).
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax loads: rerun once with huge pages (cpu/hostmem.py)
  from amended_darts_jax.cpu import hostmem
  hostmem.reexec()

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from amended_darts_jax import (hypergrad, input_pipeline, loop, nb201, networks,
                               ops, parallel, plots, rundir, spaces, supernet, training,
                               validation)
from amended_darts_jax.cpu import dispatch
from amended_darts_jax.errors import ConfigError

# Fields of the search, besides loop.RESUMABLE_FIELDS, that may change between a
# run and its resumption.
RESUMABLE_FIELDS = ("monitor_every", "monitor_solve_iters", "monitor_power_iters",
                    "monitor_solver", "monitor_tol", "monitor_damping", "remat")


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


@dataclasses.dataclass(frozen=True, kw_only=True)
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
  auxiliary_weight: float
  drop_path_prob: float
  epochs: int
  steps_per_epoch: int
  w_tx: Any
  a_tx: Any
  lr_fn: Callable[[jax.Array], jax.Array]


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Checks every field that can be checked without a JAX backend; ConfigError names the first bad one."""
  spaces.get_space(cfg.space)
  positive = ("batch_size", "epochs", "layers", "init_channels", "log_every", "checkpoint_every",
              "lr", "arch_lr", "fd_r", "cg_maxiter", "cg_tol", "monitor_solve_iters",
              "monitor_power_iters", "monitor_tol")
  non_negative = ("grad_clip", "eta", "max_steps", "lr_min", "weight_decay", "arch_weight_decay",
                  "damping", "eval_every_epochs", "monitor_every", "crop_padding", "cutout",
                  "seed", "auxiliary_weight", "monitor_damping")
  validation.check(cfg, {
      "method": validation.one_of(hypergrad.METHODS),
      "monitor_solver": validation.one_of(hypergrad.SOLVERS),
      "products": validation.one_of(hypergrad.PRODUCTS),
      "activation": validation.one_of(tuple(ops.ACTIVATIONS)),
      "conv_pool_impl": validation.one_of(dispatch.IMPLS),
      "scan_cells": validation.one_of(networks.SCAN_SETTINGS),
      "dataset": validation.one_of(input_pipeline.DATASETS),
      **dict.fromkeys(positive, validation.POSITIVE),
      **dict.fromkeys(non_negative, validation.NON_NEGATIVE),
      **dict.fromkeys(("momentum", "arch_beta1", "arch_beta2", "drop_path_prob", "dropout"),
                      validation.FRACTION),
      "train_portion": validation.OPEN_UNIT})
  if cfg.init_channels % 2:
    raise ConfigError(f"init_channels must be even (factorized reduce halves it), "
                      f"got {cfg.init_channels}")
  if spaces.get_space(cfg.space).cell == "nb201":
    networks.check_nb201(cfg.layers, cfg.auxiliary)
  if cfg.nb201_benchmark:
    if cfg.space != "nb201":
      raise ConfigError(f"config.nb201_benchmark looks up NAS-Bench-201 cells; the space is "
                        f"{cfg.space!r}, not 'nb201'")
    nb201.check(cfg.nb201_benchmark)
  validation.check_cluster(cfg)


def make_model(cfg, num_classes: int) -> supernet.Supernet:
  return supernet.Supernet(cfg.space, C=cfg.init_channels, layers=cfg.layers,
                           num_classes=num_classes, act=cfg.activation,
                           conv_pool_impl=cfg.conv_pool_impl, remat=cfg.remat,
                           edge_groups=cfg.edge_groups, drop_path=cfg.drop_path_prob > 0,
                           dropout=cfg.dropout, auxiliary=cfg.auxiliary,
                           scan_cells=networks.scans(cfg.scan_cells))


def make_optimizers(cfg, steps_per_epoch: int):
  """DARTS' optimizers: SGD+momentum with a per-epoch cosine to lr_min; Adam on alpha."""
  lr_fn = training.epoch_schedule(cfg.lr, cfg.lr_min, cfg.epochs, steps_per_epoch)
  w_tx = training.sgd(lr_fn, grad_clip=cfg.grad_clip, weight_decay=cfg.weight_decay,
                      momentum=cfg.momentum, nesterov=cfg.nesterov)
  # PyTorch's Adam weight decay is an L2 term added to the gradient.
  a_tx = optax.chain(optax.add_decayed_weights(cfg.arch_weight_decay),
                     optax.adam(cfg.arch_lr, b1=cfg.arch_beta1, b2=cfg.arch_beta2))
  return w_tx, a_tx, lr_fn


def step_config(cfg, model: supernet.Supernet, steps_per_epoch: int) -> StepConfig:
  """The static part of the search step for `cfg`, its optimizers included."""
  w_tx, a_tx, lr_fn = make_optimizers(cfg, steps_per_epoch)
  return StepConfig(model=model, method=cfg.method, products=cfg.products, eta=cfg.eta,
                    fd_r=cfg.fd_r,
                    hessian_weight_decay=cfg.weight_decay if cfg.hessian_weight_decay else 0.0,
                    damping=cfg.damping, cg_maxiter=cfg.cg_maxiter, cg_tol=cfg.cg_tol,
                    momentum=cfg.momentum,
                    auxiliary_weight=cfg.auxiliary_weight if cfg.auxiliary else 0.0,
                    drop_path_prob=cfg.drop_path_prob, epochs=cfg.epochs,
                    steps_per_epoch=steps_per_epoch, w_tx=w_tx, a_tx=a_tx, lr_fn=lr_fn)


def initial_state(cfg, sc: StepConfig, image_shape) -> SearchState:
  """Step 0 of a search: omega drawn on the host (networks.init_variables), alpha from the space."""
  alpha = spaces.get_space(cfg.space).init_alpha(jax.random.PRNGKey(cfg.seed), cfg.layers)
  sample = jnp.zeros((2, *image_shape), jnp.float32)
  # In train mode, so that the auxiliary head's parameters exist where it is on.
  variables = networks.init_variables(sc.model, cfg.seed, sample, alpha, train=True)
  return SearchState(
      step=jnp.array(0, jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], alpha=alpha,
      w_opt_state=sc.w_tx.init(variables["params"]), a_opt_state=sc.a_tx.init(alpha),
      rng=jax.random.PRNGKey(cfg.seed + 2), bad_step=jnp.array(-1, jnp.int32))


def supernet_loss(model: supernet.Supernet, params, alpha, batch, auxiliary_weight=0.0):
  """Loss in train mode (batch statistics); aux = (logits, updated batch_stats).

  Where the supernet has drop-path, dropout or the auxiliary head, `batch` also
  carries the "dropout" key `rng` and the `drop_path_rate`, so that every
  evaluation inside one product sees the same masks (docs/math.md §4), and the
  loss adds `auxiliary_weight` times the auxiliary head's cross-entropy.
  """
  rngs = {"dropout": batch["rng"]} if "rng" in batch else {}
  mutable = ["batch_stats", "aux"] if model.auxiliary else ["batch_stats"]
  logits, updates = model.apply({"params": params, "batch_stats": batch["batch_stats"]},
                                batch["image"], alpha, train=True,
                                drop_path_rate=batch.get("drop_path_rate", 0.0),
                                mutable=mutable, rngs=rngs)
  loss = training.cross_entropy(logits, batch["label"])
  if model.auxiliary and auxiliary_weight:
    (aux_logits,) = updates["aux"]["logits"]
    loss = loss + auxiliary_weight * training.cross_entropy(aux_logits, batch["label"])
  return loss, (logits, updates["batch_stats"])


def uses_rng(model: supernet.Supernet) -> bool:
  """Whether the supernet draws random numbers: drop-path, dropout or a `noise` operation."""
  return model.drop_path or bool(model.dropout) or model.space.has_noise


def search_batches(sc: StepConfig, state: SearchState, train_batch, val_batch):
  """The step's training and validation batches with the running statistics and,
  where the supernet draws masks, a key per batch (folded from the state's key and
  the step) and DARTS' drop-path ramp, p * epoch / epochs."""
  train = {**train_batch, "batch_stats": state.batch_stats}
  val = {**val_batch, "batch_stats": state.batch_stats}
  if uses_rng(sc.model):
    k_train, k_val = jax.random.split(jax.random.fold_in(state.rng, state.step))
    rate = training.drop_path_rate(sc.drop_path_prob, state.step, sc.steps_per_epoch, sc.epochs)
    train.update(rng=k_train, drop_path_rate=rate)
    val.update(rng=k_val, drop_path_rate=rate)
  return train, val


def loss_of(sc: StepConfig):
  return _jitted_loss(sc.model, sc.auxiliary_weight)


@functools.lru_cache(maxsize=None)
def _jitted_loss(model: supernet.Supernet, auxiliary_weight: float):
  # One jitted function per supernet: every evaluation of the loss inside a step (the
  # validation gradient, the training gradient, the products' linearization) reuses
  # one Python trace of the supernet for each shape of its arguments.
  return jax.jit(functools.partial(supernet_loss, model, auxiliary_weight=auxiliary_weight))


def weight_step(sc: StepConfig, state: SearchState, train, reused=None):
  """The weight step: SGD on Lt's gradient at (omega, alpha) of the state.

  `train` is the training batch as `search_batches` gives it; `reused` is
  (gradient, loss, (logits, batch_stats)) where the architecture step evaluated
  Lt there already. Returns (params, batch_stats, w_opt_state, gradient, loss,
  logits).
  """
  if reused is None:
    (loss, (logits, batch_stats)), grad = jax.value_and_grad(
        loss_of(sc), has_aux=True)(state.params, state.alpha, train)
  else:
    grad, loss, (logits, batch_stats) = reused
  updates, w_opt_state = sc.w_tx.update(grad, state.w_opt_state, state.params)
  return optax.apply_updates(state.params, updates), batch_stats, w_opt_state, grad, loss, logits


def darts_momentum_term(sc: StepConfig, state: SearchState):
  """The weight optimizer's momentum buffer times the momentum, which DARTS folds into
  its unrolled step (hypergrad.unrolled_weights); None without momentum."""
  if not sc.momentum:
    return None
  trace = optax.tree_utils.tree_get(state.w_opt_state, "trace")
  return hypergrad.tree_scale(sc.momentum, trace)


def search_step(sc: StepConfig, state: SearchState, train_batch, val_batch):
  """One architecture step and one weight step; returns (new_state, metrics)."""
  loss_fn = loss_of(sc)
  train, val = search_batches(sc, state, train_batch, val_batch)
  lr = sc.lr_fn(state.step)
  momentum_term = darts_momentum_term(sc, state) if sc.method == "darts" else None
  g, aux = hypergrad.arch_gradient(
      loss_fn, loss_fn, state.params, state.alpha, train, val, method=sc.method,
      products=sc.products, eta=sc.eta, xi=lr, weight_decay=sc.hessian_weight_decay,
      r=sc.fd_r, momentum_term=momentum_term, damping=sc.damping, cg_maxiter=sc.cg_maxiter,
      cg_tol=sc.cg_tol, has_aux=True)
  a_updates, a_opt_state = sc.a_tx.update(g, state.a_opt_state, state.alpha)
  alpha = optax.apply_updates(state.alpha, a_updates)

  reused = None
  if aux["train_grad"] is not None:  # the arch step evaluated Lt at (w, alpha)
    reused = aux["train_grad"], aux["train_loss"], aux["train_aux"]
  params, batch_stats, w_opt_state, w_grad, train_loss, train_logits = weight_step(
      sc, state, train, reused)

  val_logits = aux["val_aux"][0]
  metrics = {
      "train_loss": train_loss,
      "train_acc": training.accuracy(train_logits, train_batch["label"]),
      "val_loss": aux["val_loss"], "val_acc": training.accuracy(val_logits, val_batch["label"]),
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
  return training.guarded(state, new, finite), metrics


def eval_step(model: supernet.Supernet, state: SearchState, batch):
  """Summed loss and correct count over the unmasked rows, in eval mode (running stats)."""
  # A `noise` operation draws in evaluation too: one key per evaluation, from the step.
  rngs = ({"dropout": jax.random.fold_in(jax.random.split(state.rng)[1], state.step)}
          if uses_rng(model) else {})
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       batch["image"], state.alpha, train=False, rngs=rngs)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return {"loss_sum": jnp.sum(losses * batch["mask"]), "correct": jnp.sum(correct * batch["mask"]),
          "count": jnp.sum(batch["mask"])}


class MonitorConfig(NamedTuple):
  """The monitor's reference solve and power iteration (config fields monitor_*)."""
  solver: str
  solve_iters: int
  tol: float
  damping: float
  power_iters: int


def monitor_step(sc: StepConfig, mc: MonitorConfig, state: SearchState, train_batch,
                 val_batch):
  """Gradient-quality diagnostics from exact products (off the training path).

  cos(g2', g2) and cos(g2'', g2) with the reference g2 = -M (H + (wd + damping) I)^-1 v
  solved by `mc.solver` (MINRES by default: the matrix of a ReLU network is often
  indefinite, where conjugate gradient stops), the solve's iterations, residual and
  the curvature x^T (H + (wd + damping) I) x / |x|^2 at its solution; g2'' as DARTS'
  step takes it (the momentum folded into the unrolled weights); and the dominant
  eigenvalue of d2 Lv / dalpha2 (RobustDARTS' collapse signal) by power iteration on
  alpha-Hessian-vector products. Where the weights are far from an inner optimum the
  reference is not the derivative of anything (docs/math.md §9).
  """
  loss_fn = loss_of(sc)
  train, val = search_batches(sc, state, train_batch, val_batch)
  wd, lr = sc.hessian_weight_decay, sc.lr_fn(state.step)
  plain = lambda w, a, b: loss_fn(w, a, b)[0]
  # One linearization per loss keeps the program near twice the search step's
  # (BUILD_NOTES.md, the monitor): the validation gradients and the alpha-Hessian
  # products share one, the three terms another.
  v, _, hess_alpha = hypergrad.validation_linearized(plain, state.params, state.alpha, val)
  terms = hypergrad.reference_terms(plain, plain, state.params, state.alpha, train, val, v,
                                    eta=sc.eta, xi=lr, weight_decay=wd,
                                    momentum_term=darts_momentum_term(sc, state),
                                    damping=mc.damping, solver=mc.solver,
                                    maxiter=mc.solve_iters, tol=mc.tol)
  g2, info = terms["g2"], terms["info"]
  g2_amended, g2_darts = terms["g2_amended"], terms["g2_darts"]
  u0 = jax.tree.map(lambda a: jnp.ones_like(a) / np.sqrt(a.size), state.alpha)
  eigenvalue = hypergrad.dominant_eigenvalue(hess_alpha, u0, iterations=mc.power_iters)
  return {"cos_amended_implicit": hypergrad.tree_cosine(g2_amended, g2),
          "cos_darts_implicit": hypergrad.tree_cosine(g2_darts, g2),
          "inner_amended_implicit": hypergrad.tree_vdot(g2_amended, g2),
          "solve_iterations": info.iterations, "solve_residual": info.relative_residual,
          "solve_curvature": info.curvature,
          "cg_negative_curvature": jnp.asarray(info.negative_curvature, jnp.float32),
          "alpha_hessian_eigenvalue": eigenvalue}


def collapse_stats(space: spaces.SearchSpace, alpha) -> dict[str, float]:
  """How far the normal cells have gone towards skip connections (docs/math.md §11).

  `skip_dominated_edges`: the normal edges whose strongest operation other than `none`
  is `skip_connect`, out of `normal_edges`; `skip_weight`, `none_weight`, `noise_weight`:
  the mean softmax weights of those operations over the normal edges that have them
  (left out where none has); `strongest_weight`: the largest weight of a kept
  operation on any normal edge (near 1/|ops| the counts are coin flips). Per-cell spaces
  add `upper_skip_dominated_edges` out of `upper_normal_edges`: the normal cells after
  the second reduction cell, where the paper sees DARTS fill a deep supernet with skips.
  """
  normal = alpha["cells"] if space.per_cell else space.cell_alpha(alpha, 0, False)
  weights = np.asarray(jax.nn.softmax(jnp.asarray(normal, jnp.float32), -1))
  upper = weights[:0]
  if space.per_cell:
    reductions = spaces.reduction_cells(weights.shape[0])
    normal = [i for i in range(weights.shape[0]) if i not in reductions]
    upper = weights[[i for i in normal if i > max(reductions)]]
    weights = weights[normal]
  else:
    weights = weights[None]
  # Per edge (normal cells): its operations, those DARTS may keep (never none).
  ops_ = [space.ops_of(e, False) for e in range(space.num_edges)]
  kept = [[k for k, op in enumerate(o) if op != "none"] for o in ops_]

  def dominated(w_NEO):
    return sum(int(ops_[e][kept[e][int(np.argmax(w_NEO[n, e, kept[e]]))]] == "skip_connect")
               for n in range(w_NEO.shape[0]) for e in range(space.num_edges))

  def mean_weight(op):  # over the normal edges that have the operation
    values = [weights[:, e, o.index(op)] for e, o in enumerate(ops_) if op in o]
    return float(np.mean(np.concatenate(values))) if values else None

  stats = {"skip_dominated_edges": float(dominated(weights)),
           "normal_edges": float(weights.shape[0] * space.num_edges)}
  if not weights.shape[0]:  # a supernet too shallow to have a normal cell
    return stats
  stats["strongest_weight"] = float(max(weights[:, e, kept[e]].max()
                                        for e in range(space.num_edges)))
  for op in ("skip_connect", "none", "noise"):
    value = mean_weight(op)
    if value is not None:
      stats[f"{op.split('_')[0]}_weight"] = value
  if upper.shape[0]:
    stats["upper_skip_dominated_edges"] = float(dominated(upper))
    stats["upper_normal_edges"] = float(upper.shape[0] * space.num_edges)
  return stats


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) a search in workdir; returns a summary of the final state."""
  validate_config(cfg)  # nothing before jax.distributed.initialize touches a backend
  run_ = loop.Run(cfg, workdir, RESUMABLE_FIELDS)
  if cfg.remat and dispatch.remat_ineffective():
    logging.warning("config.remat=True does not shrink XLA:CPU's buffer plan under jax %s "
                    "(measured with 0.10.2; it does under 0.11.2 and 0.12, BUILD_NOTES.md): the step "
                    "will take longer for no memory saved", jax.__version__)
  space = spaces.get_space(cfg.space)

  # Data: the training split divided into search-train and search-validation halves.
  splits, info = input_pipeline.load(cfg.dataset, cfg.data_dir, cfg.download)
  train_idx, val_idx = input_pipeline.search_split(len(splits["train"]), cfg.train_portion,
                                                   cfg.seed)
  search_train = input_pipeline.Subset(splits["train"], train_idx)
  search_val = input_pipeline.Subset(splits["train"], val_idx)
  augment = input_pipeline.Augment(cfg.crop_padding, cfg.flip, cfg.cutout)
  train_batches = input_pipeline.Batches(search_train, info, cfg.batch_size, cfg.seed, augment,
                                         **run_.local)
  val_batches = input_pipeline.Batches(search_val, info, cfg.batch_size, cfg.seed + 1, augment,
                                       **run_.local)
  steps_per_epoch = min(train_batches.steps_per_epoch, val_batches.steps_per_epoch)
  schedule = loop.Schedule(total_steps=loop.total_steps(cfg, steps_per_epoch),
                           steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                           log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every)

  model = make_model(cfg, info.num_classes)
  sc = step_config(cfg, model, steps_per_epoch)
  state = run_.restore(initial_state(cfg, sc, info.image_shape))
  start = run_.start_step
  compiled_step = run_.compile(functools.partial(search_step, sc), state,
                               train_batches.batch(start), val_batches.batch(start),
                               what=f"{cfg.method}/{cfg.products} search step")
  eval_fn = run_.jit(functools.partial(eval_step, model), replicated=1, sharded=1,
                     what="evaluation")
  monitor_fn = None
  if cfg.monitor_every:
    mc = MonitorConfig(cfg.monitor_solver, cfg.monitor_solve_iters, cfg.monitor_tol,
                       cfg.monitor_damping, cfg.monitor_power_iters)
    monitor_fn = run_.jit(functools.partial(monitor_step, sc, mc), replicated=1, sharded=2,
                          what="monitor")
  run_.begin(schedule)
  negative_curvature = NegativeCurvatureNote(cfg.damping, "config.damping")
  monitor_negative_curvature = NegativeCurvatureNote(cfg.monitor_damping,
                                                     "config.monitor_damping or use "
                                                     "config.monitor_solver='minres'")

  def before_step(step, state, train_batch, val_batch):
    if monitor_fn is None or step % cfg.monitor_every:
      return
    mon = {k: float(v) for k, v in jax.device_get(monitor_fn(state, train_batch,
                                                             val_batch)).items()}
    monitor_negative_curvature.check(mon, step, "the monitor's reference g2")
    # A cosine with a zero vector is NaN: left out of the record.
    run_.writer.write({"kind": "monitor", "step": step,
                       **{k: v for k, v in mon.items() if math.isfinite(v)}})

  def at_epoch_end(done, epoch, state):
    alpha = jax.device_get(state.alpha)
    record = {"kind": "epoch", "step": done, "epoch": epoch, **collapse_stats(space, alpha)}
    if cfg.eval_every_epochs and epoch % cfg.eval_every_epochs == 0:
      record.update(_evaluate(eval_fn, state, search_val, info, cfg.batch_size, run_))
      logging.info("epoch %d: supernet validation accuracy %.4f (eval mode)", epoch,
                   record["eval_val_acc"])
    run_.writer.write(record)
    if run_.is_main:
      with open(os.path.join(workdir, "alpha_history.jsonl"), "a") as f:
        f.write(json.dumps({"epoch": epoch, "step": done,
                            **spaces.alpha_to_lists(space, alpha)}) + "\n")

  describe = lambda m: (f"train loss {m['train_loss']:.4f} acc {m['train_acc']:.3f} | "
                        f"val loss {m['val_loss']:.4f} acc {m['val_acc']:.3f}")
  t_steps = time.perf_counter()
  state = run_.steps(
      compiled_step, state, zip(train_batches.iterate(start), val_batches.iterate(start)),
      schedule, describe=describe, before_step=before_step,
      after_average=lambda done, m: negative_curvature.check(m, done, "the implicit term"),
      at_epoch_end=at_epoch_end)

  final_alpha = jax.device_get(state.alpha)
  genotype = space.genotype(final_alpha)
  summary = {"steps": int(state.step), "compile_s": run_.compile_s,
             "wall_s": time.perf_counter() - t_steps, "genotype": genotype.to_dict()}
  if run_.is_main:
    genotype.save(os.path.join(workdir, "genotype.json"))
    rundir.write_json(os.path.join(workdir, "alphas.json"),
                      spaces.alpha_to_lists(space, final_alpha))
    plots.figure1(workdir)
    from amended_darts_jax import visualize
    visualize.render(genotype, os.path.join(workdir, "cells"))
    if genotype.is_nb201:
      rundir.write_text(os.path.join(workdir, "nb201_arch.txt"), genotype.arch_str + "\n")
  logging.info("genotype: %s", json.dumps(genotype.to_dict()))
  if genotype.is_nb201:
    logging.info("NAS-Bench-201 architecture: %s", genotype.arch_str)
    summary["nb201_arch"] = genotype.arch_str
  if cfg.nb201_benchmark and run_.is_main:  # after every result is saved
    record = nb201.lookup(nb201.open_benchmark(cfg.nb201_benchmark), genotype.arch_str)
    rundir.write_json(os.path.join(workdir, "nb201_lookup.json"), record)
    summary["nb201_lookup"] = record
  return summary


class NegativeCurvatureNote:
  """Logs once per run that conjugate gradient met negative curvature, with the remedy."""

  def __init__(self, damping: float, remedy: str):
    self.damping, self.remedy, self.said = damping, remedy, False

  def check(self, metrics: dict[str, float], step: int, what: str) -> None:
    if self.said or not metrics.get("cg_negative_curvature", 0.0) > 0:
      return
    self.said = True
    logging.warning("conjugate gradient for %s met negative curvature by step %d: H + (weight "
                    "decay + damping) I is not positive definite there, so the solve is not "
                    "H^-1 v; raise %s (damping now %g). Said once per run; the metric "
                    "cg_negative_curvature counts it per step", what, step, self.remedy,
                    self.damping)


def _evaluate(eval_fn, state, source, info, batch_size, run_: loop.Run) -> dict[str, float]:
  batches = input_pipeline.eval_batches(source, info, batch_size, **run_.local)
  totals = parallel.sum_over_batches(functools.partial(eval_fn, state), batches, run_.mesh)
  return {"eval_val_loss": float(totals["loss_sum"] / totals["count"]),
          "eval_val_acc": float(totals["correct"] / totals["count"])}


def main(argv, config_flag) -> None:
  from amended_darts_jax import cli
  del argv
  cli.run_or_exit(lambda: run(config_flag.value, cli.workdir()))


if __name__ == "__main__":
  from amended_darts_jax import cli
  cli.launch(main, default_config="default.py")
