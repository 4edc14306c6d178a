"""Search spaces, alphas, genotypes and discretization (docs/math.md §12).

A cell has two inputs (states 0 and 1: c_{k-2}, c_{k-1}) and `steps` intermediate
nodes (states 2..steps+1); its output is the concatenation of the nodes. An edge
is `(source_state, node)`. A genotype lists, per node, two `(op, source_state)`
pairs, in DARTS' format, so the same discrete network serves every space.

    darts: all 14 edges, 8 ops with `none`, shared normal/reduce alphas, top-2 edges per node
    s1:    8 fixed edges, 7 ops, shared normal/reduce alphas, argmax per edge
    s2:    8 fixed edges, {skip_connect, sep_conv_3x3}, one alpha per cell (20 cells)
    s2_all: s2's layout with s1's seven ops (the search the paper could not fit in memory)
    rdarts_s2: darts' cell and discretization with {skip_connect, sep_conv_3x3} (RobustDARTS' S2)
    rdarts_s3: darts' cell and discretization with {none, skip_connect, sep_conv_3x3} (their S3)
    rdarts_s1: darts' cell with two preselected operations per edge and cell type (their S1)
    rdarts_s4: darts' cell with {noise, sep_conv_3x3} (their S4; `noise` outputs N(0, 1))
    nb201: NAS-Bench-201's cell (Dong & Yang, 2020): one input, 3 nodes, all 6 edges,
           5 ops with `none`, one alpha shared by every cell, argmax per edge over all ops

NAS-Bench-201's cell is of another kind (`SearchSpace.cell == "nb201"`): state 0
is the cell's input, node j (1..3) sums an operation of every earlier state, and
node 3 is the output. Its genotype (`Genotype.nb201`) lists the six `(op, source)`
pairs in the benchmark's order, which is that of its architecture string
`|op~0|+|op~0|op~1|+|op~0|op~1|op~2|` (`Genotype.arch_str`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from amended_darts_jax import rundir
from amended_darts_jax.errors import ConfigError, UserError

PRIMITIVES = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
              "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
# RobustDARTS' S4 adds `noise`: standard normal noise of the output's shape, whatever the input.
OPERATIONS = PRIMITIVES + ("noise",)
STEPS = 4
CONCAT = (2, 3, 4, 5)
# NAS-Bench-201's operations, in the benchmark's order, and its cell's edges as
# (source state, node), in the order of its architecture string.
NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
NB201_EDGES = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))


class SpaceError(ConfigError):
  """An unknown search space or an alpha that does not fit one."""


class GenotypeError(UserError, ValueError):
  """A genotype that is malformed or does not fit the network asked of it."""


def reduction_cells(layers: int) -> tuple[int, ...]:
  """Indices of the reduction cells: at 1/3 and 2/3 of the depth, as DARTS."""
  return tuple(sorted({layers // 3, 2 * layers // 3}))


def _all_edges(steps):
  return tuple((src, node) for node in range(steps) for src in range(node + 2))


def _chain_edges(steps):
  """Node 0 takes c_{k-2} and c_{k-1}; node i > 0 takes c_{k-2} and node i-1."""
  return tuple(e for node in range(steps) for e in ((0, node), (node + 1, node)))


Gene = tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class Genotype:
  """A discrete architecture.

  Shared spaces fill `normal` and `reduce` (each `2 * steps` pairs of
  `(op, source_state)`, node i using pairs 2i and 2i+1). Per-cell spaces (s2)
  fill `cells` instead, one gene per cell, and leave `normal`/`reduce` empty.
  NAS-Bench-201 genotypes fill only `nb201`: one `(op, source_state)` pair per
  edge of NB201_EDGES, `none` included (an edge the benchmark's cell leaves out).
  """
  normal: Gene = ()
  normal_concat: tuple[int, ...] = CONCAT
  reduce: Gene = ()
  reduce_concat: tuple[int, ...] = CONCAT
  cells: tuple[Gene, ...] = ()
  nb201: Gene = ()

  @property
  def per_cell(self) -> bool:
    return bool(self.cells)

  @property
  def is_nb201(self) -> bool:
    return bool(self.nb201)

  @property
  def arch_str(self) -> str:
    """NAS-Bench-201's architecture string, `|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`."""
    if not self.is_nb201:
      raise GenotypeError("only NAS-Bench-201 genotypes have a benchmark architecture string")
    nodes, k = [], 0
    for node in range(1, 4):
      nodes.append("|" + "|".join(f"{op}~{src}" for op, src in self.nb201[k:k + node]) + "|")
      k += node
    return "+".join(nodes)

  @classmethod
  def from_arch_str(cls, text: str) -> "Genotype":
    """Parses NAS-Bench-201's architecture string; a malformed one is a GenotypeError."""
    nodes = text.strip().split("+")
    pairs = []
    for node, part in enumerate(nodes, start=1):
      if not (part.startswith("|") and part.endswith("|")):
        break
      for item in part[1:-1].split("|"):
        op, _, src = item.partition("~")
        pairs.append([op, int(src) if src.isdigit() else src])
    if len(nodes) != 3 or len(pairs) != len(NB201_EDGES):
      raise GenotypeError(f"{text!r} is not a NAS-Bench-201 architecture string: expected "
                          "three '+'-separated nodes of 1, 2 and 3 '|op~source|' edges")
    return cls(nb201=_parse_nb201(pairs, "architecture string"))

  def gene(self, cell: int, reduction: bool) -> tuple[Gene, tuple[int, ...]]:
    """The gene and concat list of cell `cell`."""
    if self.per_cell:
      return self.cells[cell], (self.reduce_concat if reduction else self.normal_concat)
    return (self.reduce, self.reduce_concat) if reduction else (self.normal, self.normal_concat)

  def to_dict(self) -> dict[str, Any]:
    if self.is_nb201:
      return {"nb201": [list(p) for p in self.nb201]}
    d = {"normal_concat": list(self.normal_concat), "reduce_concat": list(self.reduce_concat)}
    if self.per_cell:
      d["cells"] = [[list(p) for p in g] for g in self.cells]
    else:
      d["normal"] = [list(p) for p in self.normal]
      d["reduce"] = [list(p) for p in self.reduce]
    return d

  @classmethod
  def from_dict(cls, d: Any, where: str = "genotype") -> "Genotype":
    """Validates and builds a genotype; raises GenotypeError naming what is wrong."""
    if not isinstance(d, Mapping):
      raise GenotypeError(f"{where}: expected a JSON object, got {type(d).__name__}")
    unknown = set(d) - {"normal", "normal_concat", "reduce", "reduce_concat", "cells", "nb201"}
    if unknown:
      raise GenotypeError(f"{where}: unknown field(s) {sorted(unknown)}")
    if "nb201" in d:
      if set(d) != {"nb201"}:
        raise GenotypeError(f"{where}: a NAS-Bench-201 genotype has only the field 'nb201'")
      return cls(nb201=_parse_nb201(d["nb201"], f"{where}.nb201"))
    per_cell = "cells" in d
    if per_cell and ("normal" in d or "reduce" in d):
      raise GenotypeError(f"{where}: give either 'cells' or 'normal'/'reduce', not both")
    if not per_cell and not ("normal" in d and "reduce" in d):
      raise GenotypeError(f"{where}: needs 'normal' and 'reduce' (or 'cells' for s2)")
    concat = {}
    for key in ("normal_concat", "reduce_concat"):
      concat[key] = _parse_concat(d.get(key, list(CONCAT)), f"{where}.{key}")
    if per_cell:
      if not isinstance(d["cells"], list) or not d["cells"]:
        raise GenotypeError(f"{where}.cells: expected a non-empty list of genes")
      cells = tuple(_parse_gene(g, f"{where}.cells[{i}]") for i, g in enumerate(d["cells"]))
      return cls(cells=cells, **concat)
    return cls(normal=_parse_gene(d["normal"], f"{where}.normal"),
               reduce=_parse_gene(d["reduce"], f"{where}.reduce"), **concat)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  def save(self, path: str) -> None:
    """Writes the genotype as JSON, atomically (a partial file never replaces a good one)."""
    rundir.write_text(path, self.to_json() + "\n")


def _parse_gene(gene: Any, where: str) -> Gene:
  if not isinstance(gene, list) or len(gene) != 2 * STEPS:
    got = f"{len(gene)} pairs" if isinstance(gene, list) else type(gene).__name__
    raise GenotypeError(f"{where}: a cell has {STEPS} nodes of 2 inputs each, so a gene is a "
                        f"list of {2 * STEPS} [op, input] pairs; got {got}")
  pairs = []
  for k, pair in enumerate(gene):
    node = k // 2
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str)
        or isinstance(pair[1], bool) or not isinstance(pair[1], int)):
      raise GenotypeError(f"{where}[{k}]: expected [op_name, input_index], got {pair!r}")
    op, src = pair
    if op not in OPERATIONS or op == "none":
      raise GenotypeError(f"{where}[{k}]: unknown operation {op!r}; known: "
                          f"{', '.join(OPERATIONS[1:])}")
    if not 0 <= src < node + 2:
      raise GenotypeError(f"{where}[{k}]: node {node} can take inputs 0..{node + 1}, got {src}")
    pairs.append((op, src))
  return tuple(pairs)


