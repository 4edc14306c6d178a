"""One writer for metrics: JSON lines (metrics.jsonl) and TensorBoard events, on process 0.

Each JSON line is flushed as it is written; TensorBoard's events are flushed at
every checkpoint (`flush`). A writer opened for a run resumed at step k tells
TensorBoard to drop the events a killed run had logged after k (`purge_step`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from amended_darts_jax import rundir


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool = True, resumed_step: int = 0):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if not enabled:
      return
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=resumed_step + 1 if resumed_step else None)
    except ImportError:  # TensorBoard events are optional; metrics.jsonl is always written
      self._tb = None

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None and "step" in record:
      kind = record.get("kind", "")
      for key, value in record.items():
        if key not in ("step", "kind") and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(f"{kind}/{key}" if kind else key, value, record["step"])

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def mean_of(records: list[dict[str, Any]]) -> dict[str, float]:
  """Field-wise mean of per-step metric dicts (device scalars), as host floats."""
  means = jax.device_get(jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *records))
  return {k: float(v) for k, v in means.items()}


def read(workdir: str, kind: str | None = None) -> list[dict[str, Any]]:
  """Records of metrics.jsonl (of one kind), by step; a torn last line is skipped."""
  records = {}
  for r in rundir.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
    if kind is None or r.get("kind") == kind:
      records[(r.get("kind"), r.get("step"))] = r
  return sorted(records.values(), key=lambda r: r.get("step", 0))
