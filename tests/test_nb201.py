"""NAS-Bench-201: its space, genotypes and architecture strings, its networks, a search in it,
and the look-up of a searched cell through the benchmark's API."""

import functools
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amended_darts_jax import initializers, nb201, networks, search, spaces, supernet, train
from amended_darts_jax.configs import default, train_nb201
from amended_darts_jax.errors import ConfigError, UserError

# The benchmark's best CIFAR-10 cell and the cell DARTS collapses to on it.
BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
ALL_SKIP = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"


def _arch(op_per_edge):
  return spaces.Genotype(nb201=tuple((op, src) for op, (src, _) in
                                     zip(op_per_edge, spaces.NB201_EDGES)))


def test_space_counts_and_discretization_keep_none():
  space = spaces.get_space("nb201")
  assert space.ops == ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
  assert space.alpha_shapes() == {"cell": (6, 5)}
  assert space.num_architectures() == 5 ** 6 == 15_625  # the benchmark's count
  alpha = np.zeros((6, 5))
  alpha[np.arange(6), [0, 3, 1, 4, 2, 0]] = 1.0  # none is the strongest on edges 0 and 5
  g = space.genotype({"cell": alpha})
  assert g.arch_str == ("|none~0|+|nor_conv_3x3~0|skip_connect~1|+|avg_pool_3x3~0|"
                        "nor_conv_1x1~1|none~2|")
  # The sampler draws valid cells, all 15625 equally likely: every op on every edge.
  rng = np.random.default_rng(0)
  drawn = [space.sample_genotype(rng) for _ in range(300)]
  for e in range(6):
    assert {g.nb201[e][0] for g in drawn} == set(space.ops)


def test_architecture_strings_round_trip_and_bad_ones_are_clear_errors(tmp_path):
  for text in (BEST, ALL_SKIP):
    g = spaces.get_genotype(text)
    assert g.is_nb201 and g.arch_str == text
    path = tmp_path / "genotype.json"
    g.save(str(path))
    assert json.loads(path.read_text()) == {"nb201": [list(p) for p in g.nb201]}
    assert spaces.load_genotype(str(path)) == g
  for bad, message in (("|nor_conv_3x3~0|+|skip_connect~0|", "three '\\+'-separated nodes"),
                       (BEST.replace("nor_conv_1x1", "x").replace("skip_connect~0", "conv~0"),
                        "unknown operation 'conv'"),
                       (BEST.replace("skip_connect~0", "skip_connect~1"),
                        "edge 3 runs from state 0 to node 3")):
    with pytest.raises(spaces.GenotypeError, match=message):
      spaces.get_genotype(bad)
  with pytest.raises(spaces.GenotypeError, match="only the field 'nb201'"):
    spaces.Genotype.from_dict({"nb201": [], "normal": []})
  with pytest.raises(spaces.GenotypeError, match="only NAS-Bench-201 genotypes"):
    _ = spaces.DARTS_V2.arch_str


