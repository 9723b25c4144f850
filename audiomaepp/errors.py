"""The error types every command line reports as one line: a user's mistake, storage that does
not answer."""

TORCH_INSTALL = "pip install -e '.[torch]'"


class UserError(ValueError):
  """A mistake in what the user gave (flags, files, data), not a bug: CLIs print
  `error: <message>` on one line and exit with status 1, without a traceback."""


class StorageError(RuntimeError):
  """Storage (a disk, a bucket) did not answer, after retries: not the user's mistake and not a
  bug either, so command lines report it as one `error:` line too (exit status 1)."""


class MissingDependency(UserError, ImportError):
  """An optional package the requested feature needs is not installed; the message says how to
  install it. Both a `UserError` (one line from a CLI) and an `ImportError`."""


def torch_required(purpose: str) -> MissingDependency:
  """The error for a feature that needs PyTorch (the optional `torch` extra)."""
  return MissingDependency(f"{purpose} needs PyTorch: install it with `{TORCH_INSTALL}` in "
                           "the repository (or `pip install torch`)")
