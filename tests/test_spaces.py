"""Search spaces, discretization and genotype files."""

import json
import math

import jax
import numpy as np
import pytest

from amended_darts_jax import spaces


def test_architecture_counts_match_direct_count():
  # darts: per node choose 2 of its i+2 inputs, 7 non-none ops per kept edge; two cell types.
  per_cell = math.prod(math.comb(i + 2, 2) for i in range(4)) * 7 ** 8
  assert spaces.get_space("darts").num_architectures() == per_cell ** 2
  assert spaces.get_space("darts").num_architectures() == 1_076_746_950_455_072_400
  assert spaces.get_space("s1").num_architectures() == 7 ** 16 == 33_232_930_569_601
  assert spaces.get_space("s2").num_architectures() == 2 ** 160
  assert spaces.get_space("s2_all").num_architectures() == 7 ** 160
  # RobustDARTS' S2 and S3: the darts cell with two kept operations (S3's none is never kept).
  two_ops = (1 * 3 * 6 * 10 * 2 ** 8) ** 2
  assert spaces.get_space("rdarts_s2").num_architectures() == two_ops == 46_080 ** 2
  assert spaces.get_space("rdarts_s3").num_architectures() == two_ops
  # S1 has two operations on every edge (different ones per edge and cell type), S4 two
  # on all: the same count.
  assert spaces.get_space("rdarts_s1").num_architectures() == two_ops
  assert spaces.get_space("rdarts_s4").num_architectures() == two_ops


def test_per_edge_count_is_a_sum_over_kept_edge_pairs():
  """A 2-node cell whose edges keep 3, 1, 2, 2 and 1 operations (none is never kept):
  node 0 keeps both its edges (3 * 1), node 1 two of three (2*2 + 2*1 + 2*1 = 8)."""
  ops = (("none", "skip_connect", "sep_conv_3x3", "max_pool_3x3"),
         ("none", "none", "none", "skip_connect"),
         ("none", "none", "skip_connect", "sep_conv_3x3"),
         ("none", "none", "avg_pool_3x3", "sep_conv_3x3"),
         ("none", "none", "none", "dil_conv_3x3"))
  edges = ((0, 0), (1, 0), (0, 1), (1, 1), (2, 1))
  space = spaces.SearchSpace("t", spaces.PRIMITIVES, edges, per_cell=False, discretize="top2",
                             default_layers=3, steps=2, edge_ops=(ops, ops))
  assert space.num_ops == 4 and space.ops_of(1, True) == ops[1]
  assert space.num_architectures() == (3 * 1 * 8) ** 2


def test_rdarts_s1_mixes_its_published_pair_on_each_edge():
  s1 = spaces.get_space("rdarts_s1")
  assert s1.num_edges == 14 and s1.num_ops == 2
  assert s1.alpha_shapes() == {"normal": (14, 2), "reduce": (14, 2)}
  # Zela et al.'s table in DARTS' edge order: edge 5 is node 2's c_{k-2}, 12 and 13 node 3's
  # nodes 1 and 2.
  assert s1.ops_of(5, False) == ("max_pool_3x3", "skip_connect")
  assert s1.ops_of(12, False) == s1.ops_of(13, False) == ("dil_conv_3x3", "dil_conv_5x5")
  assert s1.ops_of(0, True) == ("max_pool_3x3", "avg_pool_3x3")
  assert sum("skip_connect" in s1.ops_of(e, False) for e in range(14)) == 12
  assert set(s1.ops) == {op for r in (False, True) for e in range(14) for op in s1.ops_of(e, r)}
  # Discretization picks each edge's own operations: the second of every pair here.
  alpha = {"normal": np.tile([0.0, 1.0], (14, 1)), "reduce": np.tile([0.0, 1.0], (14, 1))}
  alpha["normal"][4, 1] += 1.0  # node 1 keeps edge 4 (from node 0) first, then edge 2
  g = s1.genotype(alpha)
  assert g.normal[:4] == (("dil_conv_3x3", 0), ("dil_conv_5x5", 1), ("dil_conv_3x3", 2),
                          ("dil_conv_5x5", 0))
  assert g.reduce[0] == ("avg_pool_3x3", 0)
  lists = spaces.alpha_to_lists(s1, alpha)
  assert lists["edge_ops"]["reduce"][0] == ["max_pool_3x3", "avg_pool_3x3"]


