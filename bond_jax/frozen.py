"""The models a distillation step reads but never trains, bundled with what it takes to call them."""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.sharding import Mesh

from bond_jax.models import lora as lora_lib
from bond_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenModels:
  """policy_cfg: the shape of the policy, its anchor and pi_ref (one module, three params trees).
  reference_params: pi_ref's params (on `mesh`). reward_cfg / reward_params: the reward model.
  eos_ids: token ids that end a sampled response. pad_id: the id written after EOS and as left padding.
  mesh: where every array of the run lives. text_rewards: None when the reward model scores the policy's
  ids on device, else the host route (rewards.TextRewards: a reward model with its own tokenizer, or a
  reward function) that rewards.score calls instead.
  lora: None (the state trains whole params trees), or the adapters' LoraConfig: then reference_params is
  also the frozen base that the policy's and the anchor's adapters sit on (models/lora.py), so one copy of
  the base serves the policy, the anchor and pi_ref."""
  policy_cfg: ModelConfig
  reference_params: Any
  reward_cfg: ModelConfig
  reward_params: Any
  eos_ids: tuple[int, ...]
  pad_id: int
  mesh: Mesh
  text_rewards: Any = None
  lora: lora_lib.LoraConfig | None = None
  base_identity: dict[str, Any] | None = None  # with LoRA: {'path', 'hash', 'lora'} (loop.Stage.base)

  def model_params(self, trainable: Any) -> Any:
    """The params tree of the policy (or the anchor) from a TrainState's params (or anchor_params):
    itself, or with LoRA the base with those adapters attached (no array copied)."""
    return trainable if self.lora is None else lora_lib.attach(self.reference_params, trainable, self.lora)

  @property
  def merge_adapters(self) -> bool:
    """Whether the sampler merges adapters into its weights once per call (lora.decode 'merge')."""
    return self.lora is None or self.lora.decode == "merge"
