"""Update batches from sampled rows: scoring's join, scoring's rewards, and the Best-of-n pick.

The join and the chunked log-probs themselves are tested in test_scoring.py.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
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
  best_tokens, best_mask = np.asarray(batch.target_tokens[:, 0]), np.asarray(batch.target_mask[:, 0])
  best_reward = reward.score(CFG, rm_params, best_tokens, (best_tokens != PAD) | best_mask)
  np.testing.assert_allclose(best_reward, np.max(batch.base_rewards[:, :n], axis=-1), atol=1e-5)
  assert np.unique(np.asarray(batch.base_rewards)).size == 12  # no tie makes the pick ambiguous
  # all_k: the targets are every base sample, in base_rewards' order (the same key draws the same ones).
  all_k, _ = rollout.bond(frozen, params, params, prompts, prompt_mask, jax.random.key(3), 5, n=n, k=4,
                          num_policy_samples=2, forward_estimator="all_k")
  np.testing.assert_array_equal(all_k.base_rewards, batch.base_rewards)
  targets, target_mask = np.asarray(all_k.target_tokens), np.asarray(all_k.target_mask)
  assert targets.shape == target_mask.shape == (3, 4, 11)
  target_rewards = reward.score(CFG, rm_params, targets.reshape(12, 11),
                                ((targets != PAD) | target_mask).reshape(12, 11))
  np.testing.assert_allclose(target_rewards.reshape(3, 4), all_k.base_rewards, atol=1e-5)
  picked = np.take_along_axis(targets, np.argmax(np.asarray(batch.base_rewards)[:, :n], -1)[:, None, None], 1)
  np.testing.assert_array_equal(picked[:, 0], best_tokens)


@jax.jit
def _late(prompts):
  """prompts, ready only after ~0.5 s of matmuls (a value nothing should wait for)."""
  x = jax.lax.fori_loop(0, 1500, lambda i, x: jnp.tanh(x @ x), jnp.full((256, 256), 1e-3))
  return prompts + (x[0, 0] > 1e9).astype(prompts.dtype)  # + 0, known only when the loop is done


def test_a_jbond_step_waits_on_nothing_and_compiles_once():
  """After the first step, the rollout, the update and the step's logged stats are all dispatched before
  their input prompts even exist (nothing is read back from the device in between), and nothing compiles."""
  from bond_jax import update
  from bond_jax.stages import distill
  params = nn.unbox(transformer.init_boxed(CFG, jax.random.key(0)))
  rm_params = nn.unbox(reward.init_boxed(CFG, jax.random.key(1)))
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  frozen = FrozenModels(policy_cfg=CFG, reference_params=params, reward_cfg=CFG, reward_params=rm_params,
                        eos_ids=(1,), pad_id=PAD, mesh=mesh)
  host_prompts = np.random.default_rng(0).integers(3, 64, (2, 6)).astype(np.int32)
  prompts, prompt_mask = jax.device_put((host_prompts, np.ones_like(host_prompts, bool)))
  optimizer = update.make_optimizer(update.OptimizerConfig(learning_rate=1e-3))
  state = update.new_state(jax.tree.map(np.copy, params), optimizer, mesh, params)  # the step donates it
  step = update.make_jbond_step(scoring.sequence_logprob_fn(CFG, PAD, response_width=5), optimizer, mesh=mesh,
                                state_sharding=sharding.shardings_of(state),
                                ref_sharding=sharding.shardings_of(params))

  def run(state, prompts, seed):
    batch, stats = rollout.jbond(frozen, state.params, state.anchor_params, prompts, prompt_mask,
                                 jax.random.key(seed), 5)
    state, metrics = step(state, params, batch)
    return state, metrics, distill._step_stats(stats.response_lengths, batch)

  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *_, **__: compiles.append(event) if event.endswith("backend_compile_duration") else None)
  with jax.set_mesh(mesh):
    state, _, _ = jax.block_until_ready(run(state, _late(prompts), 0))
    first = len(compiles)
    began = time.perf_counter()
    jax.block_until_ready(_late(prompts))
    late = time.perf_counter() - began
    began = time.perf_counter()
    out = run(state, _late(prompts), 1)
    dispatched = time.perf_counter() - began
    state, metrics, stats = jax.block_until_ready(out)
  assert first > 0 and len(compiles) == first
  assert dispatched < 0.5 * late, (dispatched, late)  # a read-back would wait for the prompts
  assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
  assert 0 < float(stats["tokens"]) <= 2 * 3 * 5  # 2 prompts x 3 samples of <= 5 tokens
