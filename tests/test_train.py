"""Retraining: the step, the auxiliary head and drop-path, the command line (its runs across
processes and after SIGKILL: test_runs.py)."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amended_darts_jax import spaces, train, training
from amended_darts_jax.configs import train_default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def tiny_config(genotype_path, **overrides):
  cfg = train_default.get_config()
  cfg.genotype = str(genotype_path)
  cfg.init_channels = 4
  cfg.layers = 3
  cfg.batch_size = 16
  cfg.epochs = 2
  cfg.compilation_cache_dir = ""
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _setup(cfg, steps_per_epoch=10):
  genotype = spaces.get_genotype(cfg.genotype)
  model = train.make_model(cfg, genotype, 10)
  tc = train.train_config(cfg, model, steps_per_epoch)
  tx = tc.tx
  state = train.initial_state(cfg, model, tx, (8, 8, 1))
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  batch = {"image": jax.random.normal(k1, (16, 8, 8, 1)),
           "label": jax.random.randint(k2, (16,), 0, 10)}
  return tc, state, batch


def test_training_steps_lower_the_loss_on_a_fixed_batch(genotype_path):
  tc, state, batch = _setup(tiny_config(genotype_path, drop_path_prob=0.0))
  step = jax.jit(functools.partial(train.train_step, tc))
  state, first = step(state, batch)
  for _ in range(15):
    state, last = step(state, batch)
  assert int(state.step) == 16 and int(state.bad_step) == -1
  assert float(last["train_loss"]) < 0.7 * float(first["train_loss"])


def test_auxiliary_loss_is_used_only_in_training(genotype_path):
  tc, state, batch = _setup(tiny_config(genotype_path, drop_path_prob=0.0))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  rngs = {"dropout": jax.random.PRNGKey(0)}
  logits, aux = tc.model.apply(variables, batch["image"], 0.0, train=False)
  assert aux is None
  (logits_t, aux_t), _ = tc.model.apply(variables, batch["image"], 0.0, train=True,
                                        mutable=["batch_stats"], rngs=rngs)
  assert aux_t is not None and aux_t.shape == logits_t.shape
  # The training loss is the main cross-entropy plus exactly 0.4 times the auxiliary one.
  with_aux, _ = train.train_loss(tc, state.params, state.batch_stats, batch,
                                 jax.random.PRNGKey(0), 0.0)
  main = training.cross_entropy(logits_t, batch["label"])
  side = training.cross_entropy(aux_t, batch["label"])
  np.testing.assert_allclose(with_aux, main + 0.4 * side, rtol=1e-5)
  assert float(side) > 0.1


def test_drop_path_is_active_only_in_training_and_ramps_with_the_epoch(genotype_path):
  tc, state, batch = _setup(tiny_config(genotype_path, drop_path_prob=0.5, epochs=4))
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def train_logits(rate, seed):
    rngs = {"dropout": jax.random.PRNGKey(seed)}
    (logits, _), _ = tc.model.apply(variables, batch["image"], rate, train=True,
                                    mutable=["batch_stats"], rngs=rngs)
    return logits

  # Training: different keys drop different paths at rate 0.5, none at rate 0.
  assert float(jnp.abs(train_logits(0.5, 0) - train_logits(0.5, 1)).max()) > 1e-4
  np.testing.assert_allclose(train_logits(0.0, 0), train_logits(0.0, 1), rtol=1e-6, atol=1e-6)
  # Evaluation ignores the rate.
  eval_logits = lambda rate: tc.model.apply(variables, batch["image"], rate, train=False)[0]
  np.testing.assert_allclose(eval_logits(0.5), eval_logits(0.0), rtol=1e-6, atol=1e-6)
  # DARTS' ramp: p * epoch / epochs, with 10 steps per epoch here.
  rates = [float(train.drop_path_rate(tc, jnp.array(s))) for s in (0, 9, 10, 25, 39)]
  np.testing.assert_allclose(rates, [0.0, 0.0, 0.125, 0.25, 0.375])


def _cli(workdir, *flags, env=None):
  cmd = [sys.executable, "-m", "amended_darts_jax.train", f"--workdir={workdir}", *flags]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  return env


def _tiny_flags(genotype_path, cache):
  return (f"--config.genotype={genotype_path}", "--config.init_channels=4",
          "--config.layers=3", "--config.batch_size=16", "--config.epochs=2",
          "--config.eval_every_epochs=0", f"--config.compilation_cache_dir={cache}")


def test_dry_run_prints_the_parameter_count(tmp_path, genotype_path, tiny_genotype):
  proc = _cli(tmp_path / "dry", *_tiny_flags(genotype_path, ""), "--config.dry_run=True",
              env=_env())
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  cfg = tiny_config(genotype_path)
  expected = train.describe_network(cfg, tiny_genotype)["params"]
  assert f"{expected / 1e6:.3f}M parameters (auxiliary head excluded)" in out
  assert "multiply-adds" in out
  assert not (tmp_path / "dry" / "checkpoints").exists()


@pytest.mark.parametrize("genotype, message", [
    ("missing", "error: cannot read genotype file"),
    ("malformed", "error: "),
    ("DARTS_V9", "error: 'DARTS_V9' is neither a known genotype (DARTS_V1, DARTS_V2)"),
])
def test_bad_genotype_is_one_clear_line_and_exit_status_1(tmp_path, genotype, message):
  path = {"missing": str(tmp_path / "nowhere" / "genotype.json"),
          "malformed": str(tmp_path / "bad.json"), "DARTS_V9": "DARTS_V9"}[genotype]
  (tmp_path / "bad.json").write_text('{"normal": [["sep_conv_3x3"]], "reduce": 3}')
  proc = _cli(tmp_path / "run", f"--config.genotype={path}", "--config.dry_run=True",
              env=_env())
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1
  assert message in err and "Traceback" not in err
  assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