def _parse_nb201(gene: Any, where: str) -> Gene:
  expected = "[" + ", ".join(f"[op, {src}]" for src, _ in NB201_EDGES) + "]"
  if not isinstance(gene, list) or len(gene) != len(NB201_EDGES):
    raise GenotypeError(f"{where}: a NAS-Bench-201 cell has {len(NB201_EDGES)} edges, so its "
                        f"gene is {expected}")
  pairs = []
  for k, (pair, (src, node)) in enumerate(zip(gene, NB201_EDGES)):
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str)
        or pair[1] != src or isinstance(pair[1], bool)):
      raise GenotypeError(f"{where}[{k}]: edge {k} runs from state {src} to node {node}, so "
                          f"it is [op, {src}]; got {pair!r}")
    if pair[0] not in NB201_OPS:
      raise GenotypeError(f"{where}[{k}]: unknown operation {pair[0]!r}; NAS-Bench-201's are "
                          f"{', '.join(NB201_OPS)}")
    pairs.append((pair[0], src))
  return tuple(pairs)


def _parse_concat(concat: Any, where: str) -> tuple[int, ...]:
  if (not isinstance(concat, list) or not concat
      or not all(isinstance(c, int) and not isinstance(c, bool) for c in concat)):
    raise GenotypeError(f"{where}: expected a non-empty list of state indices")
  wrong = [c for c in concat if not 0 <= c < STEPS + 2]
  if wrong or len(set(concat)) != len(concat):
    raise GenotypeError(f"{where}: expected distinct state indices in 0..{STEPS + 1} (the "
                        f"cell's two inputs and {STEPS} nodes), got {concat}")
  return tuple(concat)


