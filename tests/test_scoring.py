"""Scoring given responses: the join, chunked teacher-forced log-probs (= full logits, = the sampler's own
log-probs), their gradients, reward scores, and input validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax import sampling, scoring
from bond_jax.models import decode, reward, transformer
from bond_jax.models.config import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                  mlp_dim=64, max_seq_len=64)
VOCAB, PAD = 32, 0
BASE = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
            max_seq_len=64)
EOS_IDS = (1, 5, 9, 13)  # several ids: most rows stop early, some run to the limit


def _rows():
  """Left-padded prompts [2, 6] and right-padded responses, mask [2, 3, 5]."""
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, 64, (2, 6)).astype(np.int32)
  prompts[1, :3] = 0  # left padding
  responses = rng.integers(3, 64, (2, 3, 5)).astype(np.int32)
  mask = np.ones_like(responses, bool)
  mask[0, 1, 3:] = False
  responses[~mask] = 0
  return prompts, responses, mask


def _sft_rows():
  """Right-padded rows [3, 11] (L - 1 = 10 predictions) with an attention mask and a loss mask."""
  rng = np.random.default_rng(1)
  lengths = np.array([11, 7, 4])
  attend = np.arange(11)[None] < lengths[:, None]
  tokens = np.where(attend, rng.integers(3, 64, (3, 11)), 0).astype(np.int32)
  loss_mask = attend & (np.arange(11)[None] >= 2)  # the "response": everything after a 2-token prompt
  return jnp.asarray(tokens), jnp.asarray(attend), jnp.asarray(loss_mask)


def _full_logits_logprobs(cfg, params, tokens, attend, temperature=1.0):
  """The unchunked reference: [R, L, V] logits at once, log-softmax, the next token's entry."""
  logp = jax.nn.log_softmax(transformer.forward(cfg, params, tokens, attend)[:, :-1] / temperature, axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


@pytest.fixture(scope="module")
def untied():
  cfg = CFG.replace(tie_embeddings=False)  # the LM head is its own matrix: its gradient is checked too
  return cfg, nn.unbox(transformer.init_boxed(cfg, jax.random.key(0)))


def _params(cfg, seed=0):
  params = nn.unbox(jax.jit(lambda r: transformer.init_boxed(cfg, r))(jax.random.key(seed)))
  # shrink the embedding (tied: also the output layer) so next-token distributions are far from one-hot
  return {**params, "embedding": params["embedding"] * 0.5}


def _prompts(seed, lengths, width):
  mask = np.arange(width)[None] >= (width - np.asarray(lengths))[:, None]
  tokens = np.random.default_rng(seed).integers(2, VOCAB, (len(lengths), width))
  return np.where(mask, tokens, PAD).astype(np.int32), mask


@pytest.fixture(scope="module")
def sampled():
  """(cfg, params, prompts, prompt_mask, samples): temperature 0.8, several EOS ids."""
  cfg = ModelConfig(**BASE)
  params = _params(cfg)
  prompts, mask = _prompts(0, lengths=(7, 3, 10), width=10)
  out = sampling.generate(cfg, params, prompts, mask, jax.random.key(0), num_samples=4, max_new_tokens=12,
                          temperature=0.8, eos_ids=EOS_IDS, pad_id=PAD)
  return cfg, params, prompts, mask, jax.device_get(out)


# ---------------------------------------------------------------------------------------------------------
# The join.


def test_join_keeps_the_prompt_out_of_the_response_mask():
  prompts, responses, mask = _rows()
  rows = scoring.join(jnp.asarray(prompts), jnp.asarray(prompts != 0), jnp.asarray(responses),
                      jnp.asarray(mask))
  tokens, row_mask = rows.tokens, rows.response_mask
  assert tokens.shape == (2, 3, 11)
  np.testing.assert_array_equal(tokens[1, 2, :6], prompts[1])
  np.testing.assert_array_equal(row_mask[:, :, :6], False)
  np.testing.assert_array_equal(row_mask[:, :, 6:], mask)
  np.testing.assert_array_equal(rows.attend_mask[:, :, :6], np.broadcast_to(prompts[:, None] != 0, (2, 3, 6)))
  np.testing.assert_array_equal(rows.attend_mask[:, :, 6:], mask)


# ---------------------------------------------------------------------------------------------------------
# Chunked log-probs equal the full-logits computation, values and gradients.


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_token_logprobs_equal_full_logits(untied, temperature):
  cfg, params = untied
  tokens, attend, loss_mask = _sft_rows()
  expected = np.asarray(_full_logits_logprobs(cfg, params, tokens, attend, temperature))
  for chunk in (1, 3, 4, 10, 128):  # 3 and 4 do not divide the 10 predictions; 128 is one chunk
    fn = jax.jit(
        lambda p, c=chunk: scoring.token_logprobs(cfg, p, tokens, attend, chunk=c, temperature=temperature))
    got = np.asarray(fn(params))
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got[attend[:, 1:]], expected[attend[:, 1:]], atol=1e-5)
    masked = scoring.token_logprobs(cfg, params, tokens, attend, loss_mask, chunk=chunk,
                                    temperature=temperature)
    np.testing.assert_allclose(masked, np.where(loss_mask[:, 1:], got, 0.0), atol=1e-5)  # eager vs jit


