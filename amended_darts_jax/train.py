r"""Retraining: a discrete network built from a genotype, trained from scratch and tested.

  python -m amended_darts_jax.train --workdir=DIR [--config=FILE] [--config.FIELD=VALUE ...]

`config.genotype` is a published genotype's name (`DARTS_V1`, `DARTS_V2`) or the
path of a `genotype.json` written by a search. Shares the run loop (loop.py),
the input pipeline, the data parallelism and the checkpoints with the search.
Under DIR: checkpoints/ and checkpoint_digests/, config.json, metrics.jsonl (per
logged step and per epoch, with the best and the latest test accuracy),
TensorBoard events and results.json at the end.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax loads: rerun once with huge pages (cpu/hostmem.py)
  from amended_darts_jax.cpu import hostmem
  hostmem.reexec()

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from amended_darts_jax import (hypergrad, input_pipeline, loop, networks, ops,
                               parallel, rundir, spaces, training, validation)
from amended_darts_jax import metrics as metrics_lib
from amended_darts_jax.cpu import dispatch

# Fields of the retraining, besides loop.RESUMABLE_FIELDS, that may change between
# a run and its resumption.
RESUMABLE_FIELDS = ("dry_run",)
IMAGENET_LIKE = ("imagenet2012",)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # None unless config.ema_decay > 0
  rng: jax.Array
  bad_step: jax.Array  # -1, or the first step whose loss or gradient was not finite


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """The static part of a training step."""
  model: Any
  tx: Any
  lr_fn: Callable[[jax.Array], jax.Array]
  steps_per_epoch: int
  epochs: int
  drop_path_prob: float
  auxiliary_weight: float
  label_smoothing: float
  ema_decay: float


def make_model(cfg, genotype: spaces.Genotype, num_classes: int):
  if genotype.is_nb201:
    networks.check_nb201(cfg.layers, cfg.auxiliary)
    return networks.NB201Network(genotype, C=cfg.init_channels, layers=cfg.layers,
                                 num_classes=num_classes, act=cfg.activation,
                                 scan_cells=networks.scans(cfg.scan_cells))
  layers = len(genotype.cells) if genotype.per_cell else cfg.layers
  cls = networks.NetworkImageNet if cfg.dataset in IMAGENET_LIKE else networks.NetworkCIFAR
  return cls(genotype, C=cfg.init_channels, layers=layers, num_classes=num_classes,
             auxiliary=cfg.auxiliary, act=cfg.activation, conv_pool_impl=cfg.conv_pool_impl,
             scan_cells=networks.scans(cfg.scan_cells))


def make_optimizer(cfg, steps_per_epoch: int):
  """SGD with (optionally Nesterov) momentum; per-epoch cosine to lr_min (CIFAR) or linear to 0 (ImageNet)."""
  lr_fn = training.epoch_schedule(cfg.lr, cfg.lr_min, cfg.epochs, steps_per_epoch,
                                  cfg.lr_schedule)
  return training.sgd(lr_fn, grad_clip=cfg.grad_clip, weight_decay=cfg.weight_decay,
                      momentum=cfg.momentum, nesterov=cfg.nesterov), lr_fn


def train_config(cfg, model, steps_per_epoch: int) -> TrainConfig:
  """The static part of the training step for `cfg`, its optimizer included."""
  tx, lr_fn = make_optimizer(cfg, steps_per_epoch)
  return TrainConfig(model=model, tx=tx, lr_fn=lr_fn, steps_per_epoch=steps_per_epoch,
                     epochs=cfg.epochs, drop_path_prob=cfg.drop_path_prob,
                     auxiliary_weight=cfg.auxiliary_weight, label_smoothing=cfg.label_smoothing,
                     ema_decay=cfg.ema_decay)


def drop_path_rate(tc: TrainConfig, step):
  return training.drop_path_rate(tc.drop_path_prob, step, tc.steps_per_epoch, tc.epochs)


def train_loss(tc: TrainConfig, params, batch_stats, batch, rng, rate):
  """Loss in train mode: cross-entropy plus auxiliary_weight times the auxiliary head's."""
  (logits, logits_aux), updates = tc.model.apply(
      {"params": params, "batch_stats": batch_stats}, batch["image"], rate, train=True,
      mutable=["batch_stats"], rngs={"dropout": rng})
  loss = training.cross_entropy(logits, batch["label"], tc.label_smoothing)
  if logits_aux is not None and tc.auxiliary_weight:
    loss = loss + tc.auxiliary_weight * training.cross_entropy(logits_aux, batch["label"],
                                                              tc.label_smoothing)
  return loss, (logits, updates["batch_stats"])


