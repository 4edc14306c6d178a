"""Worker for test_two_processes_equal_one_device: one search step in a 2-process JAX cluster.

  python tests/two_process_step.py PROCESS_ID PORT OUT.npz

Each process has two CPU devices and feeds its half of the rows of the global
batches; process 0 writes the new alpha and weights to OUT.npz.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import functools  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from amended_darts_jax import parallel, search  # noqa: E402


def main(process_id: int, port: int, out: str) -> None:
  parallel.initialize_distributed(f"localhost:{port}", 2, process_id)
  import test_search  # the same tiny state and batches as the in-process tests
  assert jax.process_count() == 2 and jax.device_count() == 4
  sc, state, train, val = test_search._state_and_batches(test_search.tiny_config())
  mesh = parallel.make_mesh()
  rows = slice(process_id * 8, (process_id + 1) * 8)
  local = lambda b: {k: np.asarray(v)[rows] for k, v in b.items()}
  repl, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  step = jax.jit(functools.partial(search.search_step, sc), in_shardings=(repl, shard, shard),
                 out_shardings=(repl, repl))
  new, metrics = step(parallel.put_replicated(state, mesh), parallel.put_batch(local(train), mesh),
                      parallel.put_batch(local(val), mesh))
  if process_id == 0:
    leaves = [np.asarray(x) for x in jax.tree.leaves(new.params)]
    np.savez(out, alpha=np.asarray(new.alpha["cells"]),
             arch_grad_norm=np.asarray(metrics["arch_grad_norm"]),
             **{f"param_{i}": leaf for i, leaf in enumerate(leaves)})
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