def test_chunked_gradients_equal_full_logits_gradients(untied):
  """The SFT loss (mean NLL of the loss-mask tokens) differentiated through the chunks under jax.checkpoint."""
  cfg, params = untied
  tokens, attend, loss_mask = _sft_rows()
  weight = loss_mask[:, 1:]
  mean_nll = lambda logp: -jnp.sum(jnp.where(weight, logp, 0.0)) / jnp.sum(weight)
  expected = jax.jit(jax.grad(lambda p: mean_nll(_full_logits_logprobs(cfg, p, tokens, attend))))(params)
  assert float(jnp.abs(expected["lm_head"]).max()) > 1e-3  # not a comparison of zeros
  for chunk in (3, 4, 128):
    loss = lambda p, c=chunk: mean_nll(scoring.token_logprobs(cfg, p, tokens, attend, loss_mask, chunk=c))
    got = jax.jit(jax.grad(loss))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_chunked_logprobs_equal_the_sampler_teacher_forcing_and_its_gradient():
  params = nn.unbox(transformer.init_boxed(CFG, jax.random.key(0)))
  prompts, responses, mask = _rows()
  _, expected = scoring.sequence_logprobs(CFG, params, prompts, prompts != 0, responses, mask)
  rows = scoring.join(jnp.asarray(prompts), jnp.asarray(prompts != 0), jnp.asarray(responses),
                      jnp.asarray(mask))
  flat = lambda x: x.reshape(6, -1)
  tokens, row_mask = flat(rows.tokens), flat(rows.response_mask)
  for chunk in (3, 128):  # several chunks and one
    fn = jax.jit(scoring.sequence_logprob_fn(CFG, pad_id=0, chunk=chunk))
    got = fn(params, tokens, row_mask).reshape(2, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)

  def grad(chunk):
    fn = scoring.sequence_logprob_fn(CFG, 0, chunk)
    return jax.jit(jax.grad(lambda p: fn(p, tokens, row_mask).sum()))(params)

  grad_small, grad_one = grad(3), grad(128)
  for a, b in zip(jax.tree.leaves(grad_small), jax.tree.leaves(grad_one)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_rows_grouped_by_prompt_share_its_forward_and_score_as_joined_rows():
  """response_width: [B, N, L] rows run each prompt once ([B, L] rows: the LM head on the response only);
  values and gradients equal the plain per-row function's."""
  params = nn.unbox(transformer.init_boxed(CFG, jax.random.key(0)))
  prompts, responses, mask = _rows()
  rows = scoring.join(jnp.asarray(prompts), jnp.asarray(prompts != 0), jnp.asarray(responses),
                      jnp.asarray(mask))
  tokens, row_mask = rows.tokens, rows.response_mask  # [2, 3, 11]
  plain = scoring.sequence_logprob_fn(CFG, 0, chunk=3)
  shared = scoring.sequence_logprob_fn(CFG, 0, chunk=3, response_width=5)
  expected = plain(params, tokens.reshape(6, -1), row_mask.reshape(6, -1)).reshape(2, 3)
  assert np.abs(np.asarray(expected)).min() > 1.0  # not a comparison of zeros
  np.testing.assert_allclose(jax.jit(shared)(params, tokens, row_mask), expected, atol=1e-5)
  np.testing.assert_allclose(jax.jit(shared)(params, tokens[:, 1], row_mask[:, 1]), expected[:, 1], atol=1e-5)
  weights = jnp.asarray([[1.0, -2.0, 0.5], [0.3, 1.5, -1.0]])  # every row's gradient counts differently
  grad = lambda fn, t, m: jax.jit(jax.grad(lambda p: jnp.sum(weights.reshape(t.shape[:-1]) * fn(p, t, m))))(
      params)
  got, want = grad(shared, tokens, row_mask), grad(plain, tokens.reshape(6, -1), row_mask.reshape(6, -1))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    # The shared path sums each prompt's gradient over its 3 responses in one pass, the plain one row by
    # row: f32 rounding differs by ~1e-5 of the leaf's scale (a wrong gradient differs by ~1e-2 of it).
    np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())