@pytest.mark.parametrize("dataset_classes, cell, expected", [
    # The benchmark's recorded parameter counts (its `params`, in millions, CIFAR-10 and
    # CIFAR-100): the largest cell (every edge nor_conv_3x3) and any cell without
    # parameters (the smallest), at its standard size C=16, 5 cells per stage.
    (10, ("nor_conv_3x3",) * 6, 1_531_546),
    (10, ("skip_connect", "none", "avg_pool_3x3", "skip_connect", "none", "none"), 73_306),
    (100, ("nor_conv_3x3",) * 6, 1_537_396),
    (100, ("none",) * 6, 79_156),
])
def test_parameter_count_equals_the_benchmarks(dataset_classes, cell, expected):
  model = networks.NB201Network(_arch(cell), C=16, layers=15, num_classes=dataset_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  assert networks.count_params(shapes["params"]) == expected


def test_supernet_at_a_one_hot_alpha_is_the_benchmarks_cell(x64):
  """The search network with alpha one-hot on a cell's operations computes that cell's
  discrete network (same weights, train and eval mode), and its alpha gradient reaches
  every operation of every edge elsewhere."""
  ops_ = ("nor_conv_3x3", "none", "avg_pool_3x3", "skip_connect", "nor_conv_1x1",
          "nor_conv_3x3")
  space = spaces.get_space("nb201")
  alpha = {"cell": jnp.asarray(1e4 * np.eye(5)[[space.ops.index(o) for o in ops_]])}
  model = supernet.Supernet("nb201", C=4, layers=3, num_classes=5, act="softplus")
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 1), jnp.float64)
  variables = jax.tree.map(lambda a: a.astype(jnp.float64),
                           initializers.init_variables(model, 0, x, alpha, train=True))
  net = networks.NB201Network(_arch(ops_), C=4, layers=3, num_classes=5, act="softplus")

  def to_network(tree):  # cell<i>/stacked_from<src>[k]/<op>/... -> cell<i>/op<e>/...
    out = {}
    for name, sub in tree.items():
      if not name.startswith("cell"):
        out[name] = sub
        continue
      out[name] = {}
      for group, leaves in sub.items():
        src = (int(group.removeprefix(initializers.STACKED_PREFIX + "from"))
               if group.startswith(initializers.STACKED_PREFIX) else None)
        edges = ([e for e, (s, _) in enumerate(space.edges) if s == src] if src is not None
                 else [int(group.removeprefix("edge"))])
        for k, e in enumerate(edges):
          if ops_[e] in leaves:
            out[name][f"op{e}"] = jax.tree.map(
                lambda a, k=k: a[k] if src is not None else a, leaves[ops_[e]])
    return out

  def merge(base, given, path=""):  # the network's variables, the supernet's where it has them
    out = {}
    for name, leaf in base.items():
      if isinstance(leaf, dict):
        out[name] = merge(leaf, given.get(name, {}), f"{path}/{name}")
      elif name in given:
        assert given[name].shape == leaf.shape, f"{path}/{name}"
        out[name] = given[name]
      else:  # only the affine batch norm of the discrete cells, at its initial 1 and 0
        assert name in ("scale", "bias") and "BatchNorm" in path and path.startswith("/cell"), path
        out[name] = leaf
    assert set(given) <= set(base), (path, set(given) - set(base))
    return out

  base = jax.tree.map(lambda a: a.astype(jnp.float64), initializers.init_variables(net, 1, x))
  net_vars = {c: merge(base[c], to_network(t), "") for c, t in variables.items()}
  # Each network's forward compiled once per mode (op by op, the test took minutes).
  searched = jax.jit(lambda v, a, mode: model.apply(v, x, a, train=mode,
                                                    mutable=["batch_stats"])[0],
                     static_argnums=2)
  discrete = jax.jit(lambda v, mode: net.apply(v, x, train=mode, mutable=["batch_stats"],
                                               rngs={"dropout": jax.random.PRNGKey(0)})[0][0],
                     static_argnums=1)
  for mode in (False, True):
    np.testing.assert_allclose(searched(variables, alpha, mode), discrete(net_vars, mode),
                               rtol=1e-10, atol=1e-12)
  loss = lambda a: jnp.sum(jnp.sin(searched(variables, a, True)))
  grad = jax.jit(jax.grad(loss))({"cell": 0.1 * jax.random.normal(jax.random.PRNGKey(1),
                                                                  (6, 5))})
  assert float(jnp.min(jnp.abs(grad["cell"]))) > 0


def test_config_errors_are_one_sentence(tmp_path):
  from amended_darts_jax.configs import nb201 as nb201_search
  search.validate_config(nb201_search.get_config())  # the shipped configs are valid
  train.validate_config(train_nb201.get_config())
  cfg = search_config(layers=4)
  with pytest.raises(ConfigError, match="multiple of 3; got 4"):
    search.validate_config(cfg)
  with pytest.raises(ConfigError, match="no auxiliary head"):
    search.validate_config(search_config(auxiliary=True))
  with pytest.raises(ConfigError, match="does not exist"):
    search.validate_config(search_config(nb201_benchmark=str(tmp_path / "missing.pickle.pbz2")))
  with pytest.raises(ConfigError, match="not 'nb201'"):
    search.validate_config(search_config(space="s2", nb201_benchmark=str(tmp_path)))
  cfg = train_nb201.get_config()
  cfg.auxiliary = True
  with pytest.raises(ConfigError, match="no auxiliary head"):
    train.make_model(cfg, spaces.get_genotype(BEST), 10)


