"""Config checks shared by the search and the retraining: one rule per field, one clear error.

Nothing here touches a JAX backend, so a config is checked before
`jax.distributed.initialize` (which must come before any backend use).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from amended_darts_jax.errors import ConfigError

Rule = tuple[Callable[[Any], bool], str]

POSITIVE: Rule = (lambda v: v > 0, "positive")
NON_NEGATIVE: Rule = (lambda v: v >= 0, ">= 0")
FRACTION: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
OPEN_UNIT: Rule = (lambda v: 0 < v < 1, "in (0, 1)")


def one_of(choices: Sequence[str]) -> Rule:
  return (lambda v: v in choices, f"one of {', '.join(choices)}")


def check(cfg, rules: Mapping[str, Rule]) -> None:
  """Every float field finite, then each field with a rule obeys it; else ConfigError naming it."""
  for field, value in cfg.items():
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"config.{field} must be a finite number, got {value}")
  for field, (ok, what) in rules.items():
    value = cfg[field]
    if ok(value):
      continue
    if isinstance(value, str):
      raise ConfigError(f"config.{field}={value!r} is not {what}")
    raise ConfigError(f"config.{field} must be {what}, got {value!r}")


def check_cluster(cfg) -> None:
  """The multi-process fields: all three given together, or none (JAX detects the cluster)."""
  if not cfg.distributed or not cfg.coordinator_address:
    return
  if cfg.num_processes < 1 or not 0 <= cfg.process_id < cfg.num_processes:
    raise ConfigError(f"with config.coordinator_address, config.num_processes must be positive "
                      f"and config.process_id in 0..num_processes-1; got {cfg.num_processes} and "
                      f"{cfg.process_id}")
