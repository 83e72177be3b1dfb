"""The shared entry of the command lines: user errors as one line, and a console with the project's lines.

    def main(argv):
      ...

    if __name__ == "__main__":
      cli.entry(main)

entry(main) runs absl's app.run with parse_flags. A user error raised by main (UserError or any other
ValueError, app.UsageError, or an OSError about a path: FileNotFoundError, NotADirectoryError,
IsADirectoryError, PermissionError, FileExistsError) prints `error: <one line>` on stderr and exits 2;
any other exception is a bug and keeps its traceback. Bad flags, bad --config overrides, a --config
file that does not load and a config's own ValueError (an unknown preset) are user errors too.

entry also quiets the console once for every CLI: absl logging at WARNING (unless --verbosity / -v is
given), TFDS progress bars off, and these third-party lines dropped or reworded, each matched by where it
comes from (real warnings stay visible):
- Orbax (absl logging) "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0" and
  "Given directory is read only=...": checkpoint.py opens checkpoints read-only on purpose to read them.
- TFDS (absl logging) "Using custom data configuration: ..." for a bond_jax BuilderConfig: every config
  of the project's builders is made per run.
- TFDS "Downloading and preparing dataset Unknown size ..." and "Dataset ... downloaded and prepared":
  printed even for the project's builders, which download nothing; they say "building dataset ...
  locally in DIR" instead. Other builders (real downloads) keep TFDS' lines.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
from typing import Any, Callable, NoReturn

from absl import app, flags, logging


class UserError(ValueError):
  """Bad input the user can fix (a flag, a path, a model directory): entry prints it as one line."""


USER_ERRORS = (ValueError, app.UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, FileExistsError)
_PROJECT = "bond_jax"
_ORBAX_READ_ONLY = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")


def describe(error: BaseException) -> str:
  """One line for a user error; an OSError with a path reads 'PATH: what is wrong with it'."""
  if isinstance(error, OSError) and error.filename is not None and error.strerror:
    text = f"{error.filename}: {error.strerror[:1].lower()}{error.strerror[1:]}"
    if error.filename2 is not None:
      text += f" (with {error.filename2})"
  else:
    text = str(error)
  return " ".join(text.split()) or type(error).__name__


def fail(message: str) -> NoReturn:
  """Print `error: message` on stderr and exit 2 (the usage-error status)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _last_line(text: str) -> str:
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else text


def _config_file_error(error: BaseException) -> str:
  """ml_collections' report of a config file that did not load, as '--config file PATH: what is wrong'.

  Its text lists the attempts and ends with the OSError's own line, e.g. "[Errno 2] No such file or
  directory: 'my_config.py'".
  """
  last = _last_line(str(error))
  match = re.fullmatch(r"\[Errno \d+\] (.+?): '(.*)'", last)
  if match:
    return f"--config file {match.group(2)}: {match.group(1).lower()}"
  return f"--config file could not be loaded: {last}"


def _flag_error(error: flags.Error) -> str:
  """absl's flag error as one line; a config file's get_config error arrives as a formatted traceback
  ("flag --config=F:P: Error whilst parsing config file: Traceback ... ValueError: unknown preset ...")."""
  text = str(error)
  if "Traceback (most recent call last)" not in text:
    return " ".join(text.split())
  flag = text.split(": Error whilst parsing config file", 1)[0]
  cause = re.sub(r"^[\w.]*(Error|Exception): ", "", _last_line(text))
  return f"{flag}: {cause}"


def _check_config_files() -> None:
  """A --config file that failed to load only raises when the config is first read (inside main, as an
  OSError with a traceback); report it right after parsing instead."""
  module = sys.modules.get("ml_collections.config_flags.config_flags")
  stand_in = getattr(module, "_ErrorConfig", None)  # ml_collections' value for a file that did not load
  if stand_in is None:
    return
  for name in list(flags.FLAGS):
    value = flags.FLAGS[name].value
    if isinstance(value, stand_in):
      fail(_config_file_error(vars(value).get("_error", "")))


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for app.run(main, flags_parser=parse_flags): every bad flag is one line, exit 2.

  A bad --config override (an unknown key, a value of the wrong type) raises from inside ml_collections
  with a traceback; print it as one line naming the offending key instead. So too for a --config file
  that does not exist and a config's own ValueError (e.g. an unknown preset of configs/dialogue.py).
  """
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as error:
    fail(_flag_error(error))
  except OSError as error:  # an override on a config file that did not load
    fail(_config_file_error(error))
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    message = " ".join(str(error).replace("\\n", " ").replace("\\'", "'").split())
    if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
      message = message[1:-1]  # AttributeError / KeyError quote their whole text
    fail(f"bad --config override: {message}")
  _check_config_files()
  return rest


class _DropBenignLines(std_logging.Filter):
  """Drops the third-party log lines every run prints that ask nothing of the user (module docstring)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    path, message = record.pathname.replace(os.sep, "/"), str(record.msg)
    if "/orbax/checkpoint/" in path and message.startswith(_ORBAX_READ_ONLY):
      return False
    if "/tensorflow_datasets/" in path and message.startswith("Using custom data configuration"):
      config = record.args[0] if isinstance(record.args, tuple) and record.args else None
      return not _is_project(type(config))
    return True


_FILTER = _DropBenignLines()


def _is_project(cls: type) -> bool:
  return cls.__module__.split(".")[0] == _PROJECT


def _reword_local_builds(builder_cls: type) -> None:
  """TFDS prints 'Downloading and preparing dataset Unknown size ...' and '... downloaded and prepared'
  for every build; the project's builders read local sources, so say that instead."""
  start = getattr(builder_cls, "_log_download_bytes", None)
  done = getattr(builder_cls, "_log_download_done", None)
  if start is None or done is None or getattr(start, "reworded", False):
    return  # reworded already, or another TFDS version: its own lines stay

  def log_start(self):
    if _is_project(type(self)):
      config = getattr(self, "builder_config", None)
      name = self.name if config is None else f"{self.name}/{config.name}"
      print(f"building dataset {name} locally in {self.data_dir}", flush=True)
    else:
      start(self)

  def log_done(self):
    if not _is_project(type(self)):  # for ours, the start line said it all
      done(self)

  log_start.reworded = True
  builder_cls._log_download_bytes, builder_cls._log_download_done = log_start, log_done


def quiet_console() -> None:
  """The console settings of every CLI (module docstring); call after flag parsing."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file at INFO
  absl_logger = logging.get_absl_logger()
  if _FILTER not in absl_logger.filters:
    absl_logger.addFilter(_FILTER)  # Orbax and TFDS log through absl's logger
  try:
    import tensorflow_datasets as tfds
  except ImportError:  # nothing of TFDS to quiet
    return
  tfds.disable_progress_bar()
  _reword_local_builds(tfds.core.DatasetBuilder)


def entry(main: Callable[[list[str]], Any], *, flags_parser: Callable[[list[str]],
                                                                      list[str]] = parse_flags) -> None:
  """Run `main(argv)` as the program through absl's app.run: a quiet console, user errors as one line on
  stderr with exit status 2, and any other exception (a bug) with its traceback."""

  def run(argv: list[str]) -> Any:
    quiet_console()
    try:
      return main(argv)
    except USER_ERRORS as error:
      fail(describe(error))

  app.run(run, flags_parser=flags_parser)
