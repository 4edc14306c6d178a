"""Orbax checkpoints of a whole training state, each verified by a checksum on restore.

A run restarted with the same workdir resumes from the newest checkpoint that
restores and matches its checksum. Orbax writes each checkpoint into a
temporary directory and renames it only when complete, so a process killed
mid-write leaves the last complete checkpoint as the newest (the temporary
directory is ignored and cleaned up). Two checks guard a restore: the SHA-256
of each of the checkpoint's files, written beside it once it is complete
(`checkpoint_digests/STEP.json`), is compared before orbax reads anything, and
the SHA-256 of the restored state is compared with the one saved inside the
checkpoint. A checkpoint that fails either, or that orbax cannot read, is moved
aside to `checkpoints_unreadable/` (kept, never deleted) with one warning line,
and the next older one is tried. Saves are synchronous: a failed write (disk full) is
reported at the checkpoint that failed, once, and the checkpoints written
before it stay.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from amended_darts_jax import parallel, rundir
from amended_darts_jax.errors import NonFiniteError, UserError


class CheckpointError(UserError):
  """A checkpoint that could not be written, or a workdir none of whose checkpoints restore."""


def checksum(tree: Any) -> np.ndarray:
  """SHA-256 of every leaf's dtype, shape and bytes, in tree order, as 32 uint8."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{leaf.dtype.str}{leaf.shape}".encode())
    digest.update(leaf.tobytes())
  return np.frombuffer(digest.digest(), np.uint8).copy()


def file_digests(directory: str) -> dict[str, str]:
  """SHA-256 of every file under directory, by path relative to it."""
  digests = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digests[os.path.relpath(path, directory)] = hashlib.file_digest(f, "sha256").hexdigest()
  return digests


def _cause(error: BaseException) -> str:
  """The innermost OS error's message in a chain (e.g. 'No space left on device'), else the first line."""
  seen, e, found = set(), error, None
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.strerror:
      found = e
    e = e.__cause__ or e.__context__
  if found is not None:
    return found.strerror
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


class Checkpointer:
  """Saves `{"state": ..., "checksum": ...}` every so many steps under workdir/checkpoints."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.max_to_keep = max_to_keep
    self.verified_step: int | None = None  # the newest step this process saved or verified
    self._failed = False
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True,
                                             cleanup_tmp_directories=True,
                                             enable_async_checkpointing=False))

  def save(self, state: Any) -> None:
    """Writes `state` at its step with its checksum; raises CheckpointError if the write fails."""
    step = int(state.step)
    try:
      self._manager.save(step, args=ocp.args.StandardSave(
          {"state": state, "checksum": checksum(state)}))
    except Exception as e:  # noqa: BLE001 (any failed write is reported as one sentence)
      self._failed = True
      raise CheckpointError(f"could not write the checkpoint of step {step} under "
                            f"{self.directory}: {_cause(e)}; the checkpoints written before "
                            "it are kept") from None
    self.verified_step = step
    if jax.process_index() == 0:
      self._write_digests(step)

  def _digest_path(self, step: int) -> str:
    return os.path.join(self.workdir, "checkpoint_digests", f"{step}.json")

  def _write_digests(self, step: int) -> None:
    """Writes the file digests of checkpoint `step` and drops those of checkpoints orbax removed."""
    path = self._digest_path(step)
    folder = os.path.dirname(path)
    try:
      os.makedirs(folder, exist_ok=True)
      rundir.write_json(path, file_digests(os.path.join(self.directory, str(step))))
      kept = {f"{s}.json" for s in self._manager.all_steps()}
      for name in os.listdir(folder):
        if name.endswith(".json") and name not in kept:
          os.unlink(os.path.join(folder, name))
    except OSError as e:
      self._failed = True
      raise CheckpointError(f"could not write the file digests of the checkpoint of step {step} "
                            f"({e.strerror}); the checkpoint itself is complete") from None

  def _check_digests(self, step: int) -> None:
    """Raises ValueError naming the first file of checkpoint `step` that differs from its digest."""
    try:
      with open(self._digest_path(step)) as f:
        saved = json.load(f)
    except FileNotFoundError:  # saved by a run killed before the digests: orbax and the checksum decide
      return
    except (OSError, ValueError):
      raise ValueError("its file digests cannot be read") from None
    now = file_digests(os.path.join(self.directory, str(step)))
    for name, digest in sorted(saved.items()):
      if name not in now:
        raise ValueError(f"its file {name} is missing")
      if now[name] != digest:
        raise ValueError(f"its file {name} differs from the one written")

  def save_or_stop(self, state: Any) -> None:
    """Saves `state`, unless a step of it was not finite.

    `state.bad_step >= 0` names the first non-finite step (the jitted step kept
    the state unchanged from there); then nothing is written and the run stops
    with NonFiniteError, the checkpoints on disk untouched.
    """
    bad = int(state.bad_step)
    if bad >= 0:
      kept = (f"its last checkpoint (step {self.verified_step}, written or verified by this "
              "process) stays" if self.verified_step is not None
              else "no checkpoint had been written yet")
      raise NonFiniteError(f"non-finite loss or gradient at step {bad}; the run stopped and "
                           f"{kept}")
    self.save(state)

  def restore_latest(self, like: Any) -> Any | None:
    """The newest checkpoint that restores and matches its checksum, as `like`; None if none exist.

    `like` gives the structure, dtypes and shardings (arrays or abstract). An
    unreadable or altered checkpoint is moved to checkpoints_unreadable/ with a
    warning and the next older one is tried; if every one fails, CheckpointError.
    """
    abstract = {"state": jax.tree.map(ocp.utils.to_shape_dtype_struct, like),
                "checksum": jax.ShapeDtypeStruct((32,), np.uint8)}
    skipped = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        self._check_digests(step)
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        if not np.array_equal(np.asarray(restored["checksum"]), checksum(restored["state"])):
          raise ValueError("its contents do not match the checksum written with it")
      except Exception as e:  # noqa: BLE001 (any failure: try the next older checkpoint)
        skipped.append(f"step {step}: {_cause(e)}")
        self._set_aside(step, _cause(e))
        continue
      self.verified_step = step
      return restored["state"]
    if skipped:
      raise CheckpointError(f"no checkpoint under {self.directory} could be restored "
                            f"({'; '.join(skipped)}); they were moved to "
                            f"{self._aside_dir()} and the run did not start over them")
    return None

  def _aside_dir(self) -> str:
    return os.path.join(self.workdir, "checkpoints_unreadable")

  def _set_aside(self, step: int, why: str) -> None:
    """Moves checkpoint `step` out of the manager's directory, keeping its files."""
    if jax.process_index() == 0:
      os.makedirs(self._aside_dir(), exist_ok=True)
      target, n = os.path.join(self._aside_dir(), str(step)), 1
      while os.path.exists(target):
        target, n = os.path.join(self._aside_dir(), f"{step}.{n}"), n + 1
      shutil.move(os.path.join(self.directory, str(step)), target)
      if os.path.exists(self._digest_path(step)):
        shutil.move(self._digest_path(step), os.path.join(target, "file_digests.json"))
      logging.warning("skipped the checkpoint of step %d (%s); moved it to %s", step, why, target)
    parallel.synchronize(f"checkpoint {step} set aside")
    self._manager.close()
    self._manager = self._open()

  def close(self) -> None:
    """Closes the manager; after a failed write, quietly (the failure was already reported)."""
    try:
      self._manager.wait_until_finished()
      self._manager.close()
    except Exception:  # noqa: BLE001
      if not self._failed:
        raise