def test_lookup_needs_the_package_and_reads_the_record(tmp_path, monkeypatch):
  path = tmp_path / "NATS-tss-v1_0-3ffb9-simple"
  path.mkdir()
  monkeypatch.setitem(sys.modules, "nats_bench", None)  # not installed
  with pytest.raises(ConfigError, match="pip install nats_bench"):
    nb201.check(str(path))
  pth = tmp_path / "NAS-Bench-201-v1_1-096897.pth"
  pth.touch()
  monkeypatch.setitem(sys.modules, "nas_201_api", None)
  with pytest.raises(ConfigError, match="pip install nas-bench-201"):
    nb201.check(str(pth))
  api = _FakeAPI()
  monkeypatch.setitem(sys.modules, "nats_bench", types.SimpleNamespace(
      create=lambda p, space, fast_mode, verbose: api.opened(p, space)))
  record = nb201.lookup(nb201.open_benchmark(str(path)), ALL_SKIP)
  assert api.calls == [(str(path), "tss")]
  assert record["index"] == 7 and record["arch"] == ALL_SKIP
  assert record["cifar10"] == {"train_accuracy": 60.0, "test_accuracy": 54.3, "params_mb": 0.073306}
  assert record["cifar10-valid"]["valid_accuracy"] == 39.8
  with pytest.raises(UserError, match="not in the benchmark"):
    nb201.lookup(api, BEST)


class _FakeAPI:
  """The two calls of nats_bench's API that the look-up makes, with the benchmark's keys."""

  def __init__(self):
    self.calls = []

  def opened(self, path, space):
    self.calls.append((path, space))
    return self

  def query_index_by_arch(self, arch):
    return 7 if arch == ALL_SKIP else -1

  def get_more_info(self, index, dataset, hp, is_random):
    assert (index, hp, is_random) == (7, "200", False)
    if dataset == "cifar10-valid":
      return {"train-accuracy": 60.0, "valid-accuracy": 39.8, "test-accuracy": 54.3}
    return {"train-accuracy": 60.0, "test-accuracy": 54.3}

  def get_cost_info(self, index, dataset, hp):
    return {"params": 0.073306, "flops": 7.8}


def search_config(**overrides):
  cfg = default.get_config()
  cfg.update(space="nb201", layers=3, init_channels=2, batch_size=16, epochs=1, max_steps=2,
             log_every=1, checkpoint_every=2, method="first_order")
  cfg.update(**overrides)
  return cfg


def test_search_writes_the_arch_string_and_looks_the_cell_up_then_it_retrains(tmp_path,
                                                                              monkeypatch):
  bench = tmp_path / "NATS-tss-v1_0-3ffb9-simple"
  bench.mkdir()
  api = _FakeAPI()
  api.query_index_by_arch = lambda arch: 7
  monkeypatch.setitem(sys.modules, "nats_bench", types.SimpleNamespace(
      create=lambda p, space, fast_mode, verbose: api.opened(p, space)))
  cfg = search_config(nb201_benchmark=str(bench), compilation_cache_dir="")
  workdir = tmp_path / "search"
  summary = search.run(cfg, str(workdir))
  genotype = spaces.load_genotype(str(workdir / "genotype.json"))
  assert genotype.is_nb201 and summary["nb201_arch"] == genotype.arch_str
  assert (workdir / "nb201_arch.txt").read_text() == genotype.arch_str + "\n"
  assert json.loads((workdir / "nb201_lookup.json").read_text())["arch"] == genotype.arch_str
  assert "cell" in json.loads((workdir / "alphas.json").read_text())
  epochs = [json.loads(line) for line in open(workdir / "metrics.jsonl")
            if '"epoch"' in line and json.loads(line)["kind"] == "epoch"]
  assert epochs and epochs[0]["normal_edges"] == 6.0 and "none_weight" in epochs[0]
  assert (workdir / "cells.png").stat().st_size > 100
  # The searched cell retrains in the benchmark's network.
  tcfg = train_nb201.get_config()
  tcfg.update(genotype=str(workdir / "genotype.json"), dataset="digits", init_channels=2,
              layers=3, batch_size=16, epochs=1, max_steps=2, log_every=1, checkpoint_every=2,
              crop_padding=1, flip=False, compilation_cache_dir="")
  results = train.run(tcfg, str(tmp_path / "train"))
  assert 0.0 <= results["final_top1"] <= 1.0 and results["params"] > 0
  assert os.path.exists(tmp_path / "train" / "results.json")


