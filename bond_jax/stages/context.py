"""What the pipeline prepares once and hands every stage (a stage never prepares the workdir itself)."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from jax.sharding import Mesh

from bond_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
  """config: the validated run config; workdir: its directory (config.json recorded, data built);
  mesh: the device mesh of config.mesh; tokenizer: the run's tokenizer (trained or given);
  prompts: (train prompts, {held-out set name: prompts}) of the distillation stage (prompts.prompt_sources,
  read once while preparing); dialogues / preferences: the chitchat TFDS builders (data/prepare.py). Each is
  None where no stage reads it."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  tokenizer: Tokenizer
  prompts: Any = None
  dialogues: Any = None
  preferences: Any = None
