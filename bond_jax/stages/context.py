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
  dialogues / preferences: the chitchat TFDS builders (data/prepare.py), None where no stage reads them."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  tokenizer: Tokenizer
  dialogues: Any = None
  preferences: Any = None
