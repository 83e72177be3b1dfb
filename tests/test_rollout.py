"""Update batches from sampled rows: scoring's join, scoring's rewards, and the Best-of-n pick.

The join and the chunked log-probs themselves are tested in test_scoring.py.
"""

import flax.linen as nn
import jax
import numpy as np

from bond_jax import rollout, scoring, sharding
from bond_jax.frozen import FrozenModels
from bond_jax.models import reward, transformer
from bond_jax.models.config import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                  mlp_dim=64, max_seq_len=64)
PAD = 0


def test_bond_batch_joins_scores_and_picks_the_best_of_n_base_samples():
  params = nn.unbox(transformer.init_boxed(CFG, jax.random.key(0)))
  rm_params = nn.unbox(reward.init_boxed(CFG, jax.random.key(1)))
  rm_params = {**rm_params, "head": jax.random.normal(jax.random.key(2), (CFG.d_model,))}
  prompts = np.random.default_rng(0).integers(3, 64, (3, 6)).astype(np.int32)
  prompt_mask = np.ones_like(prompts, bool)
  prompt_mask[1, :2] = False  # left padding
  prompts[~prompt_mask] = PAD
  n = 3
  frozen = FrozenModels(policy_cfg=CFG, reference_params=params, reward_cfg=CFG, reward_params=rm_params,
                        eos_ids=(1,), pad_id=PAD, mesh=sharding.make_mesh({},
                                                                          jax.devices()[:1]))
  batch, stats = rollout.bond(frozen, params, params, prompts, prompt_mask, jax.random.key(3), 5, n=n, k=4,
                              num_policy_samples=2)
  tokens, mask = np.asarray(batch.policy_tokens), np.asarray(batch.policy_mask)
  assert tokens.shape == mask.shape == (3, 2, 11) and batch.base_rewards.shape == (3, 4)
  np.testing.assert_array_equal(stats.response_lengths, mask.sum(-1))
  np.testing.assert_array_equal(tokens[:, :, :6], np.broadcast_to(prompts[:, None], (3, 2, 6)))
  assert not mask[:, :, :6].any() and mask[:, :, 6].all()  # the response mask only: no prompt token
  again = scoring.rewards(CFG, rm_params, prompts, prompt_mask, tokens[:, :, 6:], mask[:, :, 6:])
  np.testing.assert_allclose(batch.policy_rewards, again, atol=1e-6)
  # The forward-KL target is the base sample of highest reward among the first n (ties: the lowest index).
  best_tokens, best_mask = np.asarray(batch.best_tokens), np.asarray(batch.best_mask)
  best_reward = reward.score(CFG, rm_params, best_tokens, (best_tokens != PAD) | best_mask)
  np.testing.assert_allclose(best_reward, np.max(batch.base_rewards[:, :n], axis=-1), atol=1e-5)
  assert np.unique(np.asarray(batch.base_rewards)).size == 12  # no tie makes the pick ambiguous