def test_rdarts_s4_has_noise_and_its_genotypes_load():
  s4 = spaces.get_space("rdarts_s4")
  assert s4.ops == ("noise", "sep_conv_3x3") and s4.has_noise
  g = s4.genotype({"normal": np.tile([1.0, 0.0], (14, 1)), "reduce": np.zeros((14, 2))})
  assert {op for op, _ in g.normal} == {"noise"}
  assert spaces.Genotype.from_dict(json.loads(g.to_json())) == g


def test_space_structure():
  darts, s1, s2 = (spaces.get_space(n) for n in ("darts", "s1", "s2"))
  assert darts.num_edges == 14 and darts.num_ops == 8 and "none" in darts.ops
  assert s1.num_edges == 8 and s1.num_ops == 7 and "none" not in s1.ops
  assert s2.ops == ("skip_connect", "sep_conv_3x3")
  # Fixed edges: node 0 takes both inputs, node i takes c_{k-2} and node i-1.
  assert s1.edges == ((0, 0), (1, 0), (0, 1), (2, 1), (0, 2), (3, 2), (0, 3), (4, 3))
  assert s2.alpha_shapes() == {"cells": (20, 8, 2)}
  assert darts.alpha_shapes() == {"normal": (14, 8), "reduce": (14, 8)}


def test_unknown_space_lists_known_ones():
  with pytest.raises(spaces.SpaceError, match="unknown search space 'nas101'.*darts, nb201, rdarts_s1, rdarts_s2, rdarts_s3, rdarts_s4, s1, s2"):
    spaces.get_space("nas101")


def test_alpha_init_is_small_normal():
  alpha = spaces.get_space("darts").init_alpha(jax.random.PRNGKey(0))
  values = np.concatenate([np.ravel(v) for v in alpha.values()])
  assert values.size == 2 * 14 * 8
  assert 0.7e-3 < values.std() < 1.3e-3 and abs(values.mean()) < 3e-4
  spaces.get_space("darts").check_alpha(alpha)
  with pytest.raises(spaces.SpaceError, match="must have shapes"):
    spaces.get_space("s1").check_alpha(alpha)


def _edge(space, src, node):
  return space.edges.index((src, node))


def test_darts_discretization_top2_ignores_none():
  space = spaces.get_space("darts")
  ops = {op: k for k, op in enumerate(space.ops)}
  a = np.zeros((14, 8), np.float32)
  # Ranking uses softmaxed weights, as DARTS does. Node 0 keeps both its edges, the
  # stronger first: the edge from state 0 is `none`-dominated, so its sep_conv_5x5
  # weight (~1e-3) ranks below state 1's max_pool (~0.28).
  a[_edge(space, 0, 0), ops["none"]] = 9.0
  a[_edge(space, 0, 0), ops["sep_conv_5x5"]] = 2.0
  a[_edge(space, 1, 0), ops["max_pool_3x3"]] = 1.0
  # Node 1: the edge from state 0 has the largest weight of all, on `none`; `none` is
  # ignored, so it loses to the edges from state 2 and state 1.
  a[_edge(space, 2, 1), ops["dil_conv_3x3"]] = 3.0
  a[_edge(space, 1, 1), ops["skip_connect"]] = 2.5
  a[_edge(space, 0, 1), ops["none"]] = 8.0
  a[_edge(space, 0, 1), ops["avg_pool_3x3"]] = 0.5
  # Node 2 and 3: states 3 and 4 clearly best.
  a[_edge(space, 3, 2), ops["sep_conv_3x3"]] = 4.0
  a[_edge(space, 0, 2), ops["dil_conv_5x5"]] = 3.5
  a[_edge(space, 4, 3), ops["skip_connect"]] = 5.0
  a[_edge(space, 2, 3), ops["max_pool_3x3"]] = 4.5
  g = space.genotype({"normal": a, "reduce": a})
  assert g.normal == (("max_pool_3x3", 1), ("sep_conv_5x5", 0),
                      ("dil_conv_3x3", 2), ("skip_connect", 1),
                      ("sep_conv_3x3", 3), ("dil_conv_5x5", 0),
                      ("skip_connect", 4), ("max_pool_3x3", 2))
  assert "none" not in {op for op, _ in g.normal}


