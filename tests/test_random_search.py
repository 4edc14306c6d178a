"""Random search: uniform samples, ranked on held-out training images, the best retrained."""

import json
import os

import numpy as np
import pytest

from amended_darts_jax import random_search, spaces
from amended_darts_jax.configs import random_search as random_search_config
from amended_darts_jax.errors import ConfigError


def tiny_config(tmp_path, **overrides):
  cfg = random_search_config.get_config()
  cfg.update(samples=2, top=1, rank_epochs=1, epochs=1, layers=1, init_channels=2,
             batch_size=16, auxiliary=False, eval_every_epochs=0,
             compilation_cache_dir=str(tmp_path / "cache"))
  cfg.update(overrides)
  return cfg


def test_random_search_ranks_on_held_out_images_and_retrains_the_best(tmp_path):
  cfg = tiny_config(tmp_path)
  workdir = str(tmp_path / "run")
  results = random_search.run(cfg, workdir)
  # The candidates are the space's uniform samples from the config's seed.
  rng = np.random.default_rng(cfg.seed)
  expected = [spaces.get_space("s2").sample_genotype(rng, 1) for _ in range(2)]
  for i, genotype in enumerate(expected):
    assert spaces.load_genotype(os.path.join(workdir, "candidates", f"0{i}",
                                             "genotype.json")) == genotype
  # Ranked by held-out accuracy, read from each ranking run; 287 of the 1,437 training
  # digits held out, the rest trained on (71 steps of 16).
  ranking = results["ranking"]
  assert sorted(r["candidate"] for r in ranking) == [0, 1]
  assert ranking[0]["holdout_top1"] >= ranking[1]["holdout_top1"]
  for r in ranking:
    rank = json.load(open(os.path.join(workdir, "rank", f"0{r['candidate']}", "results.json")))
    assert rank["final_top1"] == r["holdout_top1"]
    assert rank["evaluated_on"] == "holdout (287 training images)" and rank["steps"] == 71
  best = ranking[0]["candidate"]
  assert spaces.load_genotype(os.path.join(workdir, "genotype.json")) == expected[best]
  assert [r["candidate"] for r in results["retrained"]] == [best]
  retrain = json.load(open(os.path.join(workdir, "retrain", f"0{best}", "results.json")))
  assert retrain["evaluated_on"] == "test" and retrain["steps"] == 1437 // 16
  assert results["retrained"][0]["final_top1"] == retrain["final_top1"]
  assert json.load(open(os.path.join(workdir, "results.json"))) == results
  assert os.path.getsize(os.path.join(workdir, "cells.png")) > 100
  # Started again, it reads every finished training back instead of repeating it.
  stamp = os.path.getmtime(os.path.join(workdir, "retrain", f"0{best}", "results.json"))
  assert random_search.run(cfg, workdir) == results
  assert os.path.getmtime(os.path.join(workdir, "retrain", f"0{best}", "results.json")) == stamp
  # Another seed samples other architectures, which the workdir refuses.
  with pytest.raises(ConfigError, match="holds another architecture"):
    random_search.run(tiny_config(tmp_path, seed=5), workdir)


@pytest.mark.parametrize("overrides, message", [
    (dict(top=3), r"config.top \(3\) must be at most config.samples \(2\)"),
    (dict(space="nas101"), "config.space='nas101' is not one of darts"),
    (dict(rank_holdout=1.0), r"config.rank_holdout must be in \(0, 1\)"),
    (dict(lr=-1.0), "config.lr must be positive"),
])
def test_bad_random_search_config_is_one_clear_error(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message):
    random_search.run(tiny_config(tmp_path, **overrides), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
