r"""Retraining: a discrete network built from a genotype, trained from scratch and tested.

  python -m amended_darts_jax.train --workdir=DIR [--config=FILE] [--config.FIELD=VALUE ...]

`config.genotype` is a published genotype's name (`DARTS_V1`, `DARTS_V2`) or the
path of a `genotype.json` written by a search. Shares the input pipeline, the
data parallelism and the checkpoints of the search. Under DIR: checkpoints/
and checkpoint_digests/, config.json, metrics.jsonl (per logged step and per epoch, with the best and the
latest test accuracy), TensorBoard events and results.json at the end.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax loads: rerun once with huge pages (hostmem.py)
  from amended_darts_jax import hostmem
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

from amended_darts_jax import (checkpointing, hypergrad, input_pipeline, networks, ops, parallel,
                               rundir, spaces, validation)
from amended_darts_jax.errors import ConfigError
from amended_darts_jax import metrics as metrics_lib
from amended_darts_jax.metrics import MetricWriter

RESUMABLE_FIELDS = ("max_steps", "log_every", "checkpoint_every", "eval_every_epochs",
                    "compilation_cache_dir", "data_dir", "download", "distributed",
                    "coordinator_address", "num_processes", "process_id", "depthwise_impl",
                    "dry_run")
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


@dataclasses.dataclass(frozen=True)
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


def resolve_genotype(name_or_path: str) -> spaces.Genotype:
  """A published genotype by name, else a genotype.json path (clear errors for both)."""
  if not name_or_path:
    raise ConfigError("config.genotype is empty; give DARTS_V1, DARTS_V2 or a genotype.json path")
  if os.path.sep in name_or_path or name_or_path.endswith(".json"):
    return spaces.load_genotype(name_or_path)
  return spaces.get_genotype(name_or_path)


def make_model(cfg, genotype: spaces.Genotype, num_classes: int):
  layers = len(genotype.cells) if genotype.per_cell else cfg.layers
  cls = networks.NetworkImageNet if cfg.dataset in IMAGENET_LIKE else networks.NetworkCIFAR
  return cls(genotype, C=cfg.init_channels, layers=layers, num_classes=num_classes,
             auxiliary=cfg.auxiliary, act=cfg.activation, depthwise_impl=cfg.depthwise_impl)


def make_optimizer(cfg, steps_per_epoch: int):
  """SGD with momentum; per-epoch cosine to lr_min (CIFAR) or linear to 0 (ImageNet)."""
  def lr_fn(step):
    epoch = jnp.minimum(step // steps_per_epoch, cfg.epochs)
    if cfg.lr_schedule == "linear":
      return cfg.lr * (1.0 - epoch / cfg.epochs)
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / cfg.epochs))

  clip = optax.stateless(lambda g, _: hypergrad.tree_clip_by_norm(g, cfg.grad_clip))
  tx = optax.chain(clip,
                   optax.add_decayed_weights(cfg.weight_decay),
                   optax.sgd(lr_fn, momentum=cfg.momentum))
  return tx, lr_fn


def cross_entropy(logits, labels, smoothing: float = 0.0):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def drop_path_rate(tc: TrainConfig, step):
  """DARTS ramps drop-path linearly with the epoch: p * epoch / epochs."""
  return tc.drop_path_prob * (step // tc.steps_per_epoch) / tc.epochs


def train_loss(tc: TrainConfig, params, batch_stats, batch, rng, rate):
  """Loss in train mode: cross-entropy plus auxiliary_weight times the auxiliary head's."""
  (logits, logits_aux), updates = tc.model.apply(
      {"params": params, "batch_stats": batch_stats}, batch["image"], rate, train=True,
      mutable=["batch_stats"], rngs={"dropout": rng})
  loss = cross_entropy(logits, batch["label"], tc.label_smoothing)
  if logits_aux is not None and tc.auxiliary_weight:
    loss = loss + tc.auxiliary_weight * cross_entropy(logits_aux, batch["label"],
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
  kept = jax.lax.cond(finite, lambda: new, lambda: state)
  bad_step = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
  metrics = {"train_loss": loss, "train_acc": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             "lr": tc.lr_fn(state.step), "drop_path_rate": rate,
             "grad_norm": hypergrad.tree_norm(grad)}
  return kept.replace(step=state.step + 1, bad_step=bad_step), metrics


def eval_step(model, params, batch_stats, batch):
  """Summed loss, top-1 and top-5 hits over the unmasked rows, in eval mode."""
  logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], 0.0,
                          train=False)
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
              "lr", "grad_clip", "image_size")
  non_negative = ("lr_min", "weight_decay", "auxiliary_weight", "max_steps", "eval_every_epochs",
                  "crop_padding", "cutout", "seed")
  validation.check(cfg, {
      "dataset": validation.one_of(input_pipeline.DATASETS),
      "lr_schedule": validation.one_of(("cosine", "linear")),
      "activation": validation.one_of(tuple(ops.ACTIVATIONS)),
      "depthwise_impl": validation.one_of(ops.DEPTHWISE_IMPLS),
      **dict.fromkeys(positive, validation.POSITIVE),
      **dict.fromkeys(non_negative, validation.NON_NEGATIVE),
      **dict.fromkeys(("momentum", "drop_path_prob", "label_smoothing", "ema_decay"),
                      validation.FRACTION)})
  validation.check_cluster(cfg)


