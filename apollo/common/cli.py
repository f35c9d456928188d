"""What the training entry points (`experiments/{pretrain,finetune,agent_sft}.py`) share.

* `define_config_flag`: the `--config` file flag (ml_collections), whose unknown
  `--config.x` overrides are one clear line (`did you mean ...?`) instead of a
  KeyError traceback, whether they fail while the flag is defined (no `--config` on
  the command line) or while flags are parsed;
* `define_start_over_flag`: `--start_over`, passed to the trainer as `start_over`;
* `run(main)`: `absl.app.run` in which a `ConfigError` (a value that cannot work) or a
  `CheckpointError` (a workdir whose checkpoints do not restore) ends the job with
  its message and exit status 1, without a traceback.

Example (an entry point)::

  _CONFIG = cli.define_config_flag("apollo/lm/configs/pretrain.py:quickstart", "...")
  _START_OVER = cli.define_start_over_flag()

  if __name__ == "__main__":
    cli.run(main)
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from apollo.common import checkpoint as checkpoint_lib
from apollo.common import config as config_lib

_DEFAULTS: dict[str, str] = {}  # Config flag name -> its default spec (path:preset).


def _fail(message: str) -> None:
  sys.stderr.write(message.rstrip("\n") + "\n")
  sys.exit(1)


def _load_config(spec: str):
  """The config of 'path/to/config.py:preset', loaded as config_flags does."""
  path, _, preset = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_apollo_config_for_errors", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def _diagnose(argv: Sequence[str], error: Exception, name: str) -> str:
  """The unknown `--<name>.x` override behind `error`, with the closest known field."""
  fallback = f"{type(error).__name__}: {error}"
  try:
    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
    spec, overrides = _DEFAULTS.get(name, ""), []
    for i, arg in enumerate(argv):
      if re.match(rf"^-{{1,2}}{name}(=|$)", arg):
        spec = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
      elif re.match(rf"^-{{1,2}}(no)?{name}\.", arg):
        overrides.append(arg.split("=", 1)[0].split(".", 1)[1])
    config = _load_config(spec)
  except Exception:  # pylint: disable=broad-except
    return fallback
  for path in overrides:
    message = config_lib.unknown_field_error(config, path, prefix=f"--{name}.")
    if message is not None:
      return message
  return fallback


def _parse_error(message: str) -> None:
  _fail(f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help.")


def define_config_flag(default: str, help_string: str, name: str = "config"):
  """`config_flags.DEFINE_config_file(name, default, help_string)`, with clean errors.

  Without `--<name>` on the command line, ml_collections applies the overrides while
  the flag is defined (at import): an unknown field then exits here with its message.
  """
  _DEFAULTS[name] = default
  try:
    return config_flags.DEFINE_config_file(name, default, help_string)
  except (KeyError, AttributeError) as e:
    _parse_error(_diagnose(sys.argv, e, name))
    raise  # Not reached: _fail exits.


def define_start_over_flag() -> flags.FlagHolder:
  return flags.DEFINE_bool(
    "start_over",
    False,
    "Only when no checkpoint in --workdir restores (the run refuses otherwise): move "
    "the damaged checkpoints to WORKDIR/checkpoints.damaged/<n>/ (nothing is deleted) "
    "and train from step 0. A restorable checkpoint is always resumed.",
  )


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as e:  # An unknown --config.x with --config given.
    names = [n for n in _DEFAULTS if any(a.lstrip("-").startswith(f"{n}.") for a in argv)]
    _parse_error(_diagnose(argv, e, names[0] if names else "config"))
    raise  # Not reached.


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)`; a ConfigError or CheckpointError is its message and exit status 1."""

  def checked_main(argv):
    try:
      return main(argv)
    except config_lib.ConfigError as e:
      _fail(f"Error: {e}")
    except checkpoint_lib.CheckpointError as e:
      _fail(f"Error: {e}")

  app.run(checked_main, flags_parser=_parse_flags)
