"""Data parallelism: one global batch sharded over a 1-D device mesh.

The state is replicated, the batch split along its first axis, and the step is a
plain `jax.jit` with `NamedSharding`s; XLA inserts the reductions, so batch-norm
statistics and gradients are those of the whole global batch and the numbers
equal the single-device ones up to float reduction order.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from amended_darts_jax.errors import ConfigError

DATA_AXIS = "data"


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
  """Sums the pytree `fn(global_batch)` over host batches put on the mesh; host totals."""
  totals = None
  for batch in batches:
    out = fn(put_batch(batch, mesh))
    totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
  return jax.device_get(totals)


def describe(mesh: Mesh) -> str:
  kinds = sorted({d.device_kind for d in mesh.devices.flat})
  return (f"{mesh.devices.size} device(s) [{', '.join(kinds)}] on {jax.process_count()} "
          f"process(es), this is process {jax.process_index()}; mesh {DATA_AXIS}="
          f"{mesh.devices.size}")


def log_devices(mesh: Mesh) -> None:
  logging.info("devices: %s", describe(mesh))