def load_genotype(path: str) -> Genotype:
  """Reads a genotype.json, with one clear error for a missing or malformed file."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError as e:
    raise GenotypeError(f"cannot read genotype file {path}: {e.strerror}") from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise GenotypeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
  return Genotype.from_dict(data, where=path)


DARTS_V1 = Genotype(
    normal=(("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)))
DARTS_V2 = Genotype(
    normal=(("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)))
GENOTYPES = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2}


def get_genotype(name_or_path: str) -> Genotype:
  """A published genotype by name (DARTS_V1, DARTS_V2), a NAS-Bench-201 architecture
  string (`|nor_conv_3x3~0|+|...|`), else a genotype.json path.

  A value that looks like a path (a directory separator, or a `.json` ending) is
  read as one, so a missing file is reported as such; errors are one sentence.
  """
  if not name_or_path:
    raise GenotypeError("the genotype is empty; give DARTS_V1, DARTS_V2, a NAS-Bench-201 "
                        "architecture string or a genotype.json path")
  if name_or_path in GENOTYPES:
    return GENOTYPES[name_or_path]
  if name_or_path.startswith("|"):
    return Genotype.from_arch_str(name_or_path)
  if os.path.sep in name_or_path or name_or_path.endswith(".json") or os.path.exists(name_or_path):
    return load_genotype(name_or_path)
  raise GenotypeError(f"{name_or_path!r} is neither a known genotype "
                      f"({', '.join(GENOTYPES)}) nor an existing genotype.json file")


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """A declarative search space: edges, operations, alpha sharing and discretization."""
  name: str
  ops: tuple[str, ...]
  edges: tuple[tuple[int, int], ...]
  per_cell: bool  # one alpha per cell (s2) instead of one per cell type
  discretize: str  # "top2": best two incoming edges per node; "argmax": per edge
  default_layers: int
  steps: int = STEPS
  # Per-edge operations (RobustDARTS' S1): (normal, reduce), each one tuple of op names
  # per edge, all of one length. Empty: every edge has `ops`, which then lists the
  # operations; with edge_ops, `ops` is only the set they draw from.
  edge_ops: tuple[tuple[tuple[str, ...], ...], ...] = ()
  # "darts": DARTS' two-input cell, normal and reduction cells; "nb201": NAS-Bench-201's
  # one-input cell between residual reduction blocks, one alpha ("cell") for all cells.
  cell: str = "darts"

  @property
  def num_edges(self) -> int:
    return len(self.edges)

  @property
  def num_ops(self) -> int:
    """Operations per edge: the last axis of every alpha."""
    return len(self.edge_ops[0][0]) if self.edge_ops else len(self.ops)

  def ops_of(self, edge: int, reduction: bool) -> tuple[str, ...]:
    """The operations that edge `edge` of a normal or a reduction cell mixes."""
    return self.edge_ops[int(reduction)][edge] if self.edge_ops else self.ops

  @property
  def has_noise(self) -> bool:
    return "noise" in self.ops

  def alpha_shapes(self, layers: int | None = None) -> dict[str, tuple[int, ...]]:
    layers = layers or self.default_layers
    if self.cell == "nb201":
      return {"cell": (self.num_edges, self.num_ops)}
    if self.per_cell:
      return {"cells": (layers, self.num_edges, self.num_ops)}
    return {"normal": (self.num_edges, self.num_ops), "reduce": (self.num_edges, self.num_ops)}

  def init_alpha(self, key: jax.Array, layers: int | None = None,
                 dtype=jnp.float32) -> dict[str, jax.Array]:
    """DARTS' initialisation: 1e-3 times a standard normal, as a dict of arrays."""
    shapes = self.alpha_shapes(layers)
    keys = jax.random.split(key, len(shapes))
    return {name: 1e-3 * jax.random.normal(k, shape, dtype)
            for k, (name, shape) in zip(keys, sorted(shapes.items()))}

  def cell_alpha(self, alpha: Mapping[str, jax.Array], cell: int, reduction: bool) -> jax.Array:
    """The (edges, ops) alpha that cell `cell` uses."""
    if self.cell == "nb201":
      return alpha["cell"]
    if self.per_cell:
      return alpha["cells"][cell]
    return alpha["reduce"] if reduction else alpha["normal"]

  def check_alpha(self, alpha: Mapping[str, Any], layers: int | None = None) -> None:
    expected = self.alpha_shapes(layers)
    got = {k: tuple(np.shape(v)) for k, v in alpha.items()}
    if got != expected:
      raise SpaceError(f"alpha for space {self.name!r} must have shapes {expected}, got {got}")

  def num_architectures(self, layers: int | None = None) -> int:
    """The exact number of discrete architectures (docs/math.md §12)."""
    cells = (layers or self.default_layers) if self.per_cell else len(self.alpha_shapes())
    if self.discretize == "argmax_all":  # every op, `none` too, on every edge
      return (self.num_ops ** self.num_edges) ** cells
    if self.discretize != "top2":
      return (self.num_ops ** self.num_edges) ** cells
    total = 1
    for reduction in ((False,) if self.per_cell else (False, True)):
      choices = [len([o for o in self.ops_of(e, reduction) if o != "none"])
                 for e in range(self.num_edges)]
      per_cell = 1
      for node in range(self.steps):  # each pair of incoming edges, times their choices
        incoming = [choices[e] for e, (_, dst) in enumerate(self.edges) if dst == node]
        per_cell *= sum(a * b for i, a in enumerate(incoming) for b in incoming[i + 1:])
      total *= per_cell ** (cells if self.per_cell else 1)
    return total

  def genotype(self, alpha: Mapping[str, Any]) -> Genotype:
    """Discretizes alphas (logits) into a genotype, on softmaxed weights as DARTS does."""
    weights = {k: np.asarray(jax.nn.softmax(jnp.asarray(v, jnp.float32), axis=-1))
               for k, v in alpha.items()}
    if self.cell == "nb201":
      # NAS-Bench-201's DARTS: the strongest operation of each edge, `none` included.
      return Genotype(nb201=tuple((self.ops[int(np.argmax(w_O))], src) for w_O, (src, _)
                                  in zip(weights["cell"], self.edges)))
    if self.per_cell:
      return Genotype(cells=tuple(self._gene(w, False) for w in weights["cells"]))
    return Genotype(normal=self._gene(weights["normal"], False),
                    reduce=self._gene(weights["reduce"], True))

  def sample_genotype(self, rng: np.random.Generator, layers: int | None = None) -> Genotype:
    """A uniformly random architecture of the space (random search's sampler).

    It discretizes independent standard-normal logits: every edge and every
    operation enter the discretization symmetrically, so each of the
    `num_architectures` architectures is equally likely.
    """
    return self.genotype({name: rng.standard_normal(shape)
                          for name, shape in sorted(self.alpha_shapes(layers).items())})

  def _gene(self, w_ExO: np.ndarray, reduction: bool) -> Gene:
    usable = [[k for k, op in enumerate(self.ops_of(e, reduction)) if op != "none"]
              for e in range(self.num_edges)]
    gene = []
    for node in range(self.steps):
      incoming = [e for e, (_, dst) in enumerate(self.edges) if dst == node]
      if self.discretize == "top2":
        # DARTS: rank incoming edges by their strongest non-`none` op; keep two.
        incoming = sorted(incoming, key=lambda e: -w_ExO[e, usable[e]].max())[:2]
      for e in incoming:
        best = usable[e][int(np.argmax(w_ExO[e, usable[e]]))]
        gene.append((self.ops_of(e, reduction)[best], self.edges[e][0]))
    return tuple(gene)


