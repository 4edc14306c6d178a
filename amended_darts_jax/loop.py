"""The run loop the search and the retraining share.

A `Run` does, in this order, what every run of either command does: JAX's
compilation cache, the multi-process start (before anything touches a
backend), the check of `conv_pool_impl`, the workdir's check (writable, and
holding no run of another config), the mesh and the batch split, the restore
of the newest intact checkpoint, the ahead-of-time compile of the step, then
`config.json` and the logs cut back to the restored step (`begin`), and the
logged loop of steps (`steps`): metrics averaged over each logging interval,
the stop at a non-finite step, the rate and the time left, what the command
does at an epoch's end, checkpoints at their cadence and at the end. The
commands keep what is theirs: the state, the step, the model, the optimizers,
the evaluation and what they write at the end.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Sequence

import jax
from absl import logging

from amended_darts_jax import checkpointing, networks, parallel, rundir
from amended_darts_jax import metrics as metrics_lib
from amended_darts_jax.cpu import dispatch

# Config fields of both commands that may change between a run and its
# resumption (they do not change the math); any other difference means the
# workdir holds another experiment.
RESUMABLE_FIELDS = ("max_steps", "log_every", "checkpoint_every", "eval_every_epochs",
                    "compilation_cache_dir", "data_dir", "download", "distributed",
                    "coordinator_address", "num_processes", "process_id", "conv_pool_impl")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
  """How many steps a run takes and when it logs and checkpoints."""
  total_steps: int
  steps_per_epoch: int
  epochs: int
  log_every: int
  checkpoint_every: int

  def epoch_of(self, done: int) -> int:
    """The epoch (from 1) that step number `done` (from 1) belongs to."""
    return (done - 1) // self.steps_per_epoch + 1


def total_steps(cfg, steps_per_epoch: int) -> int:
  """epochs * steps_per_epoch, cut to config.max_steps where that is set."""
  total = cfg.epochs * steps_per_epoch
  return min(total, cfg.max_steps) if cfg.max_steps else total


class Run:
  """One search or retraining in a workdir: its cluster, mesh, checkpoints and logs.

  Constructing it does everything up to the state: the compilation cache, the
  multi-process start, the kernels' check, the workdir's checks, the mesh.
  """

  def __init__(self, cfg, workdir: str, resumable_fields: Sequence[str] = ()):
    self.t_start = time.perf_counter()
    self.cfg, self.workdir = cfg, workdir
    rundir.setup_compilation_cache(cfg.compilation_cache_dir)
    if cfg.distributed:  # before anything touches a backend
      parallel.initialize_distributed(cfg.coordinator_address, cfg.num_processes,
                                      cfg.process_id)
    dispatch.check(cfg.conv_pool_impl)
    # Pinned for this backend before the config is compared with the workdir's or
    # saved, so that a run resumes in the layout its checkpoints have.
    if cfg.get("scan_cells") == "auto":
      cfg.scan_cells = "on" if networks.scans("auto") else "off"
    rundir.prepare_workdir(workdir)
    rundir.check_resumable(workdir, cfg, RESUMABLE_FIELDS + tuple(resumable_fields))
    self.mesh = parallel.make_mesh()
    parallel.check_batch_split(cfg.batch_size, self.mesh)
    parallel.log_devices(self.mesh)
    parallel.warm_up(self.mesh)
    self.is_main = jax.process_index() == 0
    # This process's part of the data: what input_pipeline's batches take.
    self.local = dict(process_index=jax.process_index(), process_count=jax.process_count())
    self.checkpointer = checkpointing.Checkpointer(workdir)
    self.writer: metrics_lib.MetricWriter | None = None
    self.start_step = 0
    self.compile_s = self.trace_s = self.startup_s = 0.0

  def restore(self, state: Any) -> Any:
    """`state` replicated on the mesh, or the newest intact checkpoint's in its place."""
    state = parallel.put_replicated(state, self.mesh)
    restored = self.checkpointer.restore_latest(state)
    if restored is not None:
      state = restored
      logging.info("resumed from the checkpoint of step %d", int(state.step))
    self.start_step = int(state.step)
    return state

  def compile(self, step: Callable[..., tuple[Any, Any]], state: Any, *first_batches,
              what: str) -> Callable[..., tuple[Any, Any]]:
    """`step(state, *batches) -> (state, metrics)` jitted and compiled ahead of time for
    these batches (host arrays): the state replicated and donated, each batch split
    over the mesh. The run never retraces."""
    repl, shard = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)
    jitted = jax.jit(step, in_shardings=(repl, *[shard] * len(first_batches)),
                     out_shardings=(repl, repl), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = jitted.lower(state, *[parallel.put_batch(b, self.mesh) for b in first_batches])
    # Tracing and lowering run on every start; XLA's compile, or on a cached start the
    # load of its executable, is the rest of compile_s.
    self.trace_s = time.perf_counter() - t0
    compiled = lowered.compile()
    parallel.synchronize(f"compiled the {what}")  # a peer's compile may take longer
    self.compile_s = time.perf_counter() - t0
    self.startup_s = time.perf_counter() - self.t_start  # until the first step can start
    logging.info("compiled the %s in %.1f s, %.1f s of it tracing (%.1f s since start)", what,
                 self.compile_s, self.trace_s, self.startup_s)
    return compiled

  def jit(self, fn: Callable[..., Any], replicated: int, sharded: int, *,
          what: str) -> Callable[..., Any]:
    """fn jitted for its first `replicated` arguments replicated and the `sharded` after
    them split over the mesh (an evaluation, the monitor), its result replicated. It
    compiles at its first call for each set of argument shapes and, as the step does,
    then meets the other processes at a barrier, so that its first collective starts
    with every process in step."""
    repl, shard = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)
    jitted = jax.jit(fn, in_shardings=(*[repl] * replicated, *[shard] * sharded),
                     out_shardings=repl)
    compiled = {}

    def call(*args):
      key = (jax.tree.structure(args),
             tuple((getattr(a, "shape", None), getattr(a, "dtype", None))
                   for a in jax.tree.leaves(args)))
      if key not in compiled:
        compiled[key] = jitted.lower(*args).compile()
        parallel.synchronize(f"compiled the {what}")
      return compiled[key](*args)
    return call

  def begin(self, schedule: Schedule, **record) -> None:
    """Marks the run as started (its step compiled): config.json written, the logs cut
    back to the restored step, the metric writer opened with the run's first record."""
    rundir.begin(self.workdir, self.cfg, self.start_step)
    self.writer = metrics_lib.MetricWriter(self.workdir, enabled=self.is_main,
                                           resumed_step=self.start_step)
    self.writer.write({"kind": "resume" if self.start_step else "setup",
                       "step": self.start_step, "compile_s": self.compile_s,
                       "trace_s": self.trace_s, "startup_s": self.startup_s,
                       "devices": parallel.describe(self.mesh),
                       "steps_per_epoch": schedule.steps_per_epoch,
                       "total_steps": schedule.total_steps, **record})

  def checkpoint(self, state: Any) -> None:
    """Saves `state` (raising NonFiniteError if it records a non-finite step), the
    TensorBoard events up to it flushed first."""
    self.writer.flush()
    self.checkpointer.save_or_stop(state)

  def steps(self, compiled: Callable[..., tuple[Any, Any]], state: Any,
            batches: Iterator[tuple[dict[str, Any], ...]], schedule: Schedule, *,
            describe: Callable[[dict[str, float]], str],
            before_step: Callable[..., None] | None = None,
            after_average: Callable[[int, dict[str, float]], None] | None = None,
            at_epoch_end: Callable[[int, int, Any], None] | None = None) -> Any:
    """Runs steps start_step .. total_steps - 1 and returns the final state.

    `batches` yields each step's host batches from start_step on. Hooks:
    `before_step(step, state, *batches)` (the batches on the mesh) before a step;
    `after_average(done, averaged)` on each logging interval's mean metrics (an
    interval ends every log_every steps, at each epoch's end and at each checkpoint);
    `at_epoch_end(done, epoch, state)` at each epoch's last step and the run's
    last; `describe(averaged)` is the middle of the log line. The checkpointer and
    the writer are closed on the way out, whatever happens.
    """
    pending: list[dict[str, jax.Array]] = []
    t_log, since = time.perf_counter(), 0
    try:
      for step in range(self.start_step, schedule.total_steps):
        on_mesh = tuple(parallel.put_batch(b, self.mesh) for b in next(batches))
        if before_step is not None:
          before_step(step, state, *on_mesh)
        state, metrics = compiled(state, *on_mesh)
        pending.append(metrics)
        since += 1
        done = step + 1
        epoch_end = done % schedule.steps_per_epoch == 0 or done == schedule.total_steps
        checkpoint_now = done % schedule.checkpoint_every == 0 or done == schedule.total_steps
        # A checkpoint ends a logging interval too, so that a resumed run's intervals
        # (and their means) are a straight run's.
        if done % schedule.log_every == 0 or epoch_end or checkpoint_now:
          averaged = metrics_lib.mean_of(pending)
          pending = []
          if after_average is not None:
            after_average(done, averaged)
          if int(state.bad_step) >= 0:
            self.checkpoint(state)  # raises NonFiniteError naming the step
          now = time.perf_counter()
          rate, t_log, since = since / (now - t_log), now, 0
          epoch = schedule.epoch_of(done)
          self.writer.write({"kind": "step", "step": done, "epoch": epoch, **averaged,
                             "steps_per_s": rate})
          logging.info("epoch %d/%d step %d/%d | %s | %.2f steps/s | %s left", epoch,
                       schedule.epochs, done, schedule.total_steps, describe(averaged), rate,
                       rundir.hms((schedule.total_steps - done) / max(rate, 1e-9)))
        if epoch_end and at_epoch_end is not None:
          at_epoch_end(done, schedule.epoch_of(done), state)
        if checkpoint_now:
          self.checkpoint(state)
    finally:
      self.close()
    return state

  def close(self) -> None:
    self.checkpointer.close()
    if self.writer is not None:
      self.writer.close()
