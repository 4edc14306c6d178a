"""What a run keeps in its work directory, shared by the search and the retraining.

The config of the run (a restarted run must match it, except in fields that do
not change the math), JSON files written atomically, the data position stored
in checkpoints, and JAX's persistent compilation cache.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from amended_darts_jax.errors import ConfigError


def check_resumable(workdir: str, cfg, resumable_fields: Sequence[str]) -> None:
  """Refuses to resume a workdir whose config.json differs in a field outside resumable_fields."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  current = json.loads(cfg.to_json())
  diffs = [k for k in sorted(set(saved) | set(current))
           if k not in resumable_fields and saved.get(k) != current.get(k)]
  if diffs:
    k = diffs[0]
    raise ConfigError(f"{workdir} holds a run with a different config ({k}: {saved.get(k)!r} "
                      f"there, {current.get(k)!r} now); resume it unchanged or use a new workdir")


def write_json(path: str, obj: Any) -> None:
  """Writes JSON to a temporary file and renames it: a reader never sees half a file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


def setup_compilation_cache(directory: str) -> None:
  if directory:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def data_position(step: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
  """Epoch and batch within it, stored beside the state (batches are a function of the step)."""
  epoch, within = divmod(step, steps_per_epoch)
  return {"epoch": np.asarray(epoch, np.int64), "batch_in_epoch": np.asarray(within, np.int64)}


def hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
