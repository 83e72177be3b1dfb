"""Exact Best-of-N test of BOND with the REAL transformer policy (bond_jax.models.transformer).

Design (exact, no renormalisation). The model's vocabulary IS the response alphabet: vocab_size = 3, and a
row is [prompt 1, 2 | 3 response tokens], so the 3**3 = 27 enumerated responses are the whole support of
the model's autoregressive law and their probabilities from `scoring.sequence_logprob_fn` sum to 1
exactly (asserted below). The prompt reuses response ids (it is only conditioning). The pad id given to
`sequence_logprob_fn` is vocab_size (3), an id that never occurs, so every position is attended: all
rows have the same length and need no padding.

Rejected alternatives: (1) a vocabulary with extra pad/BOS ids and renormalising over the 27 sequences
changes the log-probs the update step must see by log Z(params); (2) the prompt token as pad masks the
prompt out, leaving the first response position with nothing causal to attend to, so the attention spreads
over FUTURE tokens and the 27 "probabilities" are no distribution; (3) a one-token prompt from the response
alphabet, e.g. [0]: when every visible token is the same id, attention averages identical values (RoPE
moves only queries and keys), so the context [0 | 0] gets the SAME hidden state as [0] and the model
cannot represent pi(y2 | y1 = 0) != pi(y1); training then stalls at KL ~ 0.04 from Best-of-N. Two
distinct prompt tokens make every context contain distinct ids.

Because the law is enumerable, sampling from the policy is done EXACTLY at sequence level (inverse CDF over
the 27 sequence probabilities of the current parameters), which is the same law as token-by-token
ancestral sampling at temperature 1. Training sees only the sampled estimators (M policy samples per
prompt row, k reference samples for the quantiles, the best of N reference samples for the forward term);
the KLs checked at the end are exact sums over the 27 sequences.
"""

import itertools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax import best_of_n
from bond_jax import update as upd
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig
from bond_jax.scoring import sequence_logprob_fn

CFG = ModelConfig(vocab_size=3, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  max_seq_len=8)
PROMPT, PAD_ID = (1, 2), CFG.vocab_size  # the pad id never occurs: every position is attended
RESPONSE_LENGTH = 3
RESPONSES = list(itertools.product(range(CFG.vocab_size), repeat=RESPONSE_LENGTH))
ALL_SEQUENCES = jnp.asarray([(*PROMPT, *response) for response in RESPONSES], jnp.int32)  # [27, 5]
RESPONSE_MASK = jnp.asarray(np.tile([False] * len(PROMPT) + [True] * RESPONSE_LENGTH, (len(RESPONSES), 1)))
NUM_SEQUENCES = ALL_SEQUENCES.shape[0]
LOGPROB_FN = sequence_logprob_fn(CFG, PAD_ID)

# A random init with embeddings of stddev 1 is almost a point mass (entropy ~1e-3 nats over 27 sequences);
# scaling the embedding table by 0.6 gives a spread-out but non-uniform reference law (entropy ~2.95 of a
# maximum log 27 = 3.30, largest sequence probability ~0.10; checked below).
EMBEDDING_SCALE = 0.6
_init = nn.unbox(transformer.init_boxed(CFG, jax.random.key(1)))
REF_PARAMS = dict(_init, embedding=_init["embedding"] * EMBEDDING_SCALE)
REWARDS = jnp.asarray(np.random.default_rng(0).normal(size=NUM_SEQUENCES), jnp.float32)  # distinct

N, BETA = 4, 0.5
PROMPTS, SAMPLES_PER_PROMPT, K_REF = 128, 2, 512
STEPS, LR, WARMUP = 250, 1e-2, 20
TRAIN_SEED = 1


def all_logprobs(params):
  """Exact log pi(y) of the 27 responses, through the same function the update step uses."""
  return LOGPROB_FN(params, ALL_SEQUENCES, RESPONSE_MASK)


def sample_indices(key, logprobs, shape):
  """Exact samples of the enumerated law (inverse CDF over the 27 sequence probabilities)."""
  cdf = jnp.cumsum(jnp.exp(logprobs))
  u = jax.random.uniform(key, shape) * cdf[-1]
  return jnp.minimum(jnp.searchsorted(cdf, u), NUM_SEQUENCES - 1)


def exact_kl(logp, logq):
  return jnp.sum(jnp.exp(logp) * (logp - logq))


REF_LOGPROBS = jax.jit(all_logprobs)(REF_PARAMS)
BON_LOGPROBS = best_of_n.best_of_n_log_density(REF_LOGPROBS, REWARDS, N)


