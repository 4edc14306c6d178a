"""Discrete networks, parameter and multiply-add counts, pictures."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from amended_darts_jax import initializers, networks, ops, spaces, train, visualize
from amended_darts_jax.errors import ConfigError


def _eval_shapes(model, x, train):
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
  return jax.eval_shape(functools.partial(model.init, train=train), rngs, x, 0.0)


def test_darts_v2_parameter_counts_match_darts():
  """DARTS reports 3.3M (CIFAR-10, C=36, 20 cells) and 4.7M (ImageNet, C=48, 14 cells)."""
  cifar = networks.NetworkCIFAR(spaces.DARTS_V2, C=36, layers=20, num_classes=10)
  v = _eval_shapes(cifar, jnp.zeros((1, 32, 32, 3)), train=True)
  assert "auxiliary_head" in str(jax.tree_util.tree_structure(v["params"]))
  assert networks.count_params(v["params"]) == 3_349_342  # DARTS' log: "param size = 3.349342MB"
  assert networks.count_params(v["params"], exclude=None) > 3_349_342
  imagenet = networks.NetworkImageNet(spaces.DARTS_V2, C=48, layers=14, num_classes=1000)
  v = _eval_shapes(imagenet, jnp.zeros((1, 224, 224, 3)), train=True)
  assert round(networks.count_params(v["params"]) / 1e6, 1) == 4.7


def test_count_macs_of_known_convolutions():
  """Multiply-adds of a conv and a dense layer, checked by hand."""
  import flax.linen as nn

  class Tiny(nn.Module):
    conv_pool_impl: str = "auto"

    @nn.compact
    def __call__(self, x, drop_path_rate=0.0, train=False):
      x = nn.Conv(8, (3, 3), (2, 2), padding=((1, 1), (1, 1)))(x)  # 5x5x8 out, 3*3*4 in
      x = ops.DepthwiseConv(3, 1, 1, conv_pool_impl=self.conv_pool_impl)(x)  # 5x5x8 out, 3*3 in
      return nn.Dense(6)(x.reshape(x.shape[0], -1)), None  # 200 in, 6 out

  model = Tiny()
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 10, 10, 4)))
  expected = 5 * 5 * 8 * 3 * 3 * 4 + 5 * 5 * 8 * 3 * 3 + 200 * 6
  assert networks.count_macs(model, v, (10, 10, 4)) == expected


@pytest.fixture(scope="module")
def tiny_cifar():
  model = networks.NetworkCIFAR(spaces.DARTS_V2, C=4, layers=3, num_classes=5,
                                auxiliary=True, conv_pool_impl="conv")
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
  variables = initializers.init_variables(model, 0, x, 0.0, train=True)
  return model, variables, x


def test_discrete_network_shapes_and_auxiliary_head_only_in_training(tiny_cifar):
  model, variables, x = tiny_cifar
  apply = jax.jit(lambda v, x, rate, key, train: model.apply(
      v, x, rate, train=train, rngs={"dropout": key}, mutable=["batch_stats"] if train else False),
      static_argnames="train")
  (logits, aux), _ = apply(variables, x, 0.0, jax.random.PRNGKey(1), True)
  assert logits.shape == (3, 5) and aux.shape == (3, 5)
  logits, aux = apply(variables, x, 0.0, jax.random.PRNGKey(1), False)
  assert logits.shape == (3, 5) and aux is None


def test_drop_path_identity_at_rate_zero_and_in_eval(tiny_cifar):
  model, variables, x = tiny_cifar

  @functools.partial(jax.jit, static_argnames="train")
  def forward(rate, key, train):
    out = model.apply(variables, x, rate, train=train, rngs={"dropout": key},
                      mutable=["batch_stats"] if train else False)
    return (out[0] if train else out)[0]

  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  # Training: rate 0 ignores the key; rate 0.5 depends on it.
  np.testing.assert_array_equal(forward(0.0, k1, True), forward(0.0, k2, True))
  assert not np.allclose(forward(0.5, k1, True), forward(0.5, k2, True))
  # Evaluation: no drop-path whatever the rate.
  np.testing.assert_array_equal(forward(0.5, k1, False), forward(0.0, k2, False))
  x = jnp.arange(24.0).reshape(4, 1, 2, 3)
  np.testing.assert_array_equal(networks.drop_path(x, 0.0, k1), x)
  dropped = networks.drop_path(x, 0.5, jax.random.PRNGKey(3))
  for i in range(4):  # each sample is either zeroed or scaled by 1/(1 - rate)
    assert np.all(dropped[i] == 0) or np.allclose(dropped[i], 2 * x[i])


def test_per_cell_genotype_must_match_depth():
  genotype = spaces.Genotype(cells=(spaces.DARTS_V2.normal,) * 4)
  model = networks.NetworkCIFAR(genotype, C=4, layers=3, num_classes=5)
  with pytest.raises(spaces.GenotypeError, match="4 per-cell genes but the network has 3 cells"):
    _eval_shapes(model, jnp.zeros((1, 32, 32, 3)), train=False)
  model = networks.NetworkCIFAR(genotype, C=4, layers=4, num_classes=5, auxiliary=False)
  logits, aux = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3)), 0.0),
                               _eval_shapes(model, jnp.zeros((1, 32, 32, 3)), train=False))
  assert logits.shape == (2, 5) and aux is None


def test_visualize_writes_dot_png_svg(tmp_path):
  for name, genotype in [("darts", spaces.DARTS_V2),
                         ("s2", spaces.Genotype(cells=(spaces.DARTS_V1.normal,) * 20))]:
    out = visualize.render(genotype, str(tmp_path / name))
    dot = open(out["dot"]).read()
    assert dot.startswith("digraph") and dot.count("subgraph") == (2 if name == "darts" else 20)
    for op, _ in genotype.gene(0, False)[0]:
      assert f'label="{op}"' in dot
    assert open(out["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in open(out["svg"], "rb").read(2000)


@pytest.mark.parametrize("cells, columns, rows", [(1, 1, 1), (3, 3, 1), (5, 5, 1), (20, 5, 4)])
def test_per_cell_pictures_have_a_panel_per_cell_with_labelled_edges(tmp_path, monkeypatch,
                                                                     cells, columns, rows):
  """matplotlib's picture (no graphviz): as many columns as cells up to 5, short op names on
  the edges and the input names as mathtext, not literal c_{k-2}."""
  import matplotlib.pyplot as plt
  monkeypatch.setattr(visualize.shutil, "which", lambda name: None)
  texts = []
  monkeypatch.setattr(plt.Axes, "text", lambda self, x, y, s, **kw: texts.append(s))
  genotype = spaces.Genotype(cells=(spaces.get_space("s2").genotype(
      spaces.get_space("s2").init_alpha(jax.random.PRNGKey(0), 1)).cells[0],) * cells)
  out = visualize.render(genotype, str(tmp_path / "cells"))
  assert out["renderer"] == "matplotlib"
  width, height = plt.imread(out["png"]).shape[1::-1]
  assert (width, height) == (round(4.6 * 110 * columns), round(3.0 * 110 * rows))
  ops_drawn = [t for t in texts if t in visualize.OP_SHORT.values()]
  assert len(ops_drawn) == 8 * cells
  assert texts.count("$c_{k-2}$") == cells and "c_{k-2}" not in texts


def test_a_genotype_with_noise_retrains_and_evaluates(tmp_path):
  """RobustDARTS' S4 genotypes: the network draws its noise in training and evaluation."""
  genotype = spaces.get_space("rdarts_s4").genotype(
      {"normal": np.tile([1.0, 0.0], (14, 1)), "reduce": np.tile([0.0, 1.0], (14, 1))})
  model = networks.NetworkCIFAR(genotype, C=4, layers=3, num_classes=5, auxiliary=False)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  variables = initializers.init_variables(model, 0, x, 0.0, train=True)
  batch = {"image": x, "label": jnp.arange(4) % 5, "mask": jnp.ones(4)}
  evaluate = jax.jit(functools.partial(train.eval_step, model))
  out = evaluate(variables["params"], variables["batch_stats"], batch)
  assert np.isfinite(float(out["loss_sum"])) and float(out["count"]) == 4
  logits = lambda key: model.apply(variables, x, 0.0, train=False, rngs={"dropout": key})[0]
  assert float(jnp.abs(logits(jax.random.PRNGKey(1)) - logits(jax.random.PRNGKey(2))).max()) > 0
  visualize.render(genotype, str(tmp_path / "cells"))
  assert (tmp_path / "cells.png").stat().st_size > 0