def train_step(tc: TrainConfig, state: TrainState, batch):
  rng = jax.random.fold_in(state.rng, state.step)
  rate = drop_path_rate(tc, state.step)
  (loss, (logits, batch_stats)), grad = jax.value_and_grad(
      functools.partial(train_loss, tc), has_aux=True)(state.params, state.batch_stats, batch,
                                                       rng, rate)
  updates, opt_state = tc.tx.update(grad, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = jax.tree.map(lambda e, p: tc.ema_decay * e + (1.0 - tc.ema_decay) * p, ema, params)
  finite = hypergrad.tree_all_finite((loss, grad, params))
  new = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                      ema_params=ema)
  metrics = {"train_loss": loss, "train_acc": training.accuracy(logits, batch["label"]),
             "lr": tc.lr_fn(state.step), "drop_path_rate": rate,
             "grad_norm": hypergrad.tree_norm(grad)}
  return training.guarded(state, new, finite), metrics


def eval_step(model, params, batch_stats, batch):
  """Summed loss, top-1 and top-5 hits over the unmasked rows, in eval mode."""
  # A genotype with RobustDARTS' `noise` operation draws noise in evaluation too.
  logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], 0.0,
                          train=False, rngs={"dropout": jax.random.PRNGKey(0)})
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  k = min(5, logits.shape[-1])
  top5 = jnp.any(jax.lax.top_k(logits, k)[1] == batch["label"][:, None], axis=-1)
  top1 = jnp.argmax(logits, -1) == batch["label"]
  m = batch["mask"]
  return {"loss_sum": jnp.sum(losses * m), "top1": jnp.sum(top1 * m), "top5": jnp.sum(top5 * m),
          "count": jnp.sum(m)}


def validate_config(cfg) -> None:
  """Checks every field that can be checked without a JAX backend; ConfigError names the first bad one."""
  positive = ("epochs", "batch_size", "init_channels", "layers", "log_every", "checkpoint_every",
              "lr", "image_size")
  non_negative = ("grad_clip", "lr_min", "weight_decay", "auxiliary_weight", "max_steps",
                  "eval_every_epochs", "crop_padding", "cutout", "seed")
  validation.check(cfg, {
      "dataset": validation.one_of(input_pipeline.DATASETS),
      "lr_schedule": validation.one_of(training.SCHEDULES),
      "activation": validation.one_of(tuple(ops.ACTIVATIONS)),
      "conv_pool_impl": validation.one_of(dispatch.IMPLS),
      "scan_cells": validation.one_of(networks.SCAN_SETTINGS),
      **dict.fromkeys(positive, validation.POSITIVE),
      **dict.fromkeys(non_negative, validation.NON_NEGATIVE),
      **dict.fromkeys(("momentum", "drop_path_prob", "label_smoothing", "ema_decay", "holdout"),
                      validation.FRACTION)})
  validation.check_cluster(cfg)


def _image_shape(cfg) -> tuple[int, int, int]:
  if cfg.dataset in IMAGENET_LIKE:
    return (cfg.image_size, cfg.image_size, 3)
  return input_pipeline.SHAPES[cfg.dataset]


def _num_classes(dataset: str) -> int:
  return input_pipeline.NUM_CLASSES[dataset]


def describe_network(cfg, genotype) -> dict[str, Any]:
  """Parameter count (auxiliary head excluded) and multiply-adds for one image."""
  model = make_model(cfg, genotype, _num_classes(cfg.dataset))
  shape = _image_shape(cfg)
  variables = init_variables(model, cfg.seed, shape)
  return {"params": networks.count_params(variables["params"]),
          "params_millions": networks.count_params(variables["params"]) / 1e6,
          "macs": networks.count_macs(model, variables, shape),
          "input_shape": list(shape), "layers": model.layers}


