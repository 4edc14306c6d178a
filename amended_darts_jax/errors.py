"""Errors that mean bad input, not a bug: the command line prints their message and exits 1."""


class UserError(Exception):
  """An input the user can fix: a config value, a missing dataset, a malformed file."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (unknown name, impossible batch split, ...)."""


class DataError(UserError):
  """A dataset that cannot be read (not prepared, unknown name, ...)."""


class NonFiniteError(UserError):
  """A non-finite loss or gradient; the run stopped and the last good checkpoint stays."""


class ClusterError(UserError):
  """The processes of a multi-process run could not meet: a peer stopped or stalled."""