def _pairs(*names: str) -> tuple[tuple[str, str], ...]:
  """'a/b' strings to per-edge operation pairs."""
  return tuple(tuple(n.split("/")) for n in names)


# RobustDARTS' S1 (Zela et al., 2020): the two operations per edge that their
# DARTS runs ranked highest, in DARTS' edge order (node 0: c_{k-2}, c_{k-1}; node 1:
# those and node 0; ...), published in the repository as `primitives_1`.
_RDARTS_S1 = (
    _pairs("skip_connect/dil_conv_3x3", "skip_connect/dil_conv_5x5",
           "skip_connect/dil_conv_5x5", "skip_connect/sep_conv_3x3", "skip_connect/dil_conv_3x3",
           "max_pool_3x3/skip_connect", "skip_connect/sep_conv_3x3", "skip_connect/sep_conv_3x3",
           "skip_connect/dil_conv_3x3", "skip_connect/sep_conv_3x3", "max_pool_3x3/skip_connect",
           "skip_connect/dil_conv_3x3", "dil_conv_3x3/dil_conv_5x5", "dil_conv_3x3/dil_conv_5x5"),
    _pairs("max_pool_3x3/avg_pool_3x3", "max_pool_3x3/dil_conv_3x3",
           "max_pool_3x3/avg_pool_3x3", "max_pool_3x3/avg_pool_3x3", "skip_connect/dil_conv_5x5",
           "max_pool_3x3/avg_pool_3x3", "max_pool_3x3/sep_conv_3x3", "skip_connect/dil_conv_3x3",
           "skip_connect/dil_conv_5x5", "max_pool_3x3/avg_pool_3x3", "max_pool_3x3/avg_pool_3x3",
           "skip_connect/dil_conv_5x5", "skip_connect/dil_conv_5x5", "skip_connect/dil_conv_5x5"))

