"""Runs a user can trust, through the real command lines.

The same command twice gives the same bytes (C++ kernels on), and so does a
run killed with SIGKILL and resumed (search and retraining); two processes on localhost give a
1-process run's numbers; the steps lower for GPU and TPU; bad input and faults
end with one sentence and a non-zero exit, and nothing written is lost.
"""

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import pytest

from amended_darts_jax import checkpointing, hypergrad, parallel, search, spaces, train
from amended_darts_jax.cpu import kernels
from amended_darts_jax.configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 900
CLUSTER_TIMEOUT = 420  # a two-process run takes 1-2 minutes here, loaded


def _env(devices: int = 1, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "AMENDED_DARTS_CPU_KERNEL"}
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  env.update(extra)
  return env


def _start(module, workdir, *flags, env=None, prefix=(), **kw):
  cmd = [*prefix, sys.executable, "-m", f"amended_darts_jax.{module}", f"--workdir={workdir}",
         *flags]
  return subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


def _run(module, workdir, *flags, env=None, prefix=(), **kw):
  proc = _start(module, workdir, *flags, env=env, prefix=prefix, **kw)
  out, err = proc.communicate(timeout=TIMEOUT)
  return proc.returncode, out, err


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
  """One compilation cache for the command lines of a test worker."""
  return f"--config.compilation_cache_dir={tmp_path_factory.mktemp('xla_cache')}"


def _jsonl(path):
  return [json.loads(line) for line in open(path)]


def _each_step_once(workdir):
  records = _jsonl(os.path.join(workdir, "metrics.jsonl"))
  for kind in ("step", "epoch"):
    steps = [r["step"] for r in records if r["kind"] == kind]
    assert steps == sorted(set(steps)), (kind, steps)
  history = [r["step"] for r in _jsonl(os.path.join(workdir, "alpha_history.jsonl"))]
  assert history == sorted(set(history))
  return records


# The default search (s2, amended, exact products, batch 64) in 2 cells at C=4 (two
# reduction cells), so that the C++ kernels run at 8 and 16 channels: the generic loop
# and a fixed one.
SHRUNK_DEFAULT = ("--config.layers=2", "--config.init_channels=4", "--config.epochs=2",
                  "--config.max_steps=8", "--config.checkpoint_every=3", "--config.log_every=2")


def test_default_search_is_byte_identical_after_sigkill_and_resume(tmp_path, cache,
                                                                 kill_after_first_checkpoint):
  assert kernels.available(), kernels.why_unavailable()
  """A straight run, and a run SIGKILLed after its first checkpoint and resumed, in fresh
  processes with the C++ kernels on: the same bytes out. The killed run computed its
  first steps in another process than the straight one, so this is repeatability
  across processes as well as an exact resume."""
  flags = (*SHRUNK_DEFAULT, cache)
  rc, _, err = _run("search", tmp_path / "first", *flags)
  assert rc == 0, err[-3000:]
  assert "C++ depthwise and max-pooling kernels are on" in err

  killed = tmp_path / "killed"
  done = kill_after_first_checkpoint(_start("search", killed, *flags), killed)
  assert done and done[-1] < 8
  assert not (killed / "alphas.json").exists()
  assert os.path.getsize(next((killed / "tensorboard").iterdir())) > 100  # flushed at the checkpoint
  rc, _, err = _run("search", killed, *flags)
  assert rc == 0, err[-3000:]
  assert f"resumed from the checkpoint of step {done[-1]}" in err
  for name in ("alphas.json", "genotype.json"):
    assert (killed / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name
  records = _each_step_once(killed)
  straight = _each_step_once(tmp_path / "first")
  strip = lambda rs: [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rs
                      if r["kind"] in ("step", "epoch")]
  assert strip(records) == strip(straight)
  assert [r["kind"] for r in records if r["kind"] in ("setup", "resume")] == ["setup", "resume"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(module, workdir, flags, devices=1):
  """Runs the command as a cluster of two processes on this machine, `devices` CPU devices each.

  If one process fails, the other is stopped at once; if they outlive CLUSTER_TIMEOUT, each is
  sent SIGABRT first, so that its Python traceback (PYTHONFAULTHANDLER) says where it
  waited. Either way the test fails with both processes' last output."""
  port = _free_port()
  cluster = ("--config.distributed=True", f"--config.coordinator_address=localhost:{port}",
             "--config.num_processes=2")
  logs = [tuple(open(workdir.parent / f"{workdir.name}.process{i}.{kind}", "w+")
                for kind in ("out", "err")) for i in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, "-m", f"amended_darts_jax.{module}", f"--workdir={workdir}", *flags,
       *cluster, f"--config.process_id={i}"], cwd=REPO, stdout=out, stderr=err, text=True,
      env=_env(devices=devices, PYTHONFAULTHANDLER="1")) for i, (out, err) in enumerate(logs)]
  deadline = time.monotonic() + CLUSTER_TIMEOUT
  while (any(p.poll() is None for p in procs) and time.monotonic() < deadline
         and not any(p.returncode for p in procs)):
    time.sleep(0.5)
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGABRT)
      try:
        p.wait(timeout=20)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
  results = []
  for out, err in logs:
    out.seek(0)
    err.seek(0)
    results.append((out.read(), err.read()))
    out.close()
    err.close()
  why = "; ".join(f"process {i} exited with {p.returncode}" for i, p in enumerate(procs))
  if any(p.returncode for p in procs):
    pytest.fail(why + "\n" + "\n".join(f"--- process {i}:\n{err[-4000:]}"
                                         for i, (_, err) in enumerate(results)))
  return results


