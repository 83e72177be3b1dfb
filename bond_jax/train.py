"""`python -m bond_jax.train --config=configs/dialogue.py --workdir=runs/dialogue`: J-BOND end to end.

With no reference / reward model named in the config, the run first makes them (SFT, then a Bradley-Terry
reward model; cached in the workdir), then runs the distribution-matching stage. Rerunning the same
command resumes from the latest checkpoint.
"""

import sys

from absl import app, flags, logging
import tensorflow_datasets as tfds
from ml_collections import config_flags

from bond_jax import cli, distributed, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/dialogue.py[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/dialogue", "Run directory (local path or gs://...).")
_INIT_DISTRIBUTED = distributed.define_flags()
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file at INFO
  tfds.disable_progress_bar()
  _INIT_DISTRIBUTED()  # before any other JAX call: multi-host runs need the global device list
  try:
    trainer.run(_CONFIG.value, _WORKDIR.value)
  except ValueError as error:  # configuration and input errors: one line, no traceback
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
