"""From a batch of prompts to the batch an update step scores: sample, score, join.

The update steps (update.py) see the policy only through `scoring.sequence_logprob_fn(params, tokens, mask)`
over rows [R, L]. Here a row is a whole sequence, [left pads | prompt | response | right pads] (scoring.join):
`tokens` holds it (pads = pad_id) and `mask` marks the RESPONSE tokens whose log-probs are summed.

BOND's math assumes samples from pi itself: training rollouts sample at temperature 1 with no top-k/top-p
(trainer config validation enforces it), so the teacher-forced log-probs are those of the sampled law.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from bond_jax import objectives, sampling, scoring
from bond_jax.models.config import ModelConfig


def _sample(cfg, params, prompts, prompt_mask, rng, n, sampling_config, eos_ids, pad_id, mesh):
  return sampling.generate(cfg, params, prompts, prompt_mask, rng, num_samples=n,
                           max_new_tokens=sampling_config.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                           eos_ids=eos_ids, pad_id=pad_id, mesh=mesh, prompt_width=prompts.shape[1])


def jbond_batch(cfg: ModelConfig, rm_cfg: ModelConfig, policy_params: Any, anchor_params: Any,
                rm_params: Any, prompts: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *,
                sampling_config: Any, eos_ids: Sequence[int], pad_id: int, mesh=None) -> dict[str, jax.Array]:
  """J-BOND: 1 policy sample and 2 anchor samples per prompt, all scored by the reward model.

  Returns the update batch: policy_tokens/mask [B, L], policy_rewards [B], anchor_tokens/mask [B, 2, L],
  anchor_rewards [B, 2], plus response_lengths [B, 3] for metrics.
  """
  policy_rng, anchor_rng = jax.random.split(rng)
  policy = _sample(cfg, policy_params, prompts, prompt_mask, policy_rng, 1, sampling_config, eos_ids, pad_id,
                   mesh)
  anchor = _sample(cfg, anchor_params, prompts, prompt_mask, anchor_rng, 2, sampling_config, eos_ids, pad_id,
                   mesh)
  responses = jnp.concatenate([policy.tokens, anchor.tokens], axis=1)
  response_mask = jnp.concatenate([policy.mask, anchor.mask], axis=1)
  rewards = scoring.rewards(rm_cfg, rm_params, prompts, prompt_mask, responses, response_mask)
  rows = scoring.join(prompts, prompt_mask, responses, response_mask)
  tokens, mask = rows.tokens, rows.response_mask
  return {"policy_tokens": tokens[:, 0], "policy_mask": mask[:, 0], "policy_rewards": rewards[:, 0],
          "anchor_tokens": tokens[:, 1:], "anchor_mask": mask[:, 1:], "anchor_rewards": rewards[:, 1:],
          "response_lengths": jnp.concatenate([policy.lengths, anchor.lengths], axis=1)}


def bond_batch(cfg: ModelConfig, rm_cfg: ModelConfig, policy_params: Any, base_params: Any, rm_params: Any,
               prompts: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *, n: int, k: int,
               num_policy_samples: int, sampling_config: Any, eos_ids: Sequence[int], pad_id: int,
               mesh=None) -> dict[str, jax.Array]:
  """BOND / iterative BOND: M policy samples; k samples of the base (pi_ref, or the anchor) give the
  quantiles, and the best of the first n of them is the forward-KL target.

  Returns policy_tokens/mask [B, M, L], policy_rewards [B, M], base_rewards [B, k], best_tokens/mask [B, L].
  """
  if k < n:
    raise ValueError(f"k={k} base samples cannot supply a Best-of-{n}: need k >= n")
  policy_rng, base_rng = jax.random.split(rng)
  policy = _sample(cfg, policy_params, prompts, prompt_mask, policy_rng, num_policy_samples, sampling_config,
                   eos_ids, pad_id, mesh)
  base = _sample(cfg, base_params, prompts, prompt_mask, base_rng, k, sampling_config, eos_ids, pad_id, mesh)
  policy_rewards = scoring.rewards(rm_cfg, rm_params, prompts, prompt_mask, policy.tokens, policy.mask)
  base_rewards = scoring.rewards(rm_cfg, rm_params, prompts, prompt_mask, base.tokens, base.mask)
  best, _ = objectives.select_best(base_rewards[:, :n])  # ties: the lowest index
  pick = lambda x: jnp.take_along_axis(x, best[:, None, None], axis=1)
  best_rows = scoring.join(prompts, prompt_mask, pick(base.tokens), pick(base.mask))
  rows = scoring.join(prompts, prompt_mask, policy.tokens, policy.mask)
  return {"policy_tokens": rows.tokens, "policy_mask": rows.response_mask, "policy_rewards": policy_rewards,
          "base_rewards": base_rewards, "best_tokens": best_rows.tokens[:, 0],
          "best_mask": best_rows.response_mask[:, 0],
          "response_lengths": policy.lengths}


def reinforce_batch(cfg: ModelConfig, rm_cfg: ModelConfig, policy_params: Any, rm_params: Any,
                    prompts: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *, num_policy_samples: int,
                    sampling_config: Any, eos_ids: Sequence[int], pad_id: int, mesh=None) -> dict[str, jax.Array]:
  """RLOO: M policy samples per prompt with their rewards: policy_tokens/mask [B, M, L], rewards [B, M]."""
  policy = _sample(cfg, policy_params, prompts, prompt_mask, rng, num_policy_samples, sampling_config, eos_ids,
                   pad_id, mesh)
  rewards = scoring.rewards(rm_cfg, rm_params, prompts, prompt_mask, policy.tokens, policy.mask)
  rows = scoring.join(prompts, prompt_mask, policy.tokens, policy.mask)
  return {"policy_tokens": rows.tokens, "policy_mask": rows.response_mask, "policy_rewards": rewards,
          "response_lengths": policy.lengths}
