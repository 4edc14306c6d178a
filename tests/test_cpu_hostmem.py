"""The command-line entry points rerun themselves once with glibc's huge-page tunable."""

import os
import subprocess
import sys

from amended_darts_jax.cpu import hostmem

LINUX = dict(system="linux", libc=("glibc", "2.36"), thp_mode="madvise")


def test_environment_adds_the_tunable_only_where_it_applies():
  env = hostmem.environment({"PATH": "/bin"}, **LINUX)
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
                 hostmem._RERUN_ENV: "1"}
  # Other tunables are kept; one already set, to any value, is left alone.
  assert hostmem.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
      hostmem._RERUN_ENV: "1"}
  assert hostmem.environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **LINUX) is None
  assert hostmem.environment({hostmem.SWITCH_ENV: "0"}, **LINUX) is None
  assert hostmem.environment({}, **{**LINUX, "system": "darwin"}) is None
  assert hostmem.environment({}, **{**LINUX, "libc": ("musl", "1.2")}) is None
  assert hostmem.environment({}, **{**LINUX, "libc": ("glibc", "2.31")}) is None
  assert hostmem.environment({}, **{**LINUX, "libc": ("glibc", "")}) is None
  assert hostmem.environment({}, **{**LINUX, "thp_mode": "never"}) is None
  assert hostmem.environment({}, **{**LINUX, "thp_mode": "always"}) is not None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert hostmem._thp_mode(str(path)) == "madvise"
  assert hostmem._thp_mode(str(tmp_path / "missing")) == ""


def test_reexec_runs_the_command_again_once_with_the_tunable(tmp_path):
  script = tmp_path / "entry.py"
  script.write_text(
      "import os, sys\n"
      "from amended_darts_jax.cpu import hostmem\n"
      "print('start', os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:], flush=True)\n"
      "hostmem.reexec()\n"
      "print('main', os.environ.get('GLIBC_TUNABLES', ''))\n"
      "print(hostmem.state())\n"
      "sys.exit(3)\n")
  base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.SWITCH_ENV)}
  for extra in ({}, {hostmem.SWITCH_ENV: "0"}):
    out = subprocess.run([sys.executable, str(script), "--flag=1"], capture_output=True,
                         text=True, env={**base, **extra})
    assert out.returncode == 3, out.stderr  # the rerun's exit status is the command's
    lines = out.stdout.splitlines()
    if hostmem.environment({**base, **extra}) is None:
      assert lines[:2] == ["start  ['--flag=1']", "main "]
      assert lines[2].startswith("malloc uses 4 KB pages (")
      if extra:
        assert lines[2] == "malloc uses 4 KB pages (turned off by AMENDED_DARTS_HUGEPAGES=0)"
    else:
      assert lines[:3] == ["start  ['--flag=1']",
                           "start glibc.malloc.hugetlb=1 ['--flag=1']",
                           "main glibc.malloc.hugetlb=1"]
      assert lines[3].startswith("malloc takes transparent huge pages")
