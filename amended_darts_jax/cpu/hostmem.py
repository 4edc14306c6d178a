"""Transparent huge pages for XLA:CPU's per-step buffers, by glibc's malloc tunable.

XLA:CPU allocates the temporary buffers of every run of a compiled step with
malloc (1.9 GB for the weight step of a 5-cell DARTS supernet at batch 32). A
block that large is mapped fresh and unmapped after each step, so the kernel
faults in and zeroes it 4 KB at a time, every step. glibc's tunable
`glibc.malloc.hugetlb=1` (glibc 2.35 and later) makes malloc ask for
transparent huge pages on such blocks, which took that weight step from 1.54
to 1.09 s (BUILD_NOTES.md, "Performance on XLA:CPU").

Tunables are read when a process starts, so the command-line entry points
(search, train, the benchmark scripts) call `reexec()` first thing: it runs
the same command again, once, with the tunable added to `GLIBC_TUNABLES`. It
does nothing where the tunable is already set (to anything), off Linux or
glibc, on older glibc, where the kernel's transparent huge pages are `never`,
or with `AMENDED_DARTS_HUGEPAGES=0` in the environment. The search and the
retraining say in one log line which it was (`state`). Importing this module
runs nothing.
"""

from __future__ import annotations

import os
import platform
import sys

SWITCH_ENV = "AMENDED_DARTS_HUGEPAGES"  # "0": leave the environment alone
TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_RERUN_ENV = "AMENDED_DARTS_HUGEPAGES_RERUN"  # set in the re-run command's environment


def _thp_mode(path: str = THP_MODE) -> str:
  """The kernel's transparent huge page mode ("always", "madvise", "never"), "" if unknown."""
  try:
    text = open(path).read()
  except OSError:
    return ""
  return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def _decide(environ, system, libc, thp_mode) -> tuple[dict | None, str]:
  """(the environment to run with the tunable, or None; why not, when None)."""
  system = sys.platform if system is None else system
  name, version = platform.libc_ver() if libc is None else libc
  thp_mode = _thp_mode() if thp_mode is None else thp_mode
  if environ.get(SWITCH_ENV, "1") == "0":
    return None, f"turned off by {SWITCH_ENV}=0"
  if not system.startswith("linux") or name != "glibc":
    return None, "not Linux with glibc"
  try:
    if tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
      return None, f"glibc {version} predates the tunable (2.35)"
  except ValueError:
    return None, "glibc's version is unknown"
  if thp_mode not in ("always", "madvise"):
    return None, f"the kernel's transparent huge pages are {thp_mode or 'unknown'}"
  tunables = environ.get("GLIBC_TUNABLES", "")
  if any(item.split("=")[0] == TUNABLE for item in tunables.split(":")):
    return None, f"GLIBC_TUNABLES already sets {TUNABLE}"
  env = {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, f"{TUNABLE}=1"))),
         _RERUN_ENV: "1"}
  return env, ""


def environment(environ, *, system: str | None = None, libc: tuple[str, str] | None = None,
                thp_mode: str | None = None) -> dict | None:
  """The environment to run with the tunable, or None where nothing should change."""
  return _decide(environ, system, libc, thp_mode)[0]


def reexec() -> None:
  """Runs this command again with the tunable, where `environment` says so; else returns."""
  env = environment(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError:  # the command goes on as it is, with 4 KB pages
    return


def state(environ=None) -> str:
  """One sentence on whether this process runs with the tunable, and why not."""
  environ = os.environ if environ is None else environ
  if environ.get(_RERUN_ENV) == "1":
    return (f"malloc takes transparent huge pages for large blocks: the command re-ran itself "
            f"once with GLIBC_TUNABLES={TUNABLE}=1 ({SWITCH_ENV}=0 turns this off)")
  why = _decide(environ, None, None, None)[1] or "the command did not re-run itself"
  return f"malloc uses 4 KB pages ({why})"