def test_sequence_logprobs_equal_full_logits_for_every_chunk():
  params = nn.unbox(transformer.init_boxed(CFG, jax.random.key(0)))
  prompts, responses, mask = _rows()
  rows = scoring.join(prompts, prompts != 0, responses, mask)
  flat = lambda x: x.reshape(6, -1)
  full = _full_logits_logprobs(CFG, params, flat(rows.tokens), flat(rows.attend_mask), 0.7)[:, 5:]
  expected = np.where(mask, np.asarray(full).reshape(2, 3, 5), 0.0)
  for chunk in (1, 2, 5, 128):  # 2 does not divide the T = 5 response positions
    per_token, total = scoring.sequence_logprobs(CFG, params, prompts, prompts != 0, responses, mask,
                                                 temperature=0.7, chunk=chunk)
    np.testing.assert_allclose(per_token, expected, atol=1e-5)
    np.testing.assert_allclose(total, expected.sum(-1), atol=1e-5)


def _kl_by_full_logits(params, ref_params, prompts, responses, mask, eos_ids):
  """The unchunked reference of response_kl: both models' [R, L, V] logits of the joined rows at once."""
  rows = scoring.join(prompts, prompts != 0, responses, mask)
  flat = lambda x: x.reshape(6, -1)
  law = lambda p: np.asarray(
      jax.nn.log_softmax(transformer.forward(CFG, p, flat(rows.tokens), flat(rows.attend_mask)), -1), np.
      float64)[:, 5:-1].reshape(2, 3, 5, -1)  # the positions predicting the 5 response tokens
  lp, lr = law(params), law(ref_params)
  kl = np.sum(np.exp(lp) * (lp - lr), -1)
  stop = np.zeros(CFG.vocab_size, bool)
  stop[list(eos_ids)] = True
  mass = lambda l, where: np.log(np.sum(np.exp(l[..., where]), -1))
  bern = sum(np.exp(mass(lp, w)) * (mass(lp, w) - mass(lr, w)) for w in (stop, ~stop))
  return np.where(mask, kl, 0).sum(-1), np.where(mask, bern, 0).sum(-1)


def test_response_kl_equals_the_full_logits_kl_and_its_stopping_part_for_every_chunk():
  params, ref_params = _params(CFG, 0), _params(CFG, 1)
  prompts, responses, mask = _rows()
  kl, stopping = _kl_by_full_logits(params, ref_params, prompts, responses, mask, (1, 5))
  assert kl.min() > 0.1 and stopping.min() > 0  # two different models: not a comparison of zeros
  for chunk in (1, 2, 16):  # 2 does not divide the T = 5 response positions
    got = scoring.response_kl(CFG, params, ref_params, prompts, prompts != 0, responses, mask, (5, 1), chunk)
    np.testing.assert_allclose(got[0], kl, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], stopping, rtol=1e-4, atol=1e-6)
    _, ref_logprobs = scoring.sequence_logprobs(CFG, ref_params, prompts, prompts != 0, responses, mask)
    np.testing.assert_allclose(got.ref_logprobs, ref_logprobs, atol=1e-5)
  assert np.all(np.asarray(got[1]) < np.asarray(got[0]))  # the word choices cost the rest
  no_eos = scoring.response_kl(CFG, params, ref_params, prompts, prompts != 0, responses, mask)
  np.testing.assert_allclose(no_eos[0], kl, rtol=1e-4, atol=1e-5)
  assert not np.any(np.asarray(no_eos[1]))
  same = scoring.response_kl(CFG, params, params, prompts, prompts != 0, responses, mask, (1, 5))
  assert np.abs(np.asarray(same[:2])).max() < 1e-6


