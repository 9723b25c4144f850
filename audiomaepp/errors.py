"""The error types for a user's mistake, which every command line reports as one line."""

TORCH_INSTALL = "pip install -e '.[torch]'"


class UserError(ValueError):
  """A mistake in what the user gave (flags, files, data), not a bug: CLIs print
  `error: <message>` on one line and exit with status 1, without a traceback."""


class MissingDependency(UserError, ImportError):
  """An optional package the requested feature needs is not installed; the message says how to
  install it. Both a `UserError` (one line from a CLI) and an `ImportError`."""


def torch_required(purpose: str) -> MissingDependency:
  """The error for a feature that needs PyTorch (the optional `torch` extra)."""
  return MissingDependency(f"{purpose} needs PyTorch: install it with `{TORCH_INSTALL}` in "
                           "the repository (or `pip install torch`)")
