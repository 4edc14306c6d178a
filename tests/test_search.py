"""The search step, data parallelism, the end-to-end run, resumption and errors."""

import functools
import json
import logging
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from amended_darts_jax import loop, parallel, rundir, search, spaces
from amended_darts_jax.configs import default
from amended_darts_jax.errors import ConfigError, NonFiniteError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# One compilation cache for this module's searches: those that compile the same step
# (most differ only in max_steps or checkpoint cadence) compile it once.
_CACHE = {"dir": ""}


@pytest.fixture(autouse=True, scope="module")
def _compilation_cache(tmp_path_factory):
  _CACHE["dir"] = str(tmp_path_factory.mktemp("xla_cache"))
  rundir.setup_compilation_cache(_CACHE["dir"])  # for the steps jitted here too
  yield
  _CACHE["dir"] = ""


def tiny_config(**overrides):
  """A search small enough to compile in seconds: s2 space, one cell, two channels."""
  cfg = default.get_config()
  cfg.space = "s2"
  cfg.layers = 1
  cfg.init_channels = 2
  cfg.batch_size = 16
  cfg.epochs = 2
  cfg.log_every = 2
  cfg.checkpoint_every = 4
  cfg.compilation_cache_dir = _CACHE["dir"]
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _state_and_batches(cfg, num_classes=10, image_shape=(8, 8, 1)):
  model = search.make_model(cfg, num_classes)
  sc = search.step_config(cfg, model, steps_per_epoch=10)
  state = search.initial_state(cfg, sc, image_shape)
  keys = jax.random.split(jax.random.PRNGKey(5), 4)
  batch = lambda k1, k2: {"image": jax.random.normal(k1, (cfg.batch_size, *image_shape)),
                          "label": jax.random.randint(k2, (cfg.batch_size,), 0, num_classes)}
  return sc, state, batch(keys[0], keys[1]), batch(keys[2], keys[3])


def _run_step(sc, state, train, val, devices):
  mesh = parallel.make_mesh(devices)
  repl, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  step = jax.jit(functools.partial(search.search_step, sc), in_shardings=(repl, shard, shard),
                 out_shardings=(repl, repl))
  put = lambda b: jax.device_put(b, shard)
  return step(jax.device_put(state, repl), put(train), put(val))


