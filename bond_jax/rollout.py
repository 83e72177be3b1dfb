"""From a batch of prompts to the batch an update step scores: sample, score, join.

Each function samples with sampling.generate, scores the responses by the run's reward route
(rewards.score: the reward model on device, or the text route), joins prompts and responses into rows (scoring.join) and returns
(the update's typed batch, Stats). Rows are [left pads | prompt | response | right pads]; a batch's
`*_mask` marks the RESPONSE tokens whose log-probs the update sums (scoring.sequence_logprob_fn).

The rollouts' prompts must have passed sampling.check_prompts for max_new_tokens (the distillation stage
checks each host batch before placing it): with the reward model on device, a rollout reads nothing back from the device, so its sampling, scoring and the
update that follows are dispatched without waiting on each other (tests/test_rollout.py counts it).

BOND's math assumes samples from pi itself: training rollouts sample at temperature 1 with no top-k/top-p
(validation.py enforces it), so the teacher-forced log-probs are those of the sampled law.
Shapes: B prompts, P prompt tokens, T = max_new_tokens, L = P + T.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bond_jax import best_of_n, objectives, rewards as rewards_lib, sampling, scoring, sharding, update
from bond_jax.frozen import FrozenModels

if TYPE_CHECKING:  # reference_pools draws with this module's `sample`
  from bond_jax import reference_pools


class Stats(NamedTuple):
  """What a rollout measured beside its batch: response_lengths [B, M] of the samples it drew (EOS
  included; the anchor's too for J-BOND)."""
  response_lengths: jax.Array


def sample(frozen: FrozenModels, params: Any, prompts: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
           num_samples: int, max_new_tokens: int, prompts_checked: bool = False) -> sampling.Samples:
  """num_samples responses [B, N, T] per prompt of a model with the policy's shape, at temperature 1.
  prompts_checked: see sampling.generate (the rollouts below pass True)."""
  return sampling.generate(frozen.policy_cfg, params, prompts, prompt_mask, rng, num_samples=num_samples,
                           max_new_tokens=max_new_tokens, eos_ids=frozen.eos_ids, pad_id=frozen.pad_id,
                           mesh=frozen.mesh, prompt_width=prompts.shape[1],
                           merge_adapters=frozen.merge_adapters, prompts_checked=prompts_checked)


def _rewards(frozen: FrozenModels, prompts, prompt_mask, samples: sampling.Samples) -> jax.Array:
  return rewards_lib.score(frozen, prompts, prompt_mask, samples.tokens, samples.mask)


def jbond(frozen: FrozenModels, policy_params: Any, anchor_params: Any, prompts: jax.Array,
          prompt_mask: jax.Array, rng: jax.Array, max_new_tokens: int) -> tuple[update.JBondBatch, Stats]:
  """J-BOND: 1 policy sample and 2 anchor samples per prompt, all three scored in one reward call."""
  policy_rng, anchor_rng = jax.random.split(rng)
  policy = sample(frozen, policy_params, prompts, prompt_mask, policy_rng, 1, max_new_tokens, True)
  anchor = sample(frozen, anchor_params, prompts, prompt_mask, anchor_rng, 2, max_new_tokens, True)
  responses, response_mask, lengths = _joined_samples(policy, anchor)
  rewards = rewards_lib.score(frozen, prompts, prompt_mask, responses, response_mask)
  return _jbond_batch(prompts, prompt_mask, responses, response_mask, rewards), Stats(lengths)


@jax.jit
def _joined_samples(*samples: sampling.Samples) -> tuple[jax.Array, jax.Array, jax.Array]:
  """tokens, mask [B, N1 + N2 + ..., T] and lengths [B, N1 + ...] of several models' samples (one
  computation: a rollout dispatches few, so that none waits on the device's queue of pending ones)."""
  join_samples = lambda name: jnp.concatenate([getattr(x, name) for x in samples], axis=1)
  return join_samples("tokens"), join_samples("mask"), join_samples("lengths")


@jax.jit
def _jbond_batch(prompts, prompt_mask, responses, response_mask, rewards) -> update.JBondBatch:
  """The update's batch of rows [policy sample, anchor samples] [B, 3, T] (one computation)."""
  rows = scoring.join(prompts, prompt_mask, responses, response_mask)
  tokens, mask = rows.tokens, rows.response_mask
  return update.JBondBatch(policy_tokens=tokens[:, 0], policy_mask=mask[:, 0], policy_rewards=rewards[:, 0],
                           anchor_tokens=tokens[:, 1:], anchor_mask=mask[:, 1:], anchor_rewards=rewards[:,
                                                                                                        1:])


def bond_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(policy key, base key) of a BOND step's key: `bond` samples the base with the second, so a pool of
  pi_ref drawn with it (reference_pools.draw) holds the very samples the step would draw."""
  policy_rng, base_rng = jax.random.split(rng)
  return policy_rng, base_rng


def bond(frozen: FrozenModels, policy_params: Any, base_params: Any, prompts: jax.Array,
         prompt_mask: jax.Array, rng: jax.Array, max_new_tokens: int, *, n: int, k: int,
         num_policy_samples: int, reference: "reference_pools.ReferencePool | None" = None,
         forward_estimator: str = "best_of_n") -> tuple[update.BondBatch, Stats]:
  """BOND / iterative BOND: M policy samples; k samples of the base (pi_ref, or the anchor) give the
  quantiles, and the forward-KL term's targets: the best of the first n of them, or all k
  (forward_estimator "all_k": the loss weighs them, objectives.weighted_forward_kl_loss).

  reference: pi_ref's k samples of these prompts drawn with bond_keys(rng)[1] (a kept pool: the study's
  BOND arms share them), used instead of sampling the base; only where the base is pi_ref."""
  if k < n:
    raise ValueError(f"k={k} base samples cannot supply a Best-of-{n}: need k >= n")
  policy_rng, base_rng = bond_keys(rng)
  policy = sample(frozen, policy_params, prompts, prompt_mask, policy_rng, num_policy_samples, max_new_tokens,
                  True)
  if reference is None:
    base = sample(frozen, base_params, prompts, prompt_mask, base_rng, k, max_new_tokens, True)
    base_tokens, base_mask, base_rewards = base.tokens, base.mask, _rewards(frozen, prompts, prompt_mask,
                                                                            base)
  else:
    if reference.rewards.shape[1] != k:
      raise ValueError(f"the reference pool has {reference.rewards.shape[1]} samples per prompt; k={k}")
    # the pool's rewards are the score's float32 values widened to float64: narrowing them back is exact;
    # placed as the score places them (rows split), as the update's jit expects
    base_tokens, base_mask = reference.tokens, reference.mask
    rewards = np.asarray(reference.rewards, np.float32)
    base_rewards = jax.device_put(rewards, sharding.fitted(frozen.mesh, rewards.shape, ("act_batch", None)))
  if forward_estimator == "all_k":
    target_tokens, target_mask = base_tokens, base_mask
  else:
    best, _ = best_of_n.select_best(base_rewards[:, :n])  # ties: the lowest index
    pick = lambda x: jnp.take_along_axis(x, best[:, None, None], axis=1)
    target_tokens, target_mask = pick(base_tokens), pick(base_mask)
  targets = scoring.join(prompts, prompt_mask, target_tokens, target_mask)
  rows = scoring.join(prompts, prompt_mask, policy.tokens, policy.mask)
  batch = update.BondBatch(policy_tokens=rows.tokens, policy_mask=rows.response_mask,
                           policy_rewards=_rewards(frozen, prompts, prompt_mask,
                                                   policy), base_rewards=base_rewards,
                           target_tokens=targets.tokens, target_mask=targets.response_mask)
  return batch, Stats(policy.lengths)


def reinforce(frozen: FrozenModels, policy_params: Any, prompts: jax.Array, prompt_mask: jax.Array,
              rng: jax.Array, max_new_tokens: int, *,
              num_policy_samples: int) -> tuple[update.ReinforceBatch, Stats]:
  """RLOO: M policy samples per prompt with their rewards."""
  policy = sample(frozen, policy_params, prompts, prompt_mask, rng, num_policy_samples, max_new_tokens, True)
  rows = scoring.join(prompts, prompt_mask, policy.tokens, policy.mask)
  batch = update.ReinforceBatch(policy_tokens=rows.tokens, policy_mask=rows.response_mask,
                                policy_rewards=_rewards(frozen, prompts, prompt_mask, policy))
  return batch, Stats(policy.lengths)
