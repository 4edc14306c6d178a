r"""Random search, the paper's baseline: sample architectures, rank them, retrain the best.

  python -m amended_darts_jax.random_search --workdir=DIR [--config=FILE] [--config.FIELD=VALUE ...]

Draws `samples` architectures of `space` uniformly at random
(`spaces.SearchSpace.sample_genotype`, seeded by `seed`), trains each with the
retraining recipe for `rank_epochs` epochs on the training split less a
held-out share `rank_holdout`, ranks them by their accuracy on that held-out
part, and retrains the best `top` with the full recipe (`epochs`, evaluated on
the test split) exactly as a searched genotype is retrained. The test split
plays no part in the choice.

Under DIR: `candidates/NN/genotype.json`; `rank/NN` and `retrain/NN`, each a
retraining workdir (amended_darts_jax.train) with its `results.json`;
`ranking.json`; and, as a search leaves them, `genotype.json` (the best-ranked
candidate) with its picture `cells.*`, and `results.json` with every figure.
Started again with the same DIR it resumes: a finished training is read back,
an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax loads: rerun once with huge pages (cpu/hostmem.py)
  from amended_darts_jax.cpu import hostmem
  hostmem.reexec()

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from amended_darts_jax import parallel, rundir, spaces, train, validation
from amended_darts_jax.configs import train_default
from amended_darts_jax.errors import ConfigError


def validate_config(cfg) -> None:
  validation.check(cfg, {
      "space": validation.one_of(tuple(sorted(spaces.SPACES))),
      "samples": validation.POSITIVE, "top": validation.POSITIVE,
      "rank_epochs": validation.POSITIVE, "rank_holdout": validation.OPEN_UNIT})
  if cfg.top > cfg.samples:
    raise ConfigError(f"config.top ({cfg.top}) must be at most config.samples ({cfg.samples})")
  for stage in ("rank", "retrain"):
    train.validate_config(_train_config(cfg, stage, "DARTS_V2"))


def _train_config(cfg, stage: str, genotype: str) -> ml_collections.ConfigDict:
  """The retraining config of one stage: the recipe's fields of cfg, the stage's epochs
  and evaluation split, one process already started (so no second cluster start)."""
  out = train_default.get_config()
  for key in out:
    out[key] = cfg[key]
  out.genotype = genotype
  out.distributed = False  # initialized once for every stage, in run()
  if stage == "rank":
    out.epochs, out.holdout = cfg.rank_epochs, cfg.rank_holdout
  return out


def _stage(cfg, stage: str, index: int, genotype_path: str, workdir: str) -> dict[str, Any]:
  """One training of the candidate `index`: its results.json, trained now if not yet."""
  path = os.path.join(workdir, stage, f"{index:02d}")
  done = os.path.join(path, "results.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  logging.info("random search: %s candidate %d (%s)", "ranking" if stage == "rank" else
               "retraining", index, genotype_path)
  return train.run(_train_config(cfg, stage, genotype_path), path)


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) a random search in workdir; returns what results.json holds."""
  validate_config(cfg)
  if cfg.distributed:  # once, before anything touches a backend
    parallel.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  is_main = jax.process_index() == 0
  space = spaces.get_space(cfg.space)
  rng = np.random.default_rng(cfg.seed)
  genotypes = [space.sample_genotype(rng, cfg.layers) for _ in range(cfg.samples)]
  rundir.prepare_workdir(workdir)
  paths = []
  for i, genotype in enumerate(genotypes):
    path = os.path.join(workdir, "candidates", f"{i:02d}", "genotype.json")
    if is_main:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      if os.path.exists(path) and spaces.load_genotype(path) != genotype:
        raise ConfigError(f"{path} holds another architecture than this config samples; "
                          "resume with the same config or use a new workdir")
      genotype.save(path)
    paths.append(path)
  parallel.synchronize("random search candidates written")  # the others read them next

  ranked = []
  for i, path in enumerate(paths):
    r = _stage(cfg, "rank", i, path, workdir)
    ranked.append({"candidate": i, "holdout_top1": r["final_top1"], "params": r["params"]})
  # Best held-out accuracy first; the earlier sample wins a tie.
  ranked.sort(key=lambda r: (-r["holdout_top1"], r["candidate"]))
  retrained = []
  for r in ranked[:cfg.top]:
    res = _stage(cfg, "retrain", r["candidate"], paths[r["candidate"]], workdir)
    retrained.append({"candidate": r["candidate"], "holdout_top1": r["holdout_top1"],
                      "final_top1": res["final_top1"], "best_top1": res["best_top1"],
                      "params": res["params"]})
  best = genotypes[ranked[0]["candidate"]]
  results = {"space": cfg.space, "samples": cfg.samples, "seed": cfg.seed,
             "ranked_by": f"top-1 on a {cfg.rank_holdout:g} share of the training split held "
                          f"out, after {cfg.rank_epochs} epochs",
             "ranking": ranked, "retrained": retrained, "genotype": best.to_dict()}
  if is_main:
    rundir.write_json(os.path.join(workdir, "ranking.json"), ranked)
    best.save(os.path.join(workdir, "genotype.json"))
    from amended_darts_jax import visualize
    visualize.render(best, os.path.join(workdir, "cells"))
    rundir.write_json(os.path.join(workdir, "results.json"), results)
  for r in retrained:
    logging.info("random search: candidate %d, held-out top-1 %.4f, test top-1 %.4f",
                 r["candidate"], r["holdout_top1"], r["final_top1"])
  return results


def main(argv, config_flag) -> None:
  from amended_darts_jax import cli
  del argv
  cli.run_or_exit(lambda: run(config_flag.value, cli.workdir()))


if __name__ == "__main__":
  from amended_darts_jax import cli
  cli.launch(main, default_config="random_search.py")
