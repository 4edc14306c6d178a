"""Orbax checkpoints of a whole training state; restart with the same workdir resumes.

Orbax writes each checkpoint into a temporary directory and renames it only
when complete, so a process killed mid-write leaves the last good checkpoint as
the latest one (the temporary directory is ignored and cleaned up).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from amended_darts_jax import rundir
from amended_darts_jax.errors import NonFiniteError


class Checkpointer:
  """Saves `{"state": ..., "data": ...}` pytrees every so many steps under workdir/checkpoints."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree: Any) -> None:
    """Starts writing (asynchronously); `wait()` blocks until it is on disk."""
    self._manager.save(step, args=ocp.args.StandardSave(tree))

  def save_or_stop(self, state: Any, steps_per_epoch: int) -> None:
    """Saves `state` with its data position, unless a step of it was not finite.

    `state.bad_step >= 0` names the first non-finite step (the jitted step kept
    the state unchanged from there); then nothing is written and the run stops
    with NonFiniteError, the last good checkpoint untouched.
    """
    bad = int(state.bad_step)
    if bad >= 0:
      last = self.latest_step()
      kept = (f"the last good checkpoint (step {last}) stays" if last is not None
              else "no checkpoint had been written yet")
      raise NonFiniteError(f"non-finite loss or gradient at step {bad}; the run stopped and "
                           f"{kept}")
    step = int(state.step)
    self.save(step, {"state": state, "data": rundir.data_position(step, steps_per_epoch)})

  def restore(self, step: int, like: Any) -> Any:
    """Restores into the structure, dtypes and shardings of `like` (arrays or abstract)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
