"""The models a distillation step reads but never trains, bundled with what it takes to call them."""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.sharding import Mesh

from bond_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenModels:
  """policy_cfg: the shape of the policy, its anchor and pi_ref (one module, three params trees).
  reference_params: pi_ref's params (on `mesh`). reward_cfg / reward_params: the reward model.
  eos_ids: token ids that end a sampled response. pad_id: the id written after EOS and as left padding.
  mesh: where every array of the run lives. text_rewards: None when the reward model scores the policy's
  ids on device, else the host route (rewards.TextRewards: a reward model with its own tokenizer, or a
  reward function) that rewards.score calls instead."""
  policy_cfg: ModelConfig
  reference_params: Any
  reward_cfg: ModelConfig
  reward_params: Any
  eos_ids: tuple[int, ...]
  pad_id: int
  mesh: Mesh
  text_rewards: Any = None