def _image_shape(cfg) -> tuple[int, int, int]:
  if cfg.dataset == "digits":
    return (8, 8, 1)
  if cfg.dataset in IMAGENET_LIKE:
    return (cfg.image_size, cfg.image_size, 3)
  return (32, 32, 3)


def _num_classes(dataset: str) -> int:
  return {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}[dataset]


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
  genotype = resolve_genotype(cfg.genotype)
  if cfg.dry_run:
    desc = describe_network(cfg, genotype)
    print(f"{genotype_label(cfg)}: {desc['params_millions']:.3f}M parameters (auxiliary head "
          f"excluded), {desc['macs'] / 1e6:.1f}M multiply-adds for one "
          f"{'x'.join(map(str, desc['input_shape']))} image, {desc['layers']} cells, "
          f"C={cfg.init_channels}")
    return desc
  rundir.setup_compilation_cache(cfg.compilation_cache_dir)
  if cfg.distributed:
    parallel.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  ops.check_depthwise_impl(cfg.depthwise_impl)
  rundir.prepare_workdir(workdir)
  rundir.check_resumable(workdir, cfg, RESUMABLE_FIELDS)
  mesh = parallel.make_mesh()
  parallel.check_batch_split(cfg.batch_size, mesh)
  parallel.log_devices(mesh)
  is_main = jax.process_index() == 0

  splits, info = input_pipeline.load(cfg.dataset, cfg.data_dir, cfg.download)
  resize = cfg.image_size if cfg.dataset in IMAGENET_LIKE else 0
  augment = input_pipeline.Augment(cfg.crop_padding, cfg.flip, cfg.cutout, resize=resize)
  local = dict(process_index=jax.process_index(), process_count=jax.process_count())
  batches = input_pipeline.Batches(splits["train"], info, cfg.batch_size, cfg.seed, augment,
                                   **local)
  steps_per_epoch = batches.steps_per_epoch
  total_steps = cfg.epochs * steps_per_epoch
  if cfg.max_steps:
    total_steps = min(total_steps, cfg.max_steps)

  model = make_model(cfg, genotype, info.num_classes)
  tx, lr_fn = make_optimizer(cfg, steps_per_epoch)
  tc = TrainConfig(model, tx, lr_fn, steps_per_epoch, cfg.epochs, cfg.drop_path_prob,
                   cfg.auxiliary_weight, cfg.label_smoothing, cfg.ema_decay)
  shape = _image_shape(cfg)
  state = parallel.put_replicated(initial_state(cfg, model, tx, shape), mesh)
  n_params = networks.count_params(state.params)

  checkpointer = checkpointing.Checkpointer(workdir)
  restored = checkpointer.restore_latest(state)
  best = {"top1": 0.0, "top5": 0.0}
  if restored is not None:
    state = restored
    logging.info("resumed from the checkpoint of step %d", int(state.step))
    for r in metrics_lib.read(workdir, "epoch"):
      if r["step"] <= int(state.step):
        best = {"top1": max(best["top1"], r["test_top1"]),
                "top5": max(best["top5"], r["test_top5"])}
  start_step = int(state.step)

  repl, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  step_fn = jax.jit(functools.partial(train_step, tc), in_shardings=(repl, shard),
                    out_shardings=(repl, repl), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, parallel.put_batch(batches.batch(start_step), mesh)).compile()
  compile_s = time.perf_counter() - t0
  logging.info("compiled the training step in %.1f s (%.3fM parameters)", compile_s,
               n_params / 1e6)
  eval_fn = jax.jit(functools.partial(eval_step, model), in_shardings=(repl, repl, shard),
                    out_shardings=repl)

  rundir.begin(workdir, cfg, start_step)
  writer = MetricWriter(workdir, enabled=is_main, resumed_step=start_step)
  writer.write({"kind": "resume" if start_step else "setup", "step": start_step,
                "compile_s": compile_s,
                "devices": parallel.describe(mesh), "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps, "params": n_params})

  def checkpoint(state_now):
    writer.flush()  # first: once a checkpoint exists, the events up to it are on disk
    checkpointer.save_or_stop(state_now)

  def evaluate(s_state):
    params = s_state.ema_params if s_state.ema_params is not None else s_state.params
    batches = input_pipeline.eval_batches(splits["test"], info, cfg.batch_size, resize, **local)
    totals = parallel.sum_over_batches(
        functools.partial(eval_fn, params, s_state.batch_stats), batches, mesh)
    n = float(totals["count"])
    return {"test_loss": float(totals["loss_sum"]) / n, "test_top1": float(totals["top1"]) / n,
            "test_top5": float(totals["top5"]) / n}

  pending, t_log, since = [], time.perf_counter(), 0
  t_start = time.perf_counter()
  last_eval: dict[str, float] = {}
  try:
    for step, local_batch in zip(range(start_step, total_steps), batches.iterate(start_step)):
      state, m = compiled(state, parallel.put_batch(local_batch, mesh))
      pending.append(m)
      since += 1
      done = step + 1
      epoch_end = done % steps_per_epoch == 0 or done == total_steps
      if done % cfg.log_every == 0 or epoch_end:
        avg = metrics_lib.mean_of(pending)
        pending = []
        if int(state.bad_step) >= 0:
          checkpoint(state)
        now = time.perf_counter()
        rate, t_log, since = since / (now - t_log), now, 0
        epoch = (done - 1) // steps_per_epoch + 1
        writer.write({"kind": "step", "step": done, "epoch": epoch, **avg, "steps_per_s": rate})
        logging.info("epoch %d/%d step %d/%d | train loss %.4f acc %.3f | lr %.4f | %.2f steps/s "
                     "| %s left", epoch, cfg.epochs, done, total_steps, avg["train_loss"],
                     avg["train_acc"], avg["lr"], rate,
                     rundir.hms((total_steps - done) / max(rate, 1e-9)))
      if epoch_end and cfg.eval_every_epochs and (
          ((done - 1) // steps_per_epoch + 1) % cfg.eval_every_epochs == 0
          or done == total_steps):
        last_eval = evaluate(state)
        best = {"top1": max(best["top1"], last_eval["test_top1"]),
                "top5": max(best["top5"], last_eval["test_top5"])}
        epoch = (done - 1) // steps_per_epoch + 1
        writer.write({"kind": "epoch", "step": done, "epoch": epoch, **last_eval,
                      "best_top1": best["top1"], "best_top5": best["top5"]})
        logging.info("epoch %d: test top-1 %.4f (best %.4f), top-5 %.4f", epoch,
                     last_eval["test_top1"], best["top1"], last_eval["test_top5"])
      if done % cfg.checkpoint_every == 0 or done == total_steps:
        checkpoint(state)
  finally:
    checkpointer.close()
    writer.close()

  if not last_eval:
    last_eval = evaluate(state)
    best = {"top1": max(best["top1"], last_eval["test_top1"]),
            "top5": max(best["top5"], last_eval["test_top5"])}
  results = {"genotype": genotype_label(cfg), "steps": int(state.step),
             "final_top1": last_eval["test_top1"], "best_top1": best["top1"],
             "params": n_params, "params_millions": n_params / 1e6,
             "macs": networks.count_macs(model, {"params": state.params,
                                                 "batch_stats": state.batch_stats}, shape),
             "wall_s": time.perf_counter() - t_start, "compile_s": compile_s}
  if cfg.dataset in IMAGENET_LIKE:
    results.update(final_top5=last_eval["test_top5"], best_top5=best["top5"])
  if is_main:
    rundir.write_json(os.path.join(workdir, "results.json"), results)
  logging.info("results: %s", results)
  return results


def genotype_label(cfg) -> str:
  return os.path.basename(cfg.genotype) if cfg.genotype.endswith(".json") else cfg.genotype


def init_variables(model, seed: int, shape) -> dict[str, Any]:
  """Host initialisation in train mode, so the auxiliary head's parameters exist."""
  return ops.init_variables(model, seed, jnp.zeros((2, *shape)), 0.0, train=True)


def main(argv, config_flag) -> None:
  from amended_darts_jax import cli
  del argv
  cli.run_or_exit(lambda: run(config_flag.value, cli.workdir()))


if __name__ == "__main__":
  from amended_darts_jax import cli
  cli.launch(main, default_config="train_default.py")