# First order: these tests are about processes, checkpoints and faults, not the gradient
# (the amended step's data parallelism: tests/test_search.py), and it compiles fastest.
SEARCH_FLAGS = ("--config.method=first_order", "--config.space=s2", "--config.layers=1",
                "--config.init_channels=2",
                "--config.batch_size=16", "--config.epochs=3", "--config.max_steps=4",
                "--config.checkpoint_every=2", "--config.log_every=2")


_STALLED_PEER = """
import sys, time
import jax
from amended_darts_jax import cli, parallel
port, rank = sys.argv[1:]
parallel.initialize_distributed(f"localhost:{port}", 2, int(rank))
jax.devices()
if rank == "0":
  cli.run_or_exit(lambda: parallel.synchronize("the test's barrier", timeout_s=3))
  print("passed the barrier")
else:
  time.sleep(60)  # a peer that stalls
"""


def test_a_process_whose_peer_stalls_exits_with_one_sentence():
  """The barrier gives up after its timeout: one line and exit status 1, not a hang in JAX's
  shutdown barrier for the missing peer."""
  port = str(_free_port())
  peer = subprocess.Popen([sys.executable, "-c", _STALLED_PEER, port, "1"], cwd=REPO,
                          env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _STALLED_PEER, port, "0"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=50)
    assert time.monotonic() - t0 < 40
  finally:
    peer.kill()
    peer.wait()
  assert done.returncode == 1, done.stderr[-2000:]
  assert "passed the barrier" not in done.stdout
  lines = [l for l in done.stderr.splitlines() if l.startswith("error:")]
  assert lines == ["error: process 0 waited 3 s at 'the test's barrier' for the other processes, "
                   "which did not all come (DEADLINE_EXCEEDED)"], done.stderr[-2000:]
  assert "Traceback" not in done.stderr


def test_search_command_on_two_processes_equals_one_process(tmp_path, cache):
  """Two processes of two devices each (a pod's shape: several hosts, several chips each)
  end where one process of four devices does."""
  results = _two_processes("search", tmp_path / "two", (*SEARCH_FLAGS, cache), devices=2)
  assert "4 device(s) [cpu] on 2 process(es)" in results[0][1] + results[0][0]
  rc, _, err = _run("search", tmp_path / "one", *SEARCH_FLAGS, cache, env=_env(devices=4))
  assert rc == 0, err[-3000:]
  assert "kernels are off: the batch is sharded over 4 devices" in err
  two = json.load(open(tmp_path / "two" / "alphas.json"))["cells"]
  one = json.load(open(tmp_path / "one" / "alphas.json"))["cells"]
  np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-7)


TRAIN_FLAGS = ("--config.init_channels=4", "--config.layers=3", "--config.batch_size=16",
               "--config.epochs=2", "--config.max_steps=24", "--config.checkpoint_every=3",
               "--config.log_every=3", "--config.eval_every_epochs=0")


def _initial_weights(cfg):
  genotype = spaces.get_genotype(cfg.genotype)
  model = train.make_model(cfg, genotype, 10)
  return train.initial_state(cfg, model, train.make_optimizer(cfg, 10)[0], (8, 8, 1))


def _final_weights(workdir, cfg):
  ckpt = checkpointing.Checkpointer(str(workdir))
  state = ckpt.restore_latest(_initial_weights(cfg))
  ckpt.close()
  return state


