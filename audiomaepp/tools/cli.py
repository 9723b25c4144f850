"""The one entry point of every command line (`main.py` and `audiomaepp.tools.*`).

`cli.run(main)` stands for `absl.app.run(main)` and adds two things:
  * a user's mistake ends the program with one line `error: <what was wrong>` on stderr and exit
    status 1: a bad or misspelled flag (`--config.num_train_step=5`), a --config file that does
    not exist, and inside `main` an `audiomaepp.errors.UserError` (bad config, data or input
    files; `train.TrainingError` is one), an `app.UsageError`, a file-system error about a
    path the user named (not found, not a directory, permission denied, ...), or storage that
    did not answer after retries (`errors.StorageError`). Any other exception is a bug and keeps
    its traceback.
  * Orbax's logging below ERROR (dozens of INFO lines per checkpoint save or restore, warnings
    about read-only managers) and JAX's INFO lines (the accelerator back ends it did not find)
    are hidden, unless `--verbosity` (`-v`) is given.
"""
import logging as py_logging
import os
import re
import sys
from typing import Any, Callable, NoReturn, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from audiomaepp import errors

# Exceptions raised in `main` that are the user's mistake, not a bug.
USER_ERRORS = (errors.UserError, app.UsageError, FileNotFoundError, FileExistsError,
               NotADirectoryError, IsADirectoryError, PermissionError, errors.StorageError)
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')


def run(main: Callable[[list[str]], Any]) -> None:
  """Runs `main(argv)` like `absl.app.run`, reporting user mistakes as one `error:` line."""
  app.run(lambda argv: _run_main(main, argv), flags_parser=parse_flags)


def print_error(message: str) -> None:
  """Writes `error: <message>` on a line of its own to stderr, in one write: threads of a failed
  checkpoint save may still be printing."""
  sys.stderr.flush()
  os.write(sys.stderr.fileno(), f"\nerror: {message}\n".encode())


def fail(message: str) -> NoReturn:
  """Writes `error: <message>` on a line of its own to stderr and exits with status 1."""
  print_error(message)
  raise SystemExit(1)


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses the flags (absl's `flags_parser`); a flag the user got wrong ends in `fail`."""
  try:
    remaining = flag_values(argv)
  except flags.Error as e:
    fail(_one_line(str(e)))
  except (KeyError, AttributeError) as e:  # config_flags: an override of a field that is not there
    message = _unknown_override(argv, str(e))
    if message is None:  # not about an override: a bug
      raise
    fail(message)
  except OSError as e:  # config_flags: overrides of a config file that cannot be loaded
    fail(next(iter(_config_file_errors(argv, flag_values)), _one_line(str(e))))
  for problem in _config_file_errors(argv, flag_values):
    fail(problem)
  return remaining


def _run_main(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
  if not flags.FLAGS["verbosity"].present:
    logging.get_absl_handler().addFilter(quiet_libraries)
  try:
    return main(argv)
  except USER_ERRORS as e:
    fail(describe(e))


def describe(error: BaseException) -> str:
  """One line for a user's mistake: its message, or for an OS error '<path>: <reason>'."""
  if isinstance(error, OSError) and error.filename and error.strerror:
    return f"{error.filename}: {error.strerror}"
  return _one_line(str(error) or type(error).__name__)


def quiet_libraries(record: py_logging.LogRecord) -> bool:
  """A logging filter: drops Orbax's records below ERROR, JAX's below WARNING ("Unable to
  initialize backend 'tpu'" on every machine without one), and asyncio's exit-time tracebacks of
  the write tasks of a failed save (reported already)."""
  if record.name == "asyncio" and "/orbax/" in record.getMessage():
    return False
  if "/orbax/" in record.pathname:
    return record.levelno >= py_logging.ERROR
  if "/jax/" in record.pathname:
    return record.levelno >= py_logging.WARNING
  return True


def _one_line(text: str) -> str:
  """The first line of `text`, with its last line when that names the cause (tracebacks)."""
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  if len(lines) <= 1:
    return lines[0] if lines else text
  return f"{lines[0]} ... {lines[-1]}"


def _unknown_override(argv: Sequence[str], message: str) -> Optional[str]:
  """'--config.x: the config has no field ...' for the override config_flags could not resolve
  (None when no override names the missing field)."""
  match = _DID_YOU_MEAN.search(message)
  wrong = match.group(2) if match else message.strip("'\"").split("'")[0]
  for arg in argv:
    name = arg.split("=", 1)[0]
    path = name.lstrip("-").split(".")
    if len(path) > 1 and wrong in path[1:]:
      hint = ""
      if match:
        hint = f"; did you mean --{'.'.join(match.group(1) if p == wrong else p for p in path)}?"
      return f"{name}: the config has no field {wrong!r}{hint}"
  return None


def _config_file_errors(argv: Sequence[str], flag_values: flags.FlagValues) -> list[str]:
  """'--config=PATH: config file not found' for each config flag whose file cannot be loaded
  (config_flags defers that error to the config's first use)."""
  problems = []
  for arg in argv:
    name, _, value = arg.lstrip("-").partition("=")
    if not value or name not in flag_values or flag_values[name].flag_type() != "config object":
      continue
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
      problems.append(f"--{name}={path}: config file not found")
    elif not os.access(path, os.R_OK):
      problems.append(f"--{name}={path}: config file not readable")
  return problems