def test_argmax_discretization_per_edge_and_per_cell():
  s1 = spaces.get_space("s1")
  a = np.zeros((8, 7), np.float32)
  best = [3, 0, 6, 2, 5, 1, 4, 3]
  for e, k in enumerate(best):
    a[e, k] = 1.0
  g = s1.genotype({"normal": a, "reduce": -a})
  assert [op for op, _ in g.normal] == [s1.ops[k] for k in best]
  assert [src for _, src in g.normal] == [src for src, _ in s1.edges]
  s2 = spaces.get_space("s2")
  cells = np.zeros((5, 8, 2), np.float32)
  cells[2, 3, 1] = 1.0
  g2 = s2.genotype({"cells": cells + np.array([0.1, 0.0])})  # default: skip wins
  assert len(g2.cells) == 5
  assert g2.cells[2][3] == ("sep_conv_3x3", 2)
  assert sum(op == "sep_conv_3x3" for gene in g2.cells for op, _ in gene) == 1


@pytest.mark.parametrize("genotype", [spaces.DARTS_V1, spaces.DARTS_V2,
                                      spaces.Genotype(cells=(spaces.DARTS_V2.normal,) * 3)])
def test_genotype_json_round_trip(tmp_path, genotype):
  path = str(tmp_path / "genotype.json")
  genotype.save(path)
  assert spaces.load_genotype(path) == genotype
  assert spaces.get_genotype(path) == genotype
  assert json.loads(open(path).read()) == genotype.to_dict()


def test_published_genotypes_by_name():
  assert spaces.get_genotype("DARTS_V2") is spaces.DARTS_V2
  assert spaces.DARTS_V2.normal[7] == ("dil_conv_3x3", 2)
  with pytest.raises(spaces.GenotypeError, match="neither a known genotype"):
    spaces.get_genotype("DARTS_V3")


def _gene(*changes):
  """A valid 8-pair gene (every node: skips from its two predecessors) with pairs replaced."""
  gene = [["skip_connect", src] for node in range(spaces.STEPS) for src in (node, node + 1)]
  for k, pair in changes:
    gene[k] = pair
  return gene


_GOOD = {"normal": _gene(), "reduce": _gene()}


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"normal": _gene()}), "needs 'normal' and 'reduce'"),
    (json.dumps({**_GOOD, "normal": _gene((1, ["conv_9x9", 1]))}), "unknown operation 'conv_9x9'"),
    (json.dumps({**_GOOD, "normal": _gene((2, ["skip_connect", 3]))}),
     "node 1 can take inputs 0..2, got 3"),
    (json.dumps({**_GOOD, "reduce": _gene()[:7]}), "a gene is a list of 8 \\[op, input\\] pairs; got 7"),
    (json.dumps({**_GOOD, "reduce": _gene() + _gene()[:2]}), "got 10 pairs"),  # extra nodes
    (json.dumps({**_GOOD, "normal": _gene((0, ["none", 0]))}), "unknown operation 'none'"),
    (json.dumps({**_GOOD, "normal": _gene((0, ["sep_conv_3x3", "0"]))}),
     "expected \\[op_name, input_index\\]"),
    (json.dumps({**_GOOD, "normal_concat": [2, 3, 4, 6]}), "distinct state indices in 0..5"),
    (json.dumps({**_GOOD, "reduce_concat": [2, 2]}), "distinct state indices"),
    ('{"cells": [], "normal_concat": [2]}', "non-empty list of genes"),
    (json.dumps({**_GOOD, "colour": 1}), "unknown field"),
])
def test_malformed_genotype_file_is_a_clear_error(tmp_path, content, message):
  path = tmp_path / "genotype.json"
  path.write_text(content)
  with pytest.raises(spaces.GenotypeError, match=message) as err:
    spaces.load_genotype(str(path))
  assert str(path) in str(err.value)


