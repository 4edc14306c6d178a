"""Data parallelism: one global batch sharded over a 1-D device mesh.

The state is replicated, the batch split along its first axis, and the step is a
plain `jax.jit` with `NamedSharding`s; XLA inserts the reductions, so batch-norm
statistics and gradients are those of the whole global batch and the numbers
equal the single-device ones up to float reduction order.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from amended_darts_jax.errors import ClusterError, ConfigError

DATA_AXIS = "data"

# How long a process waits at `synchronize` for the others (a peer's compile).
SYNC_TIMEOUT_S = 3600
_barrier_ids = itertools.count()


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Starts multi-process JAX (one process per host of a pod).

  With no arguments JAX detects the cluster (Cloud TPU, SLURM, ...); on CPU or
  an unknown cluster, give all three.
  """
  kwargs = {}
  if coordinator_address:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over every device of every process (automatic sharding axes)."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def synchronize(what: str, timeout_s: float = SYNC_TIMEOUT_S) -> None:
  """Waits until every process gets here (no-op for one process).

  Uses the coordination service's barrier, which waits as long as it is told.
  The CPU collectives do not: the first collective over a group of devices
  sets up its communicator through the same service with a fixed 30 s limit,
  so processes must reach a program's first collective close together. Every
  process calls this in the same order, which keeps the barriers' names equal.
  """
  if jax.process_count() == 1:
    return
  name = f"amended_darts_jax:{next(_barrier_ids)}:{what}"
  client = jax._src.distributed.global_state.client
  try:
    client.wait_at_barrier(name, int(timeout_s * 1000))
  except Exception as e:  # the runtime raises its own error type
    status = str(e).split(":", 1)[0]
    raise ClusterError(f"process {jax.process_index()} waited {timeout_s:g} s at '{what}' for "
                       f"the other processes, which did not all come ({status})") from e


def warm_up(mesh: Mesh) -> None:
  """Sets up the collectives of a run while the processes are in step.

  One all-reduce over the whole mesh (the group every step and evaluation
  uses) and the device barrier of `multihost_utils` (the groups that
  checkpoints' barriers use), each after a `synchronize`.
  """
  if jax.process_count() == 1:
    return
  synchronize("collectives")
  ones = put_batch({"x": np.ones((jax.local_device_count(),), np.float32)}, mesh)["x"]
  total = jax.jit(lambda x: x.sum(), out_shardings=replicated(mesh))(ones)
  if int(total) != mesh.devices.size:
    raise ClusterError(f"an all-reduce over the {mesh.devices.size} devices gave {int(total)}")
  multihost_utils.sync_global_devices("amended_darts_jax:warm_up")


def check_batch_split(batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if batch_size % n or batch_size % jax.process_count():
    raise ConfigError(f"batch size {batch_size} does not split evenly across {n} devices "
                      f"({jax.process_count()} processes); use a multiple of {n}")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def put_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of the global batch onto the mesh, as one global array each."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


def sum_over_batches(fn, batches, mesh: Mesh) -> dict[str, np.ndarray]:
  """Sums the pytree `fn(global_batch)` (replicated) over host batches put on the mesh;
  host totals.

  The sum is taken on the host, in the outputs' dtype (the same IEEE additions a device
  makes). On the device it would be an eager `+` of global arrays: a program over every
  process's devices, compiled lazily between two calls of `fn` with no barrier after
  its compile, as the compiled programs have (loop.Run.jit).
  """
  totals = None
  for batch in batches:
    out = jax.device_get(fn(put_batch(batch, mesh)))
    totals = out if totals is None else jax.tree.map(np.add, totals, out)
  return totals


def describe(mesh: Mesh) -> str:
  kinds = sorted({d.device_kind for d in mesh.devices.flat})
  return (f"{mesh.devices.size} device(s) [{', '.join(kinds)}] on {jax.process_count()} "
          f"process(es), this is process {jax.process_index()}; mesh {DATA_AXIS}="
          f"{mesh.devices.size}")


def log_devices(mesh: Mesh) -> None:
  logging.info("devices: %s", describe(mesh))
