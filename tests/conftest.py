"""Shared fixtures: float64 on demand, tiny problems with known derivatives."""

import os

# Tests run on the CPU, with eight fake devices for the data-parallel checks. In this
# process XLA skips LLVM's optimizations: these tests compile many programs and run each
# a few times, and check their numbers against independent math to a tolerance, not to
# the bit (BUILD_NOTES.md, "Tests"). The command lines they start (test_runs.py,
# test_train.py) run with XLA's default flags, as a user's do.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                  "--xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()

import dataclasses

import jax
import pytest

LIGHT_SPACE = "light_s2"


@pytest.fixture(scope="module")
def light_space():
  """s2's layout with skip_connect and avg_pool_3x3 (registered for the module, then
  removed): an edge that drop-path spares and one it drops, in programs that compile
  in seconds. Returns the space's name."""
  from amended_darts_jax import spaces
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(spaces.SPACES, LIGHT_SPACE, dataclasses.replace(
        spaces.get_space("s2"), name=LIGHT_SPACE, ops=("skip_connect", "avg_pool_3x3")))
    yield LIGHT_SPACE


# A cheap genotype (one convolution, pools and skips) so that a retraining network
# compiles in seconds.
_GENE = (("sep_conv_3x3", 0), ("skip_connect", 1), ("max_pool_3x3", 0), ("skip_connect", 2),
         ("avg_pool_3x3", 1), ("skip_connect", 3), ("skip_connect", 0), ("max_pool_3x3", 4))


@pytest.fixture
def tiny_genotype():
  from amended_darts_jax import spaces
  return spaces.Genotype(normal=_GENE, reduce=_GENE)


@pytest.fixture
def genotype_path(tmp_path, tiny_genotype):
  """tiny_genotype saved as genotype.json under the test's tmp_path."""
  path = tmp_path / "genotype.json"
  tiny_genotype.save(str(path))
  return path


@pytest.fixture
def x64():
  """Enables float64 for one test and restores the previous setting after it."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


def _kill_after_first_checkpoint(proc, workdir, timeout=600):
  """SIGKILLs a running command-line job as soon as its first checkpoint is complete."""
  import os
  import signal
  import time
  ckpt = os.path.join(str(workdir), "checkpoints")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


@pytest.fixture
def kill_after_first_checkpoint():
  return _kill_after_first_checkpoint


# The modules whose tests take longest (command-line runs, compiles of whole supernets)
# go first, so that with `-n 2` neither worker is left with a long test at the end.
_LONGEST_FIRST = ("test_runs.py", "test_supernet.py", "test_search.py", "test_train.py",
                  "test_bilevel.py")


def pytest_collection_modifyitems(config, items):
  rank = lambda item: next((i for i, name in enumerate(_LONGEST_FIRST)
                            if item.nodeid.startswith(f"tests/{name}")), len(_LONGEST_FIRST))
  items.sort(key=rank)  # stable: the order within a module is kept