@pytest.mark.parametrize("response_width", [None, 5])
def test_sequence_kl_fn_equals_the_full_logits_kl_and_the_log_probs_and_differentiates_the_kl(response_width):
  """The training path of the per-position KL (kl_estimator "per_position"): joined rows [B, N, L] give
  log pi(y), log ref(y) and sum_t KL_t equal to the unchunked references, grouped by prompt or not, for
  every chunk; its gradient is the full-logits KL's gradient."""
  params, ref_params = _params(CFG, 0), _params(CFG, 1)
  prompts, responses, mask = _rows()
  rows = scoring.join(prompts, prompts != 0, responses, mask)
  kl, _ = _kl_by_full_logits(params, ref_params, prompts, responses, mask, (1, 5))
  logprob = lambda p: scoring.sequence_logprob_fn(CFG, PAD)(p, rows.tokens, rows.response_mask)
  for chunk in (2, 16):
    fn = scoring.sequence_kl_fn(CFG, PAD, chunk=chunk, response_width=response_width)
    got = jax.jit(fn)(params, ref_params, rows.tokens, rows.response_mask)
    np.testing.assert_allclose(got.kl, kl, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.logprobs, logprob(params), atol=1e-5)
    np.testing.assert_allclose(got.ref_logprobs, logprob(ref_params), atol=1e-5)

  def full_kl(p):  # the reference: both models' whole [R, L, V] laws at once, summed on the responses
    flat = lambda x: x.reshape(6, -1)
    law = lambda q: jax.nn.log_softmax(transformer.forward(CFG, q, flat(rows.tokens), flat(rows.attend_mask)),
                                       -1)[:, 5:-1]
    lp, lr = law(p), jax.lax.stop_gradient(law(ref_params))
    return jnp.sum(jnp.where(flat(jnp.asarray(mask)), jnp.sum(jnp.exp(lp) * (lp - lr), -1), 0.0))

  grads = jax.grad(lambda p: jnp.sum(fn(p, ref_params, rows.tokens, rows.response_mask).kl))(params)
  expected = jax.grad(full_kl)(params)
  for got_leaf, leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got_leaf, leaf, atol=1e-4 * float(jnp.max(jnp.abs(leaf))) + 1e-7)


def test_response_kl_along_samples_of_pi_estimates_the_sampled_log_ratio_with_less_variance():
  """E_pi[sum_t KL_t] = E_pi[log pi(y) - log ref(y)]: both estimators of KL(pi || ref) on 4,096 samples of
  one prompt agree within their errors, and the exact per-position one has the smaller spread."""
  cfg = ModelConfig(**BASE)
  params, ref_params = _params(cfg, 0), _params(cfg, 1)
  prompts, mask = np.array([[7, 3, 11, 4]], np.int32), np.ones((1, 4), bool)
  out = sampling.generate(cfg, params, prompts, mask, jax.random.key(3), num_samples=4096, max_new_tokens=6,
                          eos_ids=EOS_IDS, pad_id=PAD)
  _, ref_lp = scoring.sequence_logprobs(cfg, ref_params, prompts, mask, out.tokens, out.mask)
  sampled = np.asarray(jnp.sum(out.model_logprobs, -1) - ref_lp, np.float64).ravel()
  exact, stopping = (
      np.asarray(x, np.float64).ravel()
      for x in scoring.response_kl(cfg, params, ref_params, prompts, mask, out.tokens, out.mask, EOS_IDS)[:2])
  se = lambda x: x.std() / np.sqrt(x.size)
  assert abs(exact.mean() - sampled.mean()) < 4 * np.hypot(se(exact), se(sampled))
  assert exact.std() < 0.5 * sampled.std()
  assert 0 < stopping.mean() < exact.mean()


# ---------------------------------------------------------------------------------------------------------
# Teacher forcing equals the sampler's own log-probs.


def _check_logprobs(cfg, params, prompts, mask, out, temperature):
  per_token, total = scoring.sequence_logprobs(cfg, params, prompts, mask, out.tokens, out.mask)
  assert np.abs(np.asarray(per_token) - np.asarray(out.model_logprobs)).max() <= 1e-5
  np.testing.assert_allclose(np.asarray(total), np.asarray(per_token).sum(-1), atol=1e-5)
  tempered, _ = scoring.sequence_logprobs(cfg, params, prompts, mask, out.tokens, out.mask,
                                          temperature=temperature)
  assert np.abs(np.asarray(tempered) - np.asarray(out.sample_logprobs)).max() <= 1e-5
  assert np.abs(np.asarray(per_token)).max() > 0.5  # not a comparison of zeros