def test_train_command_on_two_processes_equals_one_process_and_resumes_after_sigkill(
    tmp_path, cache, genotype_path, kill_after_first_checkpoint):
  """Two processes of one device each end where one process of two devices does; a run
  of that process SIGKILLed after its first checkpoint and resumed ends with the same
  bytes as the straight one."""
  flags = (*TRAIN_FLAGS, f"--config.genotype={genotype_path}", cache)
  _two_processes("train", tmp_path / "two", flags)
  rc, _, err = _run("train", tmp_path / "one", *flags, env=_env(devices=2))
  assert rc == 0, err[-3000:]
  killed = tmp_path / "killed"
  done = kill_after_first_checkpoint(_start("train", killed, *flags, env=_env(devices=2)),
                                     killed)
  assert done and done[-1] < 24
  assert not (killed / "results.json").exists()
  rc, _, err = _run("train", killed, *flags, env=_env(devices=2))
  assert rc == 0, err[-3000:]
  assert f"resumed from the checkpoint of step {done[-1]}" in err

  from amended_darts_jax.configs import train_default
  cfg = train_default.get_config()
  cfg.update(init_channels=4, layers=3, batch_size=16, epochs=2, genotype=str(genotype_path))
  two, one, resumed = (_final_weights(tmp_path / d, cfg) for d in ("two", "one", "killed"))
  assert int(two.step) == int(one.step) == int(resumed.step) == 24
  for a, b, c in zip(*(jax.tree.leaves(x.params) for x in (two, one, resumed))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(b))
  r2, r1 = (json.load(open(tmp_path / d / "results.json")) for d in ("two", "one"))
  assert abs(r2["final_top1"] - r1["final_top1"]) <= 1 / 180  # at most one test image apart
  initial = _initial_weights(cfg)
  moved = [float(np.abs(np.asarray(x) - np.asarray(y)).max())
           for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(initial.params))]
  assert max(moved) > 1e-3  # the 24 steps trained the weights


# Lowering for platforms this machine lacks: the steps compile for GPU and TPU.

def _tiny_search_config(**overrides):
  cfg = default.get_config()
  cfg.update(space="s2", layers=1, init_channels=2, batch_size=16, cg_maxiter=3)
  cfg.update(overrides)
  return cfg


def _search_inputs(cfg):
  model = search.make_model(cfg, 10)
  sc = search.step_config(cfg, model, steps_per_epoch=10)
  state = search.initial_state(cfg, sc, (8, 8, 1))
  batch = {"image": np.zeros((cfg.batch_size, 8, 8, 1), np.float32),
           "label": np.zeros((cfg.batch_size,), np.int32)}
  return functools.partial(search.search_step, sc), (state, batch, batch)


def _lowered_texts(fn, args, platforms, **jit_kwargs):
  """The step traced once and lowered for each platform, as text."""
  traced = jax.jit(fn, **jit_kwargs).trace(*args)
  return [traced.lower(lowering_platforms=(p,)).as_text() for p in platforms]


@pytest.mark.parametrize("method, products", [
    ("first_order", "exact"), ("darts", "exact"), ("darts", "fd"), ("amended", "exact"),
    ("amended", "fd"), ("implicit", "exact"), ("implicit", "fd")])
def test_search_step_lowers_for_cuda_and_tpu(method, products):
  assert method in hypergrad.METHODS and products in hypergrad.PRODUCTS
  fn, args = _search_inputs(_tiny_search_config(method=method, products=products,
                                                conv_pool_impl="conv"))
  for text in _lowered_texts(fn, args, ("cuda", "tpu")):
    assert "amended_darts_cpu_" not in text and "func.func public @main" in text


def test_cpu_lowering_of_auto_holds_the_kernel_call_the_gpu_check_looks_for(monkeypatch):
  """The check above can fail: on one CPU device "auto" lowers to the C++ custom calls."""
  assert kernels.available(), kernels.why_unavailable()
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  fn, args = _search_inputs(_tiny_search_config(method="first_order"))
  assert "amended_darts_cpu_forward" in _lowered_texts(fn, args, ("cpu",))[0]


def test_search_step_sharded_over_8_devices_lowers_for_cuda():
  assert len(jax.devices()) == 8, "conftest asks XLA for 8 CPU devices"
  fn, args = _search_inputs(_tiny_search_config(conv_pool_impl="conv"))
  mesh = parallel.make_mesh()
  repl, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  text, = _lowered_texts(fn, args, ("cuda",), in_shardings=(repl, shard, shard),
                         out_shardings=(repl, repl))
  assert "mhlo.num_partitions = 8" in text and "amended_darts_cpu_" not in text


