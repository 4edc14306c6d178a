"""Looking a NAS-Bench-201 cell up in the benchmark's own file, through its own API.

The benchmark (Dong & Yang, 2020) trained every one of the 15625 cells of the
`nb201` space; where a user has its file, the searched cell's recorded
accuracies come from there instead of a retraining. Two files and APIs exist,
both optional dependencies that nothing else needs:

    NATS-tss-v1_0-3ffb9-simple (a directory or .pickle.pbz2)  pip install nats_bench
    NAS-Bench-201-v1_*.pth                                      pip install nas-bench-201 (and torch)

`open_benchmark` picks the API by the file's name; `lookup` returns, for each of
the benchmark's datasets, the validation and test accuracy of 200-epoch training
averaged over its seeds (`hp="200"`, `is_random=False`), and the parameter count.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from amended_darts_jax.errors import ConfigError, UserError

DATASETS = ("cifar10-valid", "cifar10", "cifar100", "ImageNet16-120")


def _api_module(path: str) -> tuple[str, str]:
  """The API module for the file at `path` and the package that provides it."""
  if path.endswith(".pth"):
    return "nas_201_api", "nas-bench-201"
  return "nats_bench", "nats_bench"


def check(path: str) -> None:
  """One ConfigError if the file is missing or its API is not installed (before a search)."""
  if not os.path.exists(os.path.expanduser(path)):
    raise ConfigError(f"the NAS-Bench-201 file {path} does not exist (config.nb201_benchmark)")
  module, package = _api_module(path)
  try:
    importlib.import_module(module)
  except ImportError:
    raise ConfigError(f"looking a cell up in {os.path.basename(path)} needs the benchmark's "
                      f"API: pip install {package}") from None


def open_benchmark(path: str):
  check(path)
  path = os.path.expanduser(path)
  module, _ = _api_module(path)
  try:
    if module == "nas_201_api":
      return importlib.import_module(module).NASBench201API(path, verbose=False)
    return importlib.import_module(module).create(path, "tss", fast_mode=True, verbose=False)
  except Exception as e:  # the API's own errors, whatever they are, in one sentence
    raise UserError(f"the benchmark's API cannot read {path}: {e}") from None


def lookup(api: Any, arch_str: str) -> dict[str, Any]:
  """The benchmark's record of the cell `arch_str`: accuracies (percent) per dataset."""
  try:
    index = api.query_index_by_arch(arch_str)
  except Exception as e:
    raise UserError(f"the benchmark cannot look up {arch_str}: {e}") from None
  if index is None or index < 0:
    raise UserError(f"{arch_str} is not in the benchmark's file")
  record: dict[str, Any] = {"arch": arch_str, "index": int(index), "hp": "200"}
  for dataset in DATASETS:
    try:
      info = api.get_more_info(index, dataset, hp="200", is_random=False)
      cost = api.get_cost_info(index, dataset, hp="200")
    except Exception as e:
      raise UserError(f"the benchmark has no 200-epoch record of {arch_str} on {dataset}: "
                      f"{e}") from None
    record[dataset] = {key.replace("-", "_"): info[key] for key in
                       ("train-accuracy", "valid-accuracy", "test-accuracy") if key in info}
    record[dataset]["params_mb"] = cost.get("params")
  return record
