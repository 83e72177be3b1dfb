"""Reward model: the LM backbone plus a scalar head read at each row's last real token.

Params: {'backbone': <Transformer params without the LM head>, 'head': {'kernel': [D]}}, so a reward
model can be initialised from an SFT policy by copying its backbone.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bond_jax.models.config import ModelConfig
from bond_jax.models.transformer import Transformer


def last_real_index(token_mask: jax.Array) -> jax.Array:
  """[B] index of the rightmost True of token_mask [B, T] (what Hugging Face's sequence classifiers read:
  the last non-pad token). A row with no real token gives 0."""
  slots = jnp.arange(token_mask.shape[-1])
  return jnp.max(jnp.where(token_mask, slots, 0), axis=-1)


class RewardModel(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, token_mask: jax.Array) -> jax.Array:
    """tokens, token_mask [B, T] (prompt + response, left-padded) -> float32 scores [B]."""
    hidden, _ = Transformer(self.cfg, with_lm_head=False, name="backbone").hidden(tokens, token_mask)
    kernel = self.param("head", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        (self.cfg.d_model,), self.cfg.params_dtype)
    last = jnp.take_along_axis(hidden, last_real_index(token_mask)[:, None, None], axis=1)[:, 0]
    return read_head(kernel, last)


def read_head(kernel: jax.Array, last: jax.Array) -> jax.Array:
  """The scalar head [D] on the hidden states [..., D] of rows' last real tokens -> float32 scores [...]."""
  return last.astype(jnp.float32) @ kernel.astype(jnp.float32)


def init_boxed(cfg: ModelConfig, rng: jax.Array) -> Any:
  """Reward-model params with logical-axis boxes (sharding.init_sharded places them)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return RewardModel(cfg).init(rng, tokens, jnp.ones((1, 1), bool))["params"]


def score(cfg: ModelConfig, params: Any, tokens: jax.Array, token_mask: jax.Array) -> jax.Array:
  """Scores [B] of left-padded prompt+response rows tokens [B, T]."""
  return RewardModel(cfg).apply({"params": params}, tokens, token_mask)


def from_policy(policy_params: Any, reward_params: Any) -> Any:
  """Reward params whose backbone is the policy's (the LM head, if untied, is dropped)."""
  backbone = {k: v for k, v in policy_params.items() if k in reward_params["backbone"]}
  return {**reward_params, "backbone": backbone}