def test_training_step_lowers_for_cuda_and_tpu():
  from amended_darts_jax.configs import train_default
  cfg = train_default.get_config()
  cfg.update(init_channels=4, layers=3, batch_size=16, conv_pool_impl="conv")
  genotype = spaces.get_genotype(cfg.genotype)
  model = train.make_model(cfg, genotype, 10)
  tc = train.train_config(cfg, model, 10)
  tx = tc.tx
  state = train.initial_state(cfg, model, tx, (8, 8, 1))
  batch = {"image": np.zeros((16, 8, 8, 1), np.float32), "label": np.zeros((16,), np.int32)}
  for text in _lowered_texts(functools.partial(train.train_step, tc), (state, batch),
                             ("cuda", "tpu")):
    assert "amended_darts_cpu_" not in text and "func.func public @main" in text


# Bad input and faults: one sentence, a non-zero exit, nothing lost.

@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, cache):
  """A finished 4-step search with checkpoints at steps 2 and 4, to copy and damage.

  It runs with the C++ kernels switched off by the environment, which it must say."""
  workdir = tmp_path_factory.mktemp("checkpointed") / "run"
  rc, _, err = _run("search", workdir, *SEARCH_FLAGS, cache,
                    env=_env(AMENDED_DARTS_CPU_KERNEL="0"))
  assert rc == 0, err[-3000:]
  assert "kernels are off (turned off by AMENDED_DARTS_CPU_KERNEL=0)" in err
  return workdir


def _data_files(workdir):
  """The data files of the newest checkpoint (orbax's OCDBT store keeps them under d/)."""
  files = [p for p in (workdir / "checkpoints" / "4").rglob("*")
           if p.is_file() and p.parent.name == "d"]
  assert files
  return files


def _truncate_data(workdir):
  for path in _data_files(workdir):
    path.write_bytes(path.read_bytes()[:100])


def _drop_metadata(workdir):
  (workdir / "checkpoints" / "4" / "default" / "_METADATA").unlink()


def _flip_bytes(workdir):
  for path in _data_files(workdir):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
      data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _tear_config(workdir):
  path = workdir / "config.json"
  path.write_text(path.read_text()[:40])


def _tear_metrics(workdir):
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"kind": "step", "step": 5, "train_lo')


def _unwritable(tmp_path):
  """A workdir nobody can write: sysfs refuses even root; elsewhere a read-only directory."""
  if os.geteuid() == 0:
    return "/sys/amended_darts_unwritable/run"
  parent = tmp_path / "read_only"
  parent.mkdir()
  parent.chmod(0o500)
  return str(parent / "run")


# Files that cannot grow past 32 KB (ulimit -f, in 1024-byte blocks): a checkpoint's
# metadata (about 50 KB) fails to write, as on a full disk.
DISK_FULL = ("bash", "-c", 'ulimit -f 32 && exec "$0" "$@"')


_SKIPPED_4 = "skipped the checkpoint of step 4"

# name, command, flags, damage to a copy of `checkpointed` (None: a fresh workdir),
# exit status, what stderr must say.
CASES = [
    ("eta_negative", "search", ("--config.eta=-1",), None, 1, "config.eta must be >= 0, got -1.0"),
    ("eta_nan", "search", ("--config.eta=nan",), None, 1,
     "config.eta must be a finite number, got nan"),
    ("max_steps_negative", "search", ("--config.max_steps=-1",), None, 1,
     "config.max_steps must be >= 0, got -1"),
    ("fd_r_zero", "search", ("--config.fd_r=0",), None, 1, "config.fd_r must be positive, got 0.0"),
    ("unknown_field", "search", ("--config.foo=3",), None, 1,
     "--config.foo: the config has no field 'foo'"),
    ("unknown_field_train", "train", ("--config.foo=3",), None, 1,
     "--config.foo: the config has no field 'foo'"),
    ("lr_negative_train", "train", ("--config.lr=-0.1",), None, 1, "config.lr must be positive"),
    ("workdir_is_a_file", "search", (), "file", 1, "exists and is not a directory"),
    ("workdir_unwritable", "search", (), "unwritable", 1, "cannot write in the workdir"),
    ("config_json_truncated", "search", ("--config.max_steps=6",), _tear_config, 1,
     "config.json cannot be read"),
    ("metrics_torn_last_line", "search", ("--config.max_steps=6",), _tear_metrics, 0,
     "resumed from the checkpoint of step 4"),
    ("checkpoint_data_truncated", "search", ("--config.max_steps=6",), _truncate_data, 0, _SKIPPED_4),
    ("checkpoint_metadata_missing", "search", ("--config.max_steps=6",), _drop_metadata, 0,
     _SKIPPED_4),
    ("checkpoint_bytes_flipped", "search", ("--config.max_steps=6",), _flip_bytes, 0, _SKIPPED_4),
    ("first_start_fails", "search", ("--config.dataset=cifar10", "--config.data_dir=/nonexistent"),
     None, 1, "dataset 'cifar10' is not prepared"),
    ("disk_full_at_checkpoint", "search", (), "disk_full", 1,
     "could not write the checkpoint of step 2 under"),
    ("genotype_pairs_short", "train", ("--config.genotype=GENOTYPE",), {"normal": 7}, 1,
     "a gene is a list of 8 [op, input] pairs; got 7"),
    ("genotype_extra_nodes", "train", ("--config.genotype=GENOTYPE",), {"normal": 10}, 1,
     "got 10 pairs"),
    ("genotype_concat_out_of_range", "train", ("--config.genotype=GENOTYPE",),
     {"normal_concat": [2, 3, 4, 9]}, 1, "distinct state indices in 0..5"),
]