SPACES = {
    "darts": SearchSpace("darts", PRIMITIVES, _all_edges(STEPS), per_cell=False,
                         discretize="top2", default_layers=8),
    "s1": SearchSpace("s1", PRIMITIVES[1:], _chain_edges(STEPS), per_cell=False,
                      discretize="argmax", default_layers=8),
    "s2": SearchSpace("s2", ("skip_connect", "sep_conv_3x3"), _chain_edges(STEPS), per_cell=True,
                      discretize="argmax", default_layers=20),
    "s2_all": SearchSpace("s2_all", PRIMITIVES[1:], _chain_edges(STEPS), per_cell=True,
                          discretize="argmax", default_layers=20),
    # The two-operation spaces in which Zela et al. (2020) show DARTS collapsing.
    "rdarts_s2": SearchSpace("rdarts_s2", ("skip_connect", "sep_conv_3x3"), _all_edges(STEPS),
                             per_cell=False, discretize="top2", default_layers=8),
    "rdarts_s3": SearchSpace("rdarts_s3", ("none", "skip_connect", "sep_conv_3x3"),
                             _all_edges(STEPS), per_cell=False, discretize="top2",
                             default_layers=8),
    "rdarts_s1": SearchSpace("rdarts_s1",
                             tuple(op for op in PRIMITIVES
                                   if any(op in pair for cell in _RDARTS_S1 for pair in cell)),
                             _all_edges(STEPS), per_cell=False, discretize="top2",
                             default_layers=8, edge_ops=_RDARTS_S1),
    "rdarts_s4": SearchSpace("rdarts_s4", ("noise", "sep_conv_3x3"), _all_edges(STEPS),
                             per_cell=False, discretize="top2", default_layers=8),
    # `layers` counts all cells: three stages of layers / 3 (NAS-Bench-201: 3 x 5).
    "nb201": SearchSpace("nb201", NB201_OPS, NB201_EDGES, per_cell=False,
                         discretize="argmax_all", default_layers=15, steps=3, cell="nb201"),
}


def get_space(name: str) -> SearchSpace:
  """The search space called `name`; an unknown name is a SpaceError listing the known ones."""
  try:
    return SPACES[name]
  except KeyError:
    raise SpaceError(f"unknown search space {name!r}; known spaces: "
                     f"{', '.join(sorted(SPACES))}") from None


def alpha_to_lists(space: SearchSpace, alpha: Mapping[str, Any]) -> dict[str, Any]:
  """Softmaxed alphas as plain nested lists, for alphas.json."""
  per_edge = {"edge_ops": {"normal": [list(o) for o in space.edge_ops[0]],
                           "reduce": [list(o) for o in space.edge_ops[1]]}} if space.edge_ops else {}
  return {"space": space.name, "ops": list(space.ops), **per_edge,
          "edges": [list(e) for e in space.edges],
          **{k: np.asarray(jax.nn.softmax(jnp.asarray(v, jnp.float32), -1)).tolist()
             for k, v in alpha.items()}}
