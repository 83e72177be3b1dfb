"""Rows for the update step: joined prompt + response and the chunked teacher-forced log-probs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bond_jax import rollout, sampling
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
                  max_seq_len=64)


def _rows():
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, 64, (2, 6)).astype(np.int32)
  prompts[1, :3] = 0  # left padding
  responses = rng.integers(3, 64, (2, 3, 5)).astype(np.int32)
  mask = np.ones_like(responses, bool)
  mask[0, 1, 3:] = False
  responses[~mask] = 0
  return prompts, responses, mask


def test_join_keeps_the_prompt_out_of_the_response_mask():
  prompts, responses, mask = _rows()
  tokens, row_mask = rollout.join(jnp.asarray(prompts), jnp.asarray(responses), jnp.asarray(mask))
  assert tokens.shape == (2, 3, 11)
  np.testing.assert_array_equal(tokens[1, 2, :6], prompts[1])
  np.testing.assert_array_equal(row_mask[:, :, :6], False)
  np.testing.assert_array_equal(row_mask[:, :, 6:], mask)


def test_chunked_logprobs_equal_the_sampler_teacher_forcing_and_its_gradient():
  params = nn.unbox(transformer.init_boxed(CFG, jax.random.key(0)))
  prompts, responses, mask = _rows()
  _, expected = sampling.sequence_logprobs(CFG, params, prompts, prompts != 0, responses, mask)
  tokens, row_mask = rollout.join(jnp.asarray(prompts), jnp.asarray(responses), jnp.asarray(mask))
  flat = lambda x: x.reshape(6, -1)
  for chunk in (3, 128):  # several chunks and one
    fn = jax.jit(rollout.transformer_logprob_fn(CFG, pad_id=0, chunk=chunk))
    got = fn(params, flat(tokens), flat(row_mask)).reshape(2, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)
  def grad(chunk):
    fn = rollout.transformer_logprob_fn(CFG, 0, chunk)
    return jax.jit(jax.grad(lambda p: fn(p, flat(tokens), flat(row_mask)).sum()))(params)

  grad_small, grad_one = grad(3), grad(128)
  for a, b in zip(jax.tree.leaves(grad_small), jax.tree.leaves(grad_one)):
    np.testing.assert_allclose(a, b, atol=1e-5)