def bond_batch(key, policy_logprobs):
  """M policy samples per prompt row, one pool of k reference samples shared by all rows (they all have
  the same prompt), and the best of N fresh reference samples per row."""
  policy_key, pool_key, best_key = jax.random.split(key, 3)
  policy = sample_indices(policy_key, policy_logprobs, (PROMPTS, SAMPLES_PER_PROMPT))
  pool = jnp.broadcast_to(sample_indices(pool_key, REF_LOGPROBS, (1, K_REF)), (PROMPTS, K_REF))
  candidates = sample_indices(best_key, REF_LOGPROBS, (PROMPTS, N))
  best_index, _ = best_of_n.select_best(REWARDS[candidates])
  best = jnp.take_along_axis(candidates, best_index[:, None], axis=1)[:, 0]
  return upd.BondBatch(policy_tokens=ALL_SEQUENCES[policy], policy_mask=RESPONSE_MASK[policy],
                       policy_rewards=REWARDS[policy], base_rewards=REWARDS[pool],
                       target_tokens=ALL_SEQUENCES[best][:, None], target_mask=RESPONSE_MASK[best][:, None])


def train(seed):
  """STEPS BOND updates (one jitted lax.scan); returns the exact final log pi and the last metrics."""
  optimizer = upd.make_optimizer(
      upd.OptimizerConfig(learning_rate=LR, warmup_steps=WARMUP, schedule="cosine",
                          decay_steps=STEPS - WARMUP, end_lr_fraction=0.02, max_grad_norm=1.0))
  step = upd.make_bond_step(LOGPROB_FN, optimizer, n=N, beta=BETA, donate=False)

  @jax.jit
  def run(key):

    def body(state, key):
      return step(state, REF_PARAMS, bond_batch(key, all_logprobs(state.params)))

    state = upd.init_train_state(jax.tree.map(jnp.copy, REF_PARAMS), optimizer)
    state, metrics = jax.lax.scan(body, state, jax.random.split(key, STEPS))
    return all_logprobs(state.params), jax.tree.map(lambda x: x[-1], metrics), state.skipped_steps

  return run(jax.random.key(seed))


def test_transformer_law_is_exactly_enumerable():
  """The 27 responses carry all the mass of the model's autoregressive law, and pi_ref is not trivial."""
  total = float(jnp.sum(jnp.exp(REF_LOGPROBS)))
  entropy = float(-jnp.sum(jnp.exp(REF_LOGPROBS) * REF_LOGPROBS))
  assert total == pytest.approx(1.0, abs=1e-5)
  assert float(jnp.sum(jnp.exp(BON_LOGPROBS))) == pytest.approx(1.0, abs=1e-5)
  assert 2.5 < entropy < np.log(NUM_SEQUENCES) - 0.2
  assert len(np.unique(np.asarray(REWARDS))) == NUM_SEQUENCES
  # Teacher-forced sequence log-prob = sum of per-token log-softmax of the forward pass (temperature 1).
  logits = transformer.forward(CFG, REF_PARAMS, ALL_SEQUENCES, jnp.ones(ALL_SEQUENCES.shape, bool))
  token_logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ALL_SEQUENCES[:, 1:, None], -1)
  response_logprobs = token_logprobs[:, len(PROMPT) - 1:, 0]  # the tokens after the prompt
  np.testing.assert_allclose(REF_LOGPROBS, jnp.sum(response_logprobs, axis=-1), atol=1e-5)


def test_bond_transformer_matches_exact_best_of_n():
  start = time.perf_counter()
  policy_logprobs, metrics, skipped = train(TRAIN_SEED)
  policy_logprobs = jax.block_until_ready(policy_logprobs)
  seconds = time.perf_counter() - start
  forward = float(exact_kl(BON_LOGPROBS, policy_logprobs))
  backward = float(exact_kl(policy_logprobs, BON_LOGPROBS))
  kl_ref, kl_bon_ref = float(exact_kl(policy_logprobs,
                                      REF_LOGPROBS)), float(exact_kl(BON_LOGPROBS, REF_LOGPROBS))
  start_forward = float(exact_kl(BON_LOGPROBS, REF_LOGPROBS))
  print(f"\ntransformer BOND N={N} beta={BETA} ({STEPS} steps, {PROMPTS}x{SAMPLES_PER_PROMPT} samples, "
        f"k={K_REF}, {seconds:.1f}s incl. compile): KL(BoN||pi)={forward:.4f} (start {start_forward:.4f}) "
        f"KL(pi||BoN)={backward:.4f} KL(pi||ref)={kl_ref:.4f} KL(BoN||ref)={kl_bon_ref:.4f} "
        f"sampled kl_policy_ref={float(metrics['kl_policy_ref']):.4f}")
  assert int(skipped) == 0
  assert float(jnp.sum(jnp.exp(policy_logprobs))) == pytest.approx(1.0, abs=1e-5)
  assert start_forward > 0.2  # the target is far from the starting point
  assert forward < 0.05 and backward < 0.05
  assert abs(kl_ref - kl_bon_ref) < 0.05