def _genotype_file(tmp_path, change):
  """DARTS_V2 as a genotype.json, with the normal gene cut or grown to `change["normal"]` pairs."""
  d = spaces.DARTS_V2.to_dict()
  if "normal" in change:
    d["normal"] = (d["normal"] * 2)[:change["normal"]]
  d.update({k: v for k, v in change.items() if k != "normal"})
  path = tmp_path / "genotype.json"
  path.write_text(json.dumps(d))
  return str(path)


@pytest.mark.parametrize("name, module, flags, damage, status, message", CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_and_faults(tmp_path, checkpointed, cache, name, module, flags, damage, status,
                              message):
  workdir, kw = tmp_path / "run", {}
  flags = list(flags)
  if callable(damage):
    shutil.copytree(checkpointed, workdir)
    damage(workdir)
  elif damage == "file":
    workdir.write_text("not a directory")
  elif damage == "unwritable":
    workdir = _unwritable(tmp_path)
  elif damage == "disk_full":
    kw["prefix"] = DISK_FULL
  elif isinstance(damage, dict):
    flags = [f.replace("GENOTYPE", _genotype_file(tmp_path, damage)) for f in flags]
  base = (*(SEARCH_FLAGS if module == "search" else TRAIN_FLAGS),
          "--config.compilation_cache_dir=" if damage == "disk_full" else cache)
  rc, _, err = _run(module, workdir, *base, *flags, **kw)
  assert rc == status, err[-3000:]
  assert message in err, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == (1 if status else 0), errors
  if name.startswith("checkpoint_"):  # fell back to step 2, kept the damaged one aside
    assert len([line for line in err.splitlines() if _SKIPPED_4 in line]) == 1
    assert "resumed from the checkpoint of step 2" in err
    assert (workdir / "checkpoints_unreadable" / "4").is_dir()
    _each_step_once(workdir)
    assert json.load(open(workdir / "alphas.json"))
  if name == "metrics_torn_last_line":
    _each_step_once(workdir)
  if name == "first_start_fails":
    assert not (workdir / "config.json").exists()
    rc, _, err = _run(module, workdir, *base)
    assert rc == 0, err[-3000:]  # another config starts in that workdir
  if name == "disk_full_at_checkpoint":
    assert "Exception ignored" not in err and err.count("could not write") == 1


@flax.struct.dataclass
class _Tiny:
  step: jax.Array
  w: jax.Array


def test_a_checkpoint_whose_state_does_not_match_its_checksum_is_never_restored(tmp_path,
                                                                                caplog):
  """Written without file digests (as by a run killed right after orbax's rename) and with a
  wrong checksum: orbax reads it without complaint, the checksum refuses it."""
  import orbax.checkpoint as ocp
  state = _Tiny(step=jax.numpy.asarray(3), w=jax.numpy.arange(6.0))
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(state)
  later = _Tiny(step=jax.numpy.asarray(5), w=jax.numpy.ones(6))
  ckpt._manager.save(5, args=ocp.args.StandardSave(
      {"state": later, "checksum": checkpointing.checksum(state)}))
  ckpt.close()
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  restored = ckpt.restore_latest(state)
  ckpt.close()
  assert int(restored.step) == 3 and ckpt.verified_step == 3
  np.testing.assert_array_equal(restored.w, state.w)
  notes = [r.getMessage() for r in caplog.records if "skipped the checkpoint" in r.getMessage()]
  assert len(notes) == 1 and "step 5" in notes[0] and "do not match the checksum" in notes[0]
  assert (tmp_path / "checkpoints_unreadable" / "5").is_dir()