@pytest.mark.usefixtures("x64")
def test_scanned_retraining_cells_compute_the_unscanned_function(tiny_genotype):
  """DARTS' CIFAR network at 10 cells, the auxiliary head on, float64: with cells
  8 and 9 as one scan and as two submodules, from the same weights, the
  training-mode logits, auxiliary logits, batch statistics and weight gradient
  agree (drop-path at rate 0: the scan draws other masks), and so do the
  evaluation logits. The ImageNet network scans the same cells (its cell stack is
  the same module); a per-cell genotype scans only its runs of one gene."""
  cls = networks.NetworkCIFAR
  scanned = cls(tiny_genotype, C=4, layers=10, num_classes=5, auxiliary=True, scan_cells=True)
  plain = scanned.clone(scan_cells=False)
  assert scanned.cell_runs == ((8, 9),)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3), jnp.float64)
  labels = jnp.array([1, 3])
  variables = jax.tree.map(lambda a: a.astype(jnp.float64),
                           networks.init_variables(scanned, 0, x[:1], 0.0, train=True))
  assert "stacked_cells8to9" in variables["params"]["cells"]

  def quantities(model, variables):
    def loss(params):
      (logits, aux), updates = model.apply({"params": params, "batch_stats":
                                            variables["batch_stats"]}, x, 0.0, train=True,
                                           rngs={"dropout": jax.random.PRNGKey(1)},
                                           mutable=["batch_stats"])
      ce = optax.softmax_cross_entropy_with_integer_labels
      return (ce(logits, labels) + 0.4 * ce(aux, labels)).mean(), (logits, aux, updates)
    (_, outputs), grad = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    logits, aux, updates = outputs
    return logits, aux, updates, {"params": grad}, model.apply(variables, x, 0.0)[0]

  runs = scanned.cell_runs
  got = jax.jit(functools.partial(quantities, scanned))(variables)
  want = jax.jit(functools.partial(quantities, plain))(networks.unstack_cells(variables, runs))
  got = (*got[:2], networks.unstack_cells(got[2], runs), networks.unstack_cells(got[3], runs),
         got[4])
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
  imagenet = networks.NetworkImageNet(tiny_genotype, C=4, layers=10, num_classes=5,
                                      scan_cells=True)
  shapes = jax.eval_shape(functools.partial(imagenet.init, train=True),
                          {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                          jnp.zeros((1, 64, 64, 3)), 0.0)
  assert imagenet.cell_runs == ((8, 9),) and "stacked_cells8to9" in shapes["params"]["cells"]
  genes = [tiny_genotype.normal] * 14
  genes[7] = spaces.DARTS_V2.normal
  per_cell = cls(spaces.Genotype(cells=tuple(genes)), C=4, layers=14, num_classes=5,
                 scan_cells=True)
  assert networks.cell_runs(14) == ((2, 3), (6, 8), (11, 13))
  assert per_cell.cell_runs == ((2, 3), (11, 13))  # 6 and 8 stand alone around 7


def test_scan_setting_auto_scans_off_the_cpu_only():
  assert networks.scans("on") and not networks.scans("off")
  assert networks.scans("auto") == (jax.default_backend() != "cpu")
  with pytest.raises(ConfigError, match="scan_cells must be one of auto, on, off; got 'yes'"):
    networks.scans("yes")