def test_missing_genotype_file_is_a_clear_error(tmp_path):
  with pytest.raises(spaces.GenotypeError, match="cannot read genotype file"):
    spaces.load_genotype(str(tmp_path / "nope.json"))


def test_alpha_to_lists_are_softmaxed_plain_lists():
  space = spaces.get_space("s1")
  alpha = space.init_alpha(jax.random.PRNGKey(1))
  out = spaces.alpha_to_lists(space, alpha)
  json.dumps(out)
  np.testing.assert_allclose(np.sum(out["normal"], axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(out["normal"], jax.nn.softmax(alpha["normal"], -1), rtol=1e-6)


def test_reduction_cells_at_thirds():
  assert spaces.reduction_cells(8) == (2, 5)
  assert spaces.reduction_cells(20) == (6, 13)
  assert spaces.reduction_cells(3) == (1, 2)


@pytest.mark.parametrize("name", sorted(spaces.SPACES))
def test_sampled_architectures_are_valid_in_every_space(name):
  space = spaces.get_space(name)
  rng = np.random.default_rng(0)
  kept = {op for op in space.ops if op != "none"}
  for _ in range(20):
    genotype = space.sample_genotype(rng, layers=5)
    spaces.Genotype.from_dict(genotype.to_dict())  # it survives its own JSON form
    if space.cell == "nb201":  # one op per edge, `none` included, sources in the fixed order
      assert [src for _, src in genotype.nb201] == [src for src, _ in space.edges]
      assert all(op in space.ops for op, _ in genotype.nb201)
      continue
    genes = genotype.cells if space.per_cell else (genotype.normal, genotype.reduce)
    assert len(genes) == (5 if space.per_cell else 2)
    for gene in genes:
      assert len(gene) == 2 * space.steps
      for node in range(space.steps):
        pairs = gene[2 * node:2 * node + 2]
        assert all(op in kept for op, _ in pairs)
        sources = [src for _, src in pairs]
        if space.discretize == "top2":  # two different earlier states
          assert len(set(sources)) == 2 and all(0 <= s < node + 2 for s in sources)
        else:  # the fixed edges, in order
          assert [(src, node) for src in sources] == [e for e in space.edges if e[1] == node]


def test_sampler_draws_every_architecture_equally_often():
  # A two-node darts-like cell with two kept operations: 1*4 * 3*4 = 48 cells.
  space = spaces.SearchSpace("small", ("none", "skip_connect", "sep_conv_3x3"),
                             tuple((s, n) for n in range(2) for s in range(n + 2)),
                             per_cell=False, discretize="top2", default_layers=2, steps=2)
  assert math.isqrt(space.num_architectures()) == 48
  rng = np.random.default_rng(0)
  counts = {}
  n = 2400
  for _ in range(n):
    gene = space.sample_genotype(rng).normal
    key = tuple(tuple(sorted(gene[2 * i:2 * i + 2])) for i in range(2))  # pair order is rank
    counts[key] = counts.get(key, 0) + 1
  assert len(counts) == 48
  expected = n / 48
  chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
  assert chi2 < 90  # 47 degrees of freedom: p < 1e-4 above 90
