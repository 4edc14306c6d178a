"""Retraining's regularizers inside the supernet: drop-path, dropout, the auxiliary head.

Each is off by default; on, it must change the training-mode loss as it should,
leave eval mode alone, and keep the exact amended term equal to its finite
differences at a fixed key (docs/math.md §4). Most supernets here mix
skip_connect and avg_pool_3x3 on s2's edges (`LIGHT`): drop-path spares the
one and drops the other, and the programs stay small enough to compile fast
(the `light_space` fixture, tests/conftest.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amended_darts_jax import hypergrad as hg
from amended_darts_jax import initializers, search, supernet, training
from amended_darts_jax.errors import ConfigError
from tests.conftest import LIGHT_SPACE
from tests.test_search import _state_and_batches, tiny_config

KEY = jax.random.PRNGKey(3)
LIGHT = LIGHT_SPACE
pytestmark = pytest.mark.usefixtures("light_space")


def _variables(model, x, alpha):
  return initializers.init_variables(model, 0, x, alpha, train=True)


@functools.partial(jax.jit, static_argnames=("model", "train", "aux"))
def _apply(model, variables, x, alpha, train, rate=0.0, key=KEY, aux=False):
  mutable = ["batch_stats", "aux"] if aux else ["batch_stats"]
  out, updates = model.apply(variables, x, alpha, train=train, drop_path_rate=rate,
                             mutable=mutable, rngs={"dropout": key})
  return (out, updates) if aux else out


@pytest.fixture(scope="module")
def problem():
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 1))
  model = supernet.Supernet(LIGHT, C=2, layers=1, num_classes=4)  # its head follows cell 0
  alpha = model.init_alpha(jax.random.PRNGKey(2))
  return model, x, alpha, _variables(model, x, alpha)


@pytest.mark.parametrize("edge_groups", [True, False])
def test_drop_path_at_rate_zero_is_no_drop_path_and_above_zero_changes_only_training(
    problem, edge_groups):
  plain, x, alpha, variables = problem
  plain = plain.clone(edge_groups=edge_groups)
  if not edge_groups:
    variables = _variables(plain, x, alpha)
  dropped = plain.clone(drop_path=True)
  base = _apply(plain, variables, x, alpha, train=True)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)  # two programs
  close(_apply(dropped, variables, x, alpha, True, rate=0.0), base)
  at_half = _apply(dropped, variables, x, alpha, True, rate=0.5)
  assert float(jnp.abs(at_half - base).max()) > 1e-3
  # The same key draws the same masks; another key, others.
  np.testing.assert_array_equal(_apply(dropped, variables, x, alpha, True, rate=0.5), at_half)
  other = _apply(dropped, variables, x, alpha, True, rate=0.5, key=jax.random.PRNGKey(9))
  assert float(jnp.abs(other - at_half).max()) > 1e-3
  close(_apply(dropped, variables, x, alpha, False, rate=0.5),
        _apply(plain, variables, x, alpha, False))


def test_drop_path_zeroes_whole_samples_of_a_non_identity_op_and_spares_skip():
  """One sep_conv edge and one skip edge into a single node, read off the cell."""
  x = jax.random.normal(jax.random.PRNGKey(4), (64, 4, 4, 2))
  cell = supernet.MixedOp(("skip_connect", "sep_conv_3x3"), 2, 1, train=True, drop_path=True)
  variables = initializers.init_variables(cell, 0, x, jnp.array([0.0, 1.0]), 0.0)
  f = jax.jit(lambda w, rate: cell.apply(variables, x, w, rate, rngs={"dropout": KEY},
                                         mutable=["batch_stats"])[0])
  np.testing.assert_array_equal(f(jnp.array([1.0, 0.0]), 0.75), x)  # skip: never dropped
  full, dropped = f(jnp.array([0.0, 1.0]), 0.0), f(jnp.array([0.0, 1.0]), 0.75)
  zeroed = np.all(np.asarray(dropped) == 0, axis=(1, 2, 3))
  kept = ~zeroed
  np.testing.assert_allclose(np.asarray(dropped)[kept], np.asarray(full)[kept] / 0.25, rtol=1e-5)
  assert 0.6 < zeroed.mean() < 0.9  # 75% expected of 64 samples (binomial sd 5.4%)


def test_dropout_changes_training_and_leaves_eval_alone(problem):
  plain, x, alpha, variables = problem
  drop = plain.clone(dropout=0.5)
  base = _apply(plain, variables, x, alpha, True)
  assert float(jnp.abs(_apply(drop, variables, x, alpha, True) - base).max()) > 1e-3
  np.testing.assert_allclose(_apply(drop, variables, x, alpha, False),
                             _apply(plain, variables, x, alpha, False), rtol=1e-6, atol=1e-7)


def test_auxiliary_loss_appears_only_in_training_and_adds_its_weighted_cross_entropy(problem):
  plain, x, alpha, _ = problem
  model = plain.clone(auxiliary=True)
  variables = _variables(model, x, alpha)
  assert "auxiliary_head" in variables["params"] and "auxiliary_head" not in _variables(
      plain, x, alpha)["params"]
  without = {"params": {k: v for k, v in variables["params"].items() if k != "auxiliary_head"},
             "batch_stats": variables["batch_stats"]}
  labels = jnp.arange(6) % 4
  batch = {"image": x, "label": labels, "batch_stats": variables["batch_stats"]}
  loss = jax.jit(lambda w: search.supernet_loss(model, variables["params"], alpha, batch, w)[0],
                 static_argnums=0)
  plain_loss = jax.jit(lambda: search.supernet_loss(plain, without["params"], alpha, batch)[0])()
  # Weight 0 is the plain supernet's loss; the head does not touch the main path.
  np.testing.assert_allclose(loss(0.0), plain_loss, rtol=1e-6)
  _, updates = _apply(model, variables, x, alpha, True, aux=True)
  (aux_logits,) = updates["aux"]["logits"]
  assert aux_logits.shape == (6, 4)
  np.testing.assert_allclose(loss(0.4) - loss(0.0),
                             0.4 * training.cross_entropy(aux_logits, labels), rtol=1e-5)
  # Eval mode: no head, the plain supernet's logits.
  out, updates = _apply(model, variables, x, alpha, False, aux=True)
  assert "aux" not in updates
  np.testing.assert_allclose(out, _apply(plain, without, x, alpha, False), rtol=1e-6, atol=1e-7)


@pytest.mark.usefixtures("x64")
def test_exact_amended_term_with_every_regularizer_agrees_with_finite_differences():
  """float64, softplus throughout (the auxiliary head too), a fixed key: the finite
  differences see the same masks and converge to the exact term at second order."""
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 1), jnp.float64)
  model = supernet.Supernet(LIGHT, C=2, layers=1, num_classes=4, act="softplus", drop_path=True,
                            dropout=0.3, auxiliary=True)
  alpha = jax.tree.map(lambda a: a.astype(jnp.float64),
                       model.init_alpha(jax.random.PRNGKey(2)))
  variables = jax.tree.map(lambda a: a.astype(jnp.float64), _variables(model, x, alpha))
  loss = lambda w, a, b: search.supernet_loss(model, w, a, b, 0.4)[0]
  labels = jnp.arange(8) % 4
  batch = lambda key: {"image": x, "label": labels, "batch_stats": variables["batch_stats"],
                       "rng": key, "drop_path_rate": 0.3}
  w = variables["params"]
  v = jax.jit(jax.grad(loss))(w, alpha, batch(jax.random.PRNGKey(7)))
  term = jax.jit(lambda key, products="exact", r=1e-4: hg.amended_term(
      loss, w, alpha, batch(key), v, eta=0.1, weight_decay=3e-4, products=products, r=r),
      static_argnames="products")
  exact = term(KEY)
  rel = lambda a, b: float(hg.tree_norm(hg.tree_sub(a, b)) / hg.tree_norm(b))
  coarse, fine = rel(term(KEY, "fd", 1e-3), exact), rel(term(KEY, "fd", 1e-4), exact)
  assert fine < 1e-5 and coarse / fine > 50  # second order: 100x per decade of r
  # The masks matter: another key gives another term, so the agreement can fail.
  assert rel(term(jax.random.PRNGKey(11)), exact) > 1e-2


def test_search_step_with_regularizers_draws_its_masks_from_the_step_and_repeats():
  """The weight step's gradient is the one at the masks `search_batches` draws."""
  cfg = tiny_config(space=LIGHT, method="first_order", drop_path_prob=0.4, dropout=0.2, auxiliary=True,
                    epochs=4)
  sc, state, train, val = _state_and_batches(cfg)
  state = state.replace(step=jnp.array(25, jnp.int32))  # epoch 2 of 4 at 10 steps an epoch
  t, v = search.search_batches(sc, state, train, val)
  np.testing.assert_allclose(t["drop_path_rate"], 0.4 * 2 / 4)
  assert not np.array_equal(t["rng"], v["rng"])  # the two losses draw their own masks
  step = jax.jit(functools.partial(search.search_step, sc))
  new, metrics = step(state, train, val)
  again, _ = step(state, train, val)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  (loss, _), grad = jax.value_and_grad(search.loss_of(sc), has_aux=True)(state.params,
                                                                          state.alpha, t)
  updates, _ = sc.w_tx.update(grad, state.w_opt_state, state.params)
  for a, b in zip(jax.tree.leaves(new.params),
                  jax.tree.leaves(jax.tree.map(jnp.add, state.params, updates))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["train_loss"], loss, rtol=1e-5)
  assert "auxiliary_head" in state.params


@pytest.mark.parametrize("field,value", [("drop_path_prob", 1.0), ("dropout", -0.1),
                                         ("auxiliary_weight", -1.0)])
def test_bad_regularizer_settings_are_config_errors(field, value):
  with pytest.raises(ConfigError, match=f"config.{field}"):
    search.validate_config(tiny_config(**{field: value}))


def test_the_consistent_config_searches_s1_at_width_36_with_every_regularizer():
  from amended_darts_jax.configs import s1_consistent
  cfg = s1_consistent.get_config()
  search.validate_config(cfg)
  model = search.make_model(cfg, 10)
  assert (model.space_name, model.C, model.layers) == ("s1", 36, 8)
  assert model.drop_path and model.auxiliary and cfg.cutout == 16
  sc = search.step_config(cfg, model, steps_per_epoch=10)
  assert sc.auxiliary_weight == 0.4 and sc.drop_path_prob == 0.2
