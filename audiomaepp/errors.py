"""The error type for a user's mistake, which every command line reports as one line."""


class UserError(ValueError):
  """A mistake in what the user gave (flags, files, data), not a bug: CLIs print
  `error: <message>` on one line and exit with status 1, without a traceback."""
