"""Reward model: the head reads the last real token; padding does not change a score."""

import flax.linen as nn
import jax
import numpy as np

from bond_jax.models import reward, transformer
from bond_jax.models.config import ModelConfig

SCORE = jax.jit(reward.score, static_argnums=0)
CFG = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  mlp_dim=96, tie_embeddings=False)


def _params():
  params = nn.unbox(reward.init_boxed(CFG, jax.random.key(0)))
  return {**params, "head": jax.random.normal(jax.random.key(1), params["head"].shape)}


def test_last_real_index_is_rightmost_true():
  mask = np.array([[False, True, True, False], [True, False, False, False], [False] * 4])
  np.testing.assert_array_equal(reward.last_real_index(mask), [2, 0, 0])


def test_score_is_head_at_last_real_token_and_padding_invariant():
  params = _params()
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 128, (2, 7)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  mask[1, :3] = False
  tokens[1, :3] = 0
  scores = np.asarray(SCORE(CFG, params, tokens, mask))
  hidden, _ = transformer.Transformer(CFG,
                                      with_lm_head=False).apply({"params": params["backbone"]}, tokens, mask,
                                                                method=transformer.Transformer.hidden)
  np.testing.assert_allclose(scores, np.asarray(hidden[:, -1] @ params["head"]), rtol=1e-5)
  alone = tokens[1:, 3:]
  np.testing.assert_allclose(SCORE(CFG, params, alone, np.ones_like(alone, bool))[0], scores[1], atol=1e-5)
  assert "lm_head" not in params["backbone"]


def test_from_policy_copies_the_backbone():
  policy = nn.unbox(transformer.init_boxed(CFG, jax.random.key(7)))
  merged = reward.from_policy(policy, _params())
  assert set(merged["backbone"]) == set(policy) - {"lm_head"}
  np.testing.assert_array_equal(merged["backbone"]["embedding"], policy["embedding"])