def test_step_on_8_devices_equals_one_device():
  assert len(jax.devices()) == 8, "conftest asks XLA for 8 CPU devices"
  cfg = tiny_config(method="amended")
  sc, state, train, val = _state_and_batches(cfg)
  one, m1 = _run_step(sc, state, train, val, jax.devices()[:1])
  eight, m8 = _run_step(sc, state, train, val, jax.devices())
  # The alpha step moved alpha, and both runs moved it the same way.
  assert float(jnp.abs(one.alpha["cells"] - state.alpha["cells"]).max()) > 1e-5
  np.testing.assert_allclose(eight.alpha["cells"], one.alpha["cells"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m8["arch_grad_norm"], m1["arch_grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(eight.batch_stats), jax.tree.leaves(one.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_weight_step_reuses_the_training_gradient_exactly():
  """amended/exact: the weight step equals an SGD step on dLt/dw at the old alpha."""
  cfg = tiny_config(method="amended")
  sc, state, train, val = _state_and_batches(cfg)
  new, metrics = _run_step(sc, state, train, val, jax.devices()[:1])
  loss = lambda p: search.supernet_loss(sc.model, p, state.alpha,
                                        {**train, "batch_stats": state.batch_stats})
  (train_loss, _), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(state.params)
  updates, _ = sc.w_tx.update(grad, state.w_opt_state, state.params)
  expected = jax.tree.map(jnp.add, state.params, updates)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["train_loss"], train_loss, rtol=1e-5)
  assert int(new.step) == 1 and int(new.bad_step) == -1


def test_search_step_traces_once_and_a_non_finite_step_changes_nothing():
  chex.clear_trace_counter()
  cfg = tiny_config()
  sc, state, train, val = _state_and_batches(cfg)
  traced = chex.assert_max_traces(n=1)(search.search_step)
  step = jax.jit(functools.partial(traced, sc))
  for _ in range(2):
    state, _ = step(state, train, val)
  assert int(state.step) == 2 and int(state.bad_step) == -1
  # A NaN in the batch: the step counts, records itself as bad and changes nothing else.
  bad = {**train, "image": train["image"].at[0, 0, 0, 0].set(jnp.nan)}
  new, _ = step(state, bad, val)
  assert int(new.bad_step) == 2 and int(new.step) == 3
  for a, b in zip(jax.tree.leaves((new.alpha, new.params, new.batch_stats)),
                  jax.tree.leaves((state.alpha, state.params, state.batch_stats))):
    np.testing.assert_array_equal(a, b)


def test_a_workdir_written_under_the_old_field_names_still_resumes(tmp_path):
  cfg = tiny_config()
  saved = json.loads(cfg.to_json())
  saved["depthwise_impl"] = saved.pop("conv_pool_impl")
  saved["batch_edges"] = saved.pop("edge_groups")
  (tmp_path / "config.json").write_text(json.dumps(saved))
  fields = loop.RESUMABLE_FIELDS + search.RESUMABLE_FIELDS
  rundir.check_resumable(str(tmp_path), cfg, fields)  # the same run: no error
  changed = tiny_config(edge_groups=False)
  with pytest.raises(ConfigError, match="edge_groups: True there, False now"):
    rundir.check_resumable(str(tmp_path), changed, fields)


def test_collapse_count_takes_the_strongest_operation_other_than_none():
  space = spaces.get_space("darts")
  ops_ = list(space.ops)
  # A fully collapsed cell: none strongest everywhere, skip_connect next on every edge.
  logits = np.full((space.num_edges, space.num_ops), -4.0)
  logits[:, ops_.index("none")] = 3.0
  logits[:, ops_.index("skip_connect")] = 0.0
  logits[:3, ops_.index("sep_conv_3x3")] = 1.0  # three edges led by sep_conv instead
  stats = search.collapse_stats(space, {"normal": jnp.asarray(logits),
                                        "reduce": jnp.zeros_like(logits)})
  assert stats["skip_dominated_edges"] == space.num_edges - 3
  assert stats["normal_edges"] == space.num_edges and stats["none_weight"] > 0.9
  # Per-cell spaces count the normal cells only (s2 has no none).
  s2 = spaces.get_space("s2")
  cells = np.zeros((5, s2.num_edges, 2))
  cells[..., s2.ops.index("skip_connect")] = 1.0
  stats = search.collapse_stats(s2, {"cells": jnp.asarray(cells)})
  assert stats["normal_edges"] == 3 * s2.num_edges == stats["skip_dominated_edges"]


def test_collapse_count_on_skip_dominated_cells_ties_and_the_upper_third():
  space = spaces.get_space("rdarts_s3")  # none, skip_connect, sep_conv_3x3
  logits = np.zeros((space.num_edges, 3))
  logits[:5] = [0.0, 2.0, 0.0]  # skip-dominated
  logits[5:9] = [0.0, 1.0, 1.0]  # a tie: the first kept operation wins, as in the genotype
  logits[9:] = [5.0, 0.0, 1.0]  # none strongest, sep_conv next
  stats = search.collapse_stats(space, {"normal": jnp.asarray(logits),
                                        "reduce": jnp.zeros_like(logits)})
  assert stats["skip_dominated_edges"] == 9
  gene = space.genotype({"normal": logits, "reduce": np.zeros_like(logits)}).normal
  assert {op for op, _ in gene} <= {"skip_connect", "sep_conv_3x3"}
  w = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  assert stats["skip_weight"] == pytest.approx(w[:, 1].mean(), rel=1e-6)
  assert stats["none_weight"] == pytest.approx(w[:, 0].mean(), rel=1e-6)
  assert stats["strongest_weight"] == pytest.approx(w[:, 1:].max(), rel=1e-6)
  # s2 at 20 cells: reduction cells 6 and 13; the upper third is the 6 normal cells 14-19.
  s2 = spaces.get_space("s2")
  cells = np.zeros((20, s2.num_edges, 2))
  cells[:, :, 1] = 1.0  # sep_conv_3x3 everywhere ...
  cells[14:, :, 0] = 3.0  # ... except skip_connect in the upper third
  cells[6, :, 0] = 3.0  # and a reduction cell, which is not counted
  stats = search.collapse_stats(s2, {"cells": jnp.asarray(cells)})
  assert stats["normal_edges"] == 18 * 8 and stats["skip_dominated_edges"] == 6 * 8
  assert stats["upper_normal_edges"] == 6 * 8 == stats["upper_skip_dominated_edges"]
  assert "none_weight" not in stats
  # One cell is a reduction cell: no normal edge to count or to average.
  assert search.collapse_stats(s2, {"cells": jnp.zeros((1, 8, 2))}) == {
      "skip_dominated_edges": 0.0, "normal_edges": 0.0}


def test_collapse_record_in_spaces_with_per_edge_operations_and_without_skip():
  s1 = spaces.get_space("rdarts_s1")  # 12 of its 14 normal edges offer skip_connect
  logits = np.zeros((14, 2))
  for e in range(14):
    if "skip_connect" in s1.ops_of(e, False):
      logits[e, s1.ops_of(e, False).index("skip_connect")] = 1.0
  stats = search.collapse_stats(s1, {"normal": jnp.asarray(logits), "reduce": jnp.zeros((14, 2))})
  assert stats["skip_dominated_edges"] == 12 and stats["normal_edges"] == 14
  # The mean skip weight is over the edges that have skip: all at softmax(1, 0).
  assert stats["skip_weight"] == pytest.approx(np.e / (np.e + 1), rel=1e-6)
  s4 = spaces.get_space("rdarts_s4")  # noise, sep_conv_3x3: nothing to collapse to skip
  stats = search.collapse_stats(s4, {"normal": jnp.zeros((14, 2)).at[:, 0].set(2.0),
                                     "reduce": jnp.zeros((14, 2))})
  assert stats["skip_dominated_edges"] == 0 and "skip_weight" not in stats
  assert stats["noise_weight"] == pytest.approx(np.exp(2) / (np.exp(2) + 1), rel=1e-6)


def test_a_noise_space_draws_its_keys_in_the_losses_and_in_evaluation():
  """rdarts_s4 draws noise in the step's losses (their keys from search_batches) and in
  evaluation; both repeat at the same state and key."""
  cfg = tiny_config(space="rdarts_s4", method="first_order")
  sc, state, train, val = _state_and_batches(cfg)
  assert search.uses_rng(sc.model)
  t, _ = search.search_batches(sc, state, train, val)
  loss = jax.jit(lambda b: search.loss_of(sc)(state.params, state.alpha, b)[0])
  assert float(loss(t)) == float(loss(t)) and np.isfinite(float(loss(t)))
  assert float(loss({**t, "rng": jax.random.PRNGKey(99)})) != float(loss(t))
  new = state
  evaluate = jax.jit(functools.partial(search.eval_step, sc.model))
  batch = {**val, "mask": jnp.ones(cfg.batch_size)}
  first = evaluate(new, batch)
  np.testing.assert_array_equal(evaluate(new, batch)["loss_sum"], first["loss_sum"])
  # Noise enters the logits: another step's key evaluates to another loss.
  later = evaluate(new.replace(step=new.step + 1), batch)
  assert float(later["loss_sum"]) != float(first["loss_sum"])


def test_batch_that_does_not_split_across_devices_is_a_clear_error():
  with pytest.raises(ConfigError, match="batch size 12 does not split evenly across 8 devices"):
    parallel.check_batch_split(12, parallel.make_mesh())


def _outputs_ok(workdir, cfg, total_steps):
  genotype = spaces.load_genotype(os.path.join(workdir, "genotype.json"))
  assert len(genotype.cells) == cfg.layers
  alphas = json.load(open(os.path.join(workdir, "alphas.json")))
  np.testing.assert_allclose(np.sum(alphas["cells"], -1), 1.0, rtol=1e-5)
  assert json.load(open(os.path.join(workdir, "config.json")))["space"] == cfg.space
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r for r in records if r["kind"] == "step"]
  assert steps and steps[-1]["step"] == total_steps
  for key in ("step", "epoch", "train_loss", "val_loss", "val_acc", "steps_per_s"):
    assert key in steps[0]
  assert any(r["kind"] == "epoch" and "eval_val_acc" in r for r in records)
  history = [json.loads(line) for line in open(os.path.join(workdir, "alpha_history.jsonl"))]
  assert history and "cells" in history[0]
  for name in ("figure1.png", "cells.png", "cells.svg", "cells.dot"):
    assert os.path.getsize(os.path.join(workdir, name)) > 100, name
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  return alphas


def test_end_to_end_search_on_8_devices(tmp_path):
  # The 28x28 embedded MNIST digits (the default search, on the 8x8 digits, runs in test_runs).
  cfg = tiny_config(max_steps=6, batch_size=16, dataset="mnist5k")
  summary = search.run(cfg, str(tmp_path))
  assert summary["steps"] == 6
  _outputs_ok(str(tmp_path), cfg, 6)
  setup = json.loads(open(tmp_path / "metrics.jsonl").readline())
  assert setup["kind"] == "setup"
  assert 0 < setup["trace_s"] < setup["compile_s"] <= setup["startup_s"]


def test_end_to_end_search_on_mock_cifar10(tmp_path):
  # First order: the monitor computes its own products, whatever the method.
  cfg = tiny_config(dataset="cifar10", method="first_order", max_steps=2, crop_padding=4,
                    flip=True, cutout=16, eval_every_epochs=0, monitor_every=1,
                    monitor_solve_iters=3, monitor_power_iters=2)
  with tfds.testing.mock_data(num_examples=64):
    summary = search.run(cfg, str(tmp_path))
  assert summary["steps"] == 2
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  monitors = [r for r in records if r["kind"] == "monitor"]
  assert len(monitors) == 2
  # MINRES gives a reference wherever H + wd I is nonsingular, definite or not.
  assert all(-1.0 <= m["cos_amended_implicit"] <= 1.0 for m in monitors)
  assert all(-1.0 <= m["cos_darts_implicit"] <= 1.0 for m in monitors)
  assert all(m["solve_iterations"] == 3 and 0 < m["solve_residual"] <= 1 for m in monitors)
  assert all(np.isfinite(m[k]) for m in monitors
             for k in ("alpha_hessian_eigenvalue", "solve_curvature"))


def test_non_finite_run_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
  run_config = functools.partial(tiny_config, method="first_order", checkpoint_every=2,
                                 log_every=1)
  cfg = run_config(max_steps=6)
  search.run(cfg, str(tmp_path))  # six good steps, checkpoints at 2, 4, 6
  cfg = run_config(max_steps=10)
  # Resuming the same run with a learning rate that overflows the weights is refused
  # (config differs) ...
  poisoned = run_config(max_steps=10, lr=3e38)
  with pytest.raises(ConfigError, match="different config"):
    search.run(poisoned, str(tmp_path))
  # ... and a fresh run with it stops at its second step with no checkpoint written.
  fresh = tmp_path / "fresh"
  with pytest.raises(NonFiniteError, match="non-finite loss or gradient at step 1; the run "
                     "stopped and no checkpoint had been written yet"):
    search.run(poisoned, str(fresh))
  assert not any(d.isdigit() for d in os.listdir(fresh / "checkpoints"))
  summary = search.run(cfg, str(tmp_path))  # the unpoisoned run resumes from step 6
  assert summary["steps"] == 10


def test_negative_curvature_is_logged_once_with_the_remedy(tmp_path, caplog):
  cfg = tiny_config(method="implicit", max_steps=4, log_every=1, eval_every_epochs=0,
                    cg_maxiter=5)
  with caplog.at_level(logging.WARNING):
    search.run(cfg, str(tmp_path))
  steps = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  negative = [r["step"] for r in steps if r["kind"] == "step" and r["cg_negative_curvature"] > 0]
  notes = [r.getMessage() for r in caplog.records if "met negative curvature" in r.getMessage()]
  assert negative, "the tiny supernet's curvature is expected to be negative somewhere"
  assert len(notes) == 1 and "raise config.damping" in notes[0]
  assert f"by step {negative[0]}" in notes[0]


def _cli(workdir, *flags, env=None, **kw):
  cmd = [sys.executable, "-m", "amended_darts_jax.search", f"--workdir={workdir}", *flags]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


TINY_FLAGS = ("--config.space=s2", "--config.layers=1", "--config.init_channels=2",
              "--config.batch_size=16", "--config.epochs=3")


def _env(cache_dir):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  return env, f"--config.compilation_cache_dir={cache_dir}"


def test_partial_checkpoint_is_ignored_on_resume(tmp_path):
  cfg = tiny_config(method="first_order", max_steps=4, checkpoint_every=2)
  search.run(cfg, str(tmp_path))
  # A write that died half-way leaves only a temporary directory behind.
  partial = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1234"
  partial.mkdir()
  (partial / "junk").write_text("half a checkpoint")
  cfg = tiny_config(method="first_order", max_steps=6, checkpoint_every=2)
  summary = search.run(cfg, str(tmp_path))
  assert summary["steps"] == 6
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())[-1] == 6


@pytest.mark.parametrize("flags, message, extra_env", [
    (("--config.space=nas101",), "error: unknown search space 'nas101'; known spaces: darts, nb201, rdarts_s1, rdarts_s2, rdarts_s3, rdarts_s4, s1, s2",
     {}),
    (("--config.dataset=mnist3d",), "error: config.dataset='mnist3d' is not one of", {}),
    (("--config.batch_size=15",), "error: batch size 15 does not split evenly across 2 devices",
     {}),
    (("--config.method=second_order",), "error: config.method='second_order' is not one of", {}),
    (("--config.conv_pool_impl=kernel",), "error: conv_pool_impl='kernel' could not be built: "
     "turned off by AMENDED_DARTS_CPU_KERNEL=0", {"AMENDED_DARTS_CPU_KERNEL": "0"}),
])
def test_bad_input_is_one_clear_line_and_exit_status_1(tmp_path, flags, message, extra_env):
  env, cache = _env(tmp_path / "cache")
  env.update(extra_env)
  proc = _cli(tmp_path / "run", *TINY_FLAGS, *flags, cache, env=env)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 1
  assert message in err
  assert "Traceback" not in err
  error_lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1