def initial_state(cfg, model, tx, image_shape) -> TrainState:
  variables = init_variables(model, cfg.seed, image_shape)
  return TrainState(step=jnp.array(0, jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                    ema_params=variables["params"] if cfg.ema_decay else None,
                    rng=jax.random.PRNGKey(cfg.seed + 2), bad_step=jnp.array(-1, jnp.int32))


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) in workdir; returns the results written to results.json."""
  validate_config(cfg)
  genotype = spaces.get_genotype(cfg.genotype)
  if cfg.dry_run:
    desc = describe_network(cfg, genotype)
    print(f"{genotype_label(cfg)}: {desc['params_millions']:.3f}M parameters (auxiliary head "
          f"excluded), {desc['macs'] / 1e6:.1f}M multiply-adds for one "
          f"{'x'.join(map(str, desc['input_shape']))} image, {desc['layers']} cells, "
          f"C={cfg.init_channels}")
    return desc
  run_ = loop.Run(cfg, workdir, RESUMABLE_FIELDS)

  splits, info = input_pipeline.load(cfg.dataset, cfg.data_dir, cfg.download)
  train_source, eval_source = splits["train"], splits["test"]
  if cfg.holdout:
    kept, held = input_pipeline.search_split(len(train_source), 1.0 - cfg.holdout, cfg.seed)
    train_source, eval_source = (input_pipeline.Subset(splits["train"], kept),
                                 input_pipeline.Subset(splits["train"], held))
  evaluated_on = f"holdout ({len(eval_source)} training images)" if cfg.holdout else "test"
  resize = cfg.image_size if cfg.dataset in IMAGENET_LIKE else 0
  augment = input_pipeline.Augment(cfg.crop_padding, cfg.flip, cfg.cutout, resize=resize)
  batches = input_pipeline.Batches(train_source, info, cfg.batch_size, cfg.seed, augment,
                                   **run_.local)
  steps_per_epoch = batches.steps_per_epoch
  schedule = loop.Schedule(total_steps=loop.total_steps(cfg, steps_per_epoch),
                           steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                           log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every)

  model = make_model(cfg, genotype, info.num_classes)
  tc = train_config(cfg, model, steps_per_epoch)
  shape = _image_shape(cfg)
  state = run_.restore(initial_state(cfg, model, tc.tx, shape))
  n_params = networks.count_params(state.params)
  best = {"top1": 0.0, "top5": 0.0}
  for r in metrics_lib.read(workdir, "epoch") if run_.start_step else ():
    if r["step"] <= run_.start_step:
      best = _best(best, r)

  compiled = run_.compile(functools.partial(train_step, tc), state,
                          batches.batch(run_.start_step),
                          what=f"training step ({n_params / 1e6:.3f}M parameters)")
  eval_fn = run_.jit(functools.partial(eval_step, model), replicated=2, sharded=1,
                     what="evaluation")
  run_.begin(schedule, params=n_params)

  def evaluate(s_state):
    params = s_state.ema_params if s_state.ema_params is not None else s_state.params
    test = input_pipeline.eval_batches(eval_source, info, cfg.batch_size, resize,
                                       **run_.local)
    totals = parallel.sum_over_batches(
        functools.partial(eval_fn, params, s_state.batch_stats), test, run_.mesh)
    n = float(totals["count"])
    return {"test_loss": float(totals["loss_sum"]) / n, "test_top1": float(totals["top1"]) / n,
            "test_top5": float(totals["top5"]) / n}

  last_eval: dict[str, float] = {}

  def at_epoch_end(done, epoch, state):
    nonlocal best, last_eval
    if not cfg.eval_every_epochs or (epoch % cfg.eval_every_epochs
                                     and done != schedule.total_steps):
      return
    last_eval = evaluate(state)
    best = _best(best, last_eval)
    run_.writer.write({"kind": "epoch", "step": done, "epoch": epoch, **last_eval,
                       "best_top1": best["top1"], "best_top5": best["top5"]})
    logging.info("epoch %d: %s top-1 %.4f (best %.4f), top-5 %.4f", epoch, evaluated_on,
                 last_eval["test_top1"], best["top1"], last_eval["test_top5"])

  describe = lambda m: (f"train loss {m['train_loss']:.4f} acc {m['train_acc']:.3f} | "
                        f"lr {m['lr']:.4f}")
  t_steps = time.perf_counter()
  state = run_.steps(compiled, state, ((b,) for b in batches.iterate(run_.start_step)),
                     schedule, describe=describe, at_epoch_end=at_epoch_end)

  if not last_eval:
    last_eval = evaluate(state)
    best = _best(best, last_eval)
  results = {"genotype": genotype_label(cfg), "evaluated_on": evaluated_on,
             "steps": int(state.step),
             "final_top1": last_eval["test_top1"], "best_top1": best["top1"],
             "params": n_params, "params_millions": n_params / 1e6,
             "macs": networks.count_macs(model, {"params": state.params,
                                                 "batch_stats": state.batch_stats}, shape),
             "wall_s": time.perf_counter() - t_steps, "compile_s": run_.compile_s}
  if cfg.dataset in IMAGENET_LIKE:
    results.update(final_top5=last_eval["test_top5"], best_top5=best["top5"])
  if run_.is_main:
    rundir.write_json(os.path.join(workdir, "results.json"), results)
  logging.info("results: %s", results)
  return results


def _best(best: dict[str, float], evaluation: dict[str, float]) -> dict[str, float]:
  """The best top-1 and top-5 so far, after one more evaluation's test_top1 and test_top5."""
  return {"top1": max(best["top1"], evaluation["test_top1"]),
          "top5": max(best["top5"], evaluation["test_top5"])}


def genotype_label(cfg) -> str:
  return os.path.basename(cfg.genotype) if cfg.genotype.endswith(".json") else cfg.genotype


def init_variables(model, seed: int, shape) -> dict[str, Any]:
  """Host initialisation in train mode, so the auxiliary head's parameters exist."""
  return networks.init_variables(model, seed, jnp.zeros((2, *shape)), 0.0, train=True)


def main(argv, config_flag) -> None:
  from amended_darts_jax import cli
  del argv
  cli.run_or_exit(lambda: run(config_flag.value, cli.workdir()))


if __name__ == "__main__":
  from amended_darts_jax import cli
  cli.launch(main, default_config="train_default.py")