def test_the_benchmarks_optimizer_nesterov_without_clipping():
  """PyTorch's SGD with Nesterov momentum, by hand: b = m b + g (b = g at first),
  p -= lr (g + m b), with decay added to g first; grad_clip=0 leaves a huge gradient whole."""
  from amended_darts_jax import training
  lr, m, wd = 0.1, 0.9, 5e-4
  tx = training.sgd(lambda step: lr, grad_clip=0.0, weight_decay=wd, momentum=m, nesterov=True)
  p = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(p)
  grads = [jnp.array([300.0, -40.0]), jnp.array([-5.0, 7.0])]
  ref, buf = np.array([1.0, -2.0]), None
  for g in grads:
    updates, state = tx.update({"w": g}, state, p)
    p = {"w": p["w"] + updates["w"]}
    d = np.asarray(g) + wd * ref
    buf = d if buf is None else m * buf + d
    ref = ref - lr * (d + m * buf)
  np.testing.assert_allclose(p["w"], ref, rtol=1e-6)


@pytest.mark.usefixtures("x64")
def test_scanned_stages_compute_the_unscanned_networks():
  """6 cells, two a stage, each stage one scan: the search network (shared alpha)
  and the discrete network, from the same draw, give the unscanned ones' training
  logits, batch statistics and alpha or weight gradient in float64."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1), jnp.float64)
  labels = jnp.array([0, 1, 2, 1])
  ce = lambda logits: -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
  search_net = supernet.Supernet("nb201", C=2, layers=6, num_classes=3, act="softplus",
                                 scan_cells=True)
  alpha = jax.tree.map(lambda a: a.astype(jnp.float64),
                       search_net.init_alpha(jax.random.PRNGKey(1)))
  discrete = networks.NB201Network(spaces.get_genotype(BEST), C=2, layers=6, num_classes=3,
                                   act="softplus", scan_cells=True)
  # The search network's alpha gradient, the discrete network's weight gradient.
  for model, arg, argnum in ((search_net, alpha, 1), (discrete, 0.0, 0)):
    assert model.cell_runs == ((0, 1), (2, 3), (4, 5))
    runs = model.cell_runs
    variables = jax.tree.map(lambda a: a.astype(jnp.float64),
                             networks.init_variables(model, 0, x, arg, train=True))
    assert {k for k in variables["params"] if k.startswith("stacked_cells")} == {
        "stacked_cells0to1", "stacked_cells2to3", "stacked_cells4to5"}

    def quantities(model, variables):
      def loss(params, arg):
        out, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                   x, arg, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": jax.random.PRNGKey(2)})
        logits = out[0] if isinstance(out, tuple) else out  # (logits, None) when discrete
        return ce(logits), (logits, updates)
      (_, aux), grad = jax.value_and_grad(loss, argnums=argnum, has_aux=True)(
          variables["params"], arg)
      return aux, ({"params": grad} if argnum == 0 else grad)

    got = jax.jit(functools.partial(quantities, model))(variables)
    want = jax.jit(functools.partial(quantities, model.clone(scan_cells=False)))(
        networks.unstack_cells(variables, runs))
    (logits, updates), grad = got
    got = ((logits, networks.unstack_cells(updates, runs)),
           networks.unstack_cells(grad, runs) if argnum == 0 else grad)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