def test_generate_logprobs_equal_teacher_forced_logprobs(sampled):
  _check_logprobs(*sampled, temperature=0.8)


def test_generate_logprobs_equal_teacher_forced_logprobs_gemma_scanned_long():
  cfg = ModelConfig(**BASE, family="gemma", scan_layers=True)
  params = _params(cfg, seed=3)
  prompts, mask = _prompts(3, lengths=(2, 8), width=8)
  out = sampling.generate(cfg, params, prompts, mask, jax.random.key(1), num_samples=2, max_new_tokens=40,
                          temperature=0.8, pad_id=PAD)
  assert decode.chunks(39) == (16, [(0, 16), (16, 32), (32, 39)])
  assert (np.asarray(out.lengths) == 40).all()  # no EOS: every row runs through all 3 chunks, the last partly
  _check_logprobs(cfg, params, prompts, mask, out, temperature=0.8)


@pytest.mark.parametrize("family", ["llama", "gemma"])  # gemma: scanned layers, 3 cache chunks
def test_bfloat16_generate_logprobs_are_close_to_float32_teacher_forced(family):
  cfg = ModelConfig(**BASE, family=family, scan_layers=family == "gemma")
  params = _params(cfg, seed=3)
  prompts, mask = _prompts(0, lengths=(7, 3, 10), width=10)
  out = sampling.generate(cfg.replace(compute_dtype="bfloat16"), params, prompts, mask, jax.random.key(0),
                          num_samples=4, max_new_tokens=40, temperature=0.8, pad_id=PAD)
  per_token, _ = scoring.sequence_logprobs(cfg, params, prompts, mask, out.tokens, out.mask)
  error = np.abs(np.asarray(per_token) - np.asarray(out.model_logprobs))[np.asarray(out.mask)]
  # bf16 rounding gives ~0.004 mean / ~0.02 max here; the same tokens scored out of order give ~0.5 mean
  assert error.mean() < 0.01 and error.max() < 0.1, (error.mean(), error.max())


# ---------------------------------------------------------------------------------------------------------
# Rewards.


def test_rewards_equal_scoring_left_packed_rows(sampled):
  cfg, _, prompts, mask, out = sampled
  rm_params = nn.unbox(jax.jit(lambda r: reward.init_boxed(cfg, r))(jax.random.key(4)))
  rm_params = {**rm_params, "head": jax.random.normal(jax.random.key(5), (cfg.d_model,))}
  rewards = np.asarray(scoring.rewards(cfg, rm_params, prompts, mask, out.tokens, out.mask))
  assert rewards.shape == (3, 4) and np.unique(rewards).size == 12
  width = prompts.shape[1] + out.tokens.shape[2]
  packed = np.zeros((12, width), np.int32)
  packed_mask = np.zeros((12, width), bool)
  for b in range(3):
    for n in range(4):  # the real tokens pushed right: the classic left-padded layout
      real = np.concatenate([prompts[b][mask[b]], out.tokens[b, n][out.mask[b, n]]])
      packed[b * 4 + n, width - len(real):] = real
      packed_mask[b * 4 + n, width - len(real):] = True
  expected = np.asarray(jax.jit(reward.score, static_argnums=0)(cfg, rm_params, packed, packed_mask))
  np.testing.assert_allclose(rewards.reshape(-1), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Validation.


def test_bad_arguments_raise_one_line_errors():
  params = nn.unbox(transformer.init_boxed(CFG, jax.random.key(0)))
  prompts, mask = _prompts(0, lengths=(5, 2, 3), width=5)
  with pytest.raises(ValueError, match=r"temperature=0.0 is not allowed: teacher-forced log-probs need > 0"):
    scoring.sequence_logprobs(CFG, params, prompts, mask, np.zeros((3, 1, 2), np.int32),
                              np.ones((3, 1, 2), bool), temperature=0.0)
  with pytest.raises(ValueError, match=r"chunk=0 is not allowed: need an integer >= 1"):
    scoring.token_logprobs(CFG, params, jnp.asarray(prompts), jnp.asarray(mask), chunk=0)
  with pytest.raises(ValueError, match=r"prompts of width 0 are not allowed"):
    scoring.sequence_logprobs(CFG, params, prompts[:, :0], mask[:, :0], np.zeros((3, 1, 2), np.int32),
                              np.ones((3, 1, 2), bool))
