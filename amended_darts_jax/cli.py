"""Shared command-line plumbing: absl flags, config files, one-sentence errors."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from amended_darts_jax.cpu import hostmem
from amended_darts_jax.errors import ClusterError, UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and outputs; a "
                               "run started again with the same directory resumes.")


def workdir() -> str:
  return _WORKDIR.value


class _QuietLibraries:
  """Drops INFO records of chatty libraries (orbax's dozens of lines per checkpoint), and
  orbax's logged tracebacks: the exception reaches the caller (checkpointing.py), which
  reports it in one sentence."""
  NOISY = ("/orbax/", "/xla_bridge.py", "/tensorstore/")

  def filter(self, record) -> bool:
    if not any(n in record.pathname for n in self.NOISY):
      return True
    if "/orbax/" in record.pathname and record.exc_info:
      return False
    return record.levelno >= 30


def quiet_libraries() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())


def launch(main: Callable[..., None], default_config: str) -> None:
  """Defines --config (default: configs/<default_config>) and runs main under absl."""
  quiet_libraries()
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", default_config)
  # ml_collections reads the --config.FIELD overrides already here, and in parsing.
  with _unknown_field_exits():
    config = config_flags.DEFINE_config_file("config", path, "Config file (a Python file with "
                                             "get_config()); fields override as --config.FIELD.",
                                             lock_config=True)
  flags.mark_flag_as_required("workdir")

  def parse(argv):
    with _unknown_field_exits():
      return app.parse_flags_with_usage(argv)

  def main_with_state(argv):
    logging.info("%s", hostmem.state())  # the entry re-ran itself with huge pages, or why not
    # A start compiles dozens of small programs (initialization, eager steps) of tens of
    # milliseconds each, below JAX's default threshold of 1 s for the persistent cache:
    # a command caches them all (a library caller keeps JAX's default).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    main(argv, config_flag=config)

  app.run(main_with_state, flags_parser=parse)


@contextlib.contextmanager
def _unknown_field_exits():
  """An override of a field the config lacks (a locked ConfigDict's KeyError) is one line, exit 1."""
  try:
    yield
  except (AttributeError, KeyError) as e:
    message = e
    while isinstance(message, BaseException) and message.args:
      message = message.args[0]
    name, _, hint = str(message).partition("\n")
    name = name.strip("\"'")
    hint = f" ({hint.strip()})" if hint.strip() else ""
    print(f"error: --config.{name}: the config has no field {name!r}{hint}", file=sys.stderr)
    sys.exit(1)


def run_or_exit(fn: Callable[[], Any]) -> Any:
  """Runs fn; an error the user can fix ends the process with one line and exit status 1."""
  try:
    return fn()
  except UserError as e:
    logging.flush()
    print(f"error: {e}", file=sys.stderr)
    if isinstance(e, ClusterError):
      # JAX's exit handler would wait at the cluster's shutdown barrier for the peer that
      # is missing, then abort; what this process wrote is complete, so leave at once.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(1)
    sys.exit(1)
