"""What a run keeps in its work directory, shared by the search and the retraining.

The config of the run (a restarted run must match it, except in fields that do
not change the math), JSON files written atomically and durably, the JSON-lines
logs cut back to the step a resumed run restarts from, and JAX's persistent
compilation cache.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
from absl import logging

from amended_darts_jax.errors import ConfigError, UserError


# Config fields by their earlier names: a workdir written under those still resumes.
RENAMED_FIELDS = {"depthwise_impl": "conv_pool_impl", "batch_edges": "edge_groups",
                  "monitor_cg_iters": "monitor_solve_iters"}
# Fields added later, with the value that does what a workdir written without them did.
ADDED_FIELDS = {"holdout": 0.0, "drop_path_prob": 0.0, "dropout": 0.0, "auxiliary": False,
                "auxiliary_weight": 0.4, "nesterov": False, "nb201_benchmark": "",
                "scan_cells": "off"}


def prepare_workdir(workdir: str) -> None:
  """Creates workdir if need be and checks that files can be written in it (one clear error)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"the workdir {workdir} exists and is not a directory")
  probe = os.path.join(workdir, f".write_test.{os.getpid()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.unlink(probe)
  except OSError as e:
    raise UserError(f"cannot write in the workdir {workdir}: {e.strerror}") from None


def check_resumable(workdir: str, cfg, resumable_fields: Sequence[str]) -> None:
  """Refuses to resume a workdir whose config.json differs in a field outside resumable_fields."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} cannot be read ({getattr(e, 'msg', None) or e}), so the run in "
                      f"{workdir} cannot be checked for resuming; restore or remove that file, or "
                      "use a new workdir") from None
  # A run saved under a field's earlier name compares under its present one.
  saved = {RENAMED_FIELDS.get(k, k): v for k, v in saved.items()}
  saved = {**{k: v for k, v in ADDED_FIELDS.items() if k in cfg}, **saved}
  current = json.loads(cfg.to_json())
  # Compared as JSON text, so that a value equals itself even where it is NaN.
  same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
  diffs = [k for k in sorted(set(saved) | set(current))
           if k not in resumable_fields and not same(saved.get(k), current.get(k))]
  if diffs:
    k = diffs[0]
    raise ConfigError(f"{workdir} holds a run with a different config ({k}: {saved.get(k)!r} "
                      f"there, {current.get(k)!r} now); resume it unchanged or use a new workdir")


def _replace_durably(tmp: str, path: str) -> None:
  """Renames tmp (flushed and closed) over path after syncing it, then syncs the directory."""
  os.replace(tmp, path)
  try:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:  # some file systems cannot sync a directory
    pass
  finally:
    os.close(fd)


def write_text(path: str, text: str) -> None:
  """Writes text to a temporary file, syncs it and renames it: a reader never sees half a file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  _replace_durably(tmp, path)


def write_json(path: str, obj: Any) -> None:
  """`write_text` of obj as indented JSON."""
  write_text(path, json.dumps(obj, indent=1) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a JSON-lines file; a torn line (a write cut short) is skipped."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      try:
        record = json.loads(line)
      except ValueError:
        logging.warning("%s: line %d is not complete JSON; skipped", path, number)
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def cut_jsonl(path: str, keep: Callable[[dict[str, Any]], bool]) -> None:
  """Rewrites a JSON-lines file (atomically) with only the records `keep` accepts."""
  if not os.path.exists(path):
    return
  write_text(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if keep(r)))


def cut_logs_to(workdir: str, step: int) -> None:
  """Makes metrics.jsonl and alpha_history.jsonl hold what a run that reached `step` wrote.

  A run killed after its checkpoint of `step` logged more steps; resumed from
  that checkpoint it logs them again, so each file keeps the records up to the
  step and each step appears once. Monitor records (written before their step)
  and the record of a start at `step` are written again, so only those before
  it stay; at step 0 nothing stays. Process 0 only.
  """
  if jax.process_index() != 0:
    return
  before_or_after_step = lambda r: r.get("step", 0) < step or (
      r.get("step") == step and r.get("kind") in ("step", "epoch"))
  cut_jsonl(os.path.join(workdir, "metrics.jsonl"), before_or_after_step)
  cut_jsonl(os.path.join(workdir, "alpha_history.jsonl"), lambda r: r.get("step", 0) <= step)


def begin(workdir: str, cfg, start_step: int) -> None:
  """Marks the run as started at `start_step` (its step compiled): process 0 writes
  config.json, which from now on is the workdir's, and cuts the logs back to the step."""
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, "config.json"), json.loads(cfg.to_json()))
  cut_logs_to(workdir, start_step)


def setup_compilation_cache(directory: str) -> None:
  if directory:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))


def hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
