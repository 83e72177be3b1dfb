"""`python -m bond_jax.train --config=configs/dialogue.py --workdir=runs/dialogue`: BOND end to end.

With no reference / reward model named in the config, the run first makes them (SFT, then a Bradley-Terry
reward model; cached in the workdir), then runs the distillation stage (J-BOND by default). Rerunning the
same command resumes from the latest good checkpoint; `--until=sft` or `--until=reward` stops after that
stage. The stage order and what is checked before any compute: bond_jax/pipeline.py.
"""

from absl import app, flags
from ml_collections import config_flags

from bond_jax import cli, distributed, pipeline, validation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/dialogue.py[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/dialogue", "Run directory (local path or gs://...).")
_UNTIL = flags.DEFINE_enum("until", "bond", validation.UNTIL, "Stop after this stage.")
_INIT_DISTRIBUTED = distributed.define_flags()
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _INIT_DISTRIBUTED()  # before any other JAX call: multi-host runs need the global device list
  pipeline.run(_CONFIG.value, _WORKDIR.value, _UNTIL.value)


if __name__ == "__main__":
  cli.entry(main)
