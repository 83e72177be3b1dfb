"""Shared bits of the absl command lines: flag errors as one line instead of a traceback."""

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for app.run(main, flags_parser=parse_flags).

  A bad --config override (an unknown key, a value of the wrong type) raises from inside ml_collections
  with a traceback; print it as one line naming the offending key and exit 2 instead.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    message = " ".join(str(error).replace("\\n", " ").replace("\\'", "'").split())
    if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
      message = message[1:-1]  # AttributeError / KeyError quote their whole text
    print(f"error: bad --config override: {message}", file=sys.stderr)
    sys.exit(2)
