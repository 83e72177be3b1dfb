"""Decoder LM: KV-cache parity with the full forward pass, padding invariance, layouts and dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig

FORWARD = jax.jit(transformer.forward, static_argnums=0)
BASE = dict(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96)


def _params(cfg, seed=0):
  return nn.unbox(jax.device_get(jax.jit(lambda r: transformer.init_boxed(cfg, r))(jax.random.key(seed))))


def _left_padded(seed, lengths, width, vocab=128):
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  mask = np.arange(width)[None] >= (width - lengths)[:, None]
  return np.where(mask, rng.integers(1, vocab, (len(lengths), width)), 0).astype(np.int32), mask


@pytest.mark.parametrize("family,scan", [("llama", False), ("llama", True), ("gemma", False)])
def test_prefill_then_decode_matches_full_forward(family, scan):
  cfg = ModelConfig(**BASE, family=family, scan_layers=scan, tie_embeddings=family == "gemma")
  params = _params(cfg)
  prompt, prompt_mask = _left_padded(0, lengths=(9, 5, 1, 7), width=9)
  continuation = np.random.default_rng(1).integers(1, 128, (4, 6)).astype(np.int32)
  tokens = np.concatenate([prompt, continuation], 1)
  mask = np.concatenate([prompt_mask, np.ones_like(continuation, bool)], 1)
  full = np.asarray(FORWARD(cfg, params, tokens, mask))

  logits, cache = jax.jit(transformer.prefill, static_argnums=(0, 4))(cfg, params, prompt, prompt_mask, 32)
  step = jax.jit(transformer.decode_step, static_argnums=0)
  steps = [np.asarray(logits)]
  for t in range(continuation.shape[1]):
    logits, cache = step(cfg, params, continuation[:, t], cache)
    steps.append(np.asarray(logits)[:, None])
  incremental = np.concatenate(steps, 1)
  assert int(cache["index"]) == 9 + 6
  diff = np.abs(incremental - full)[mask].max()
  assert diff <= 1e-5, diff
  assert np.abs(full[mask]).max() > 0.1


def test_logits_do_not_depend_on_left_padding_or_batch_mates():
  cfg = ModelConfig(**BASE)
  params = _params(cfg)
  tokens, mask = _left_padded(2, lengths=(6, 3, 8), width=8)
  batched = np.asarray(FORWARD(cfg, params, tokens, mask))
  for row in range(3):
    alone = tokens[row][mask[row]][None]
    single = np.asarray(FORWARD(cfg, params, alone, np.ones_like(alone, bool)))
    np.testing.assert_allclose(batched[row][mask[row]], single[0], atol=1e-5)


def test_scan_and_remat_give_the_same_logits_and_gradients():
  base = ModelConfig(**BASE)
  params = _params(base)
  scanned = {
      "embedding": params["embedding"],
      "final_norm": params["final_norm"],
      "layers": {
          "block": jax.tree.map(lambda *x: jnp.stack(x), params["layer_0"], params["layer_1"])
      }
  }
  tokens, mask = _left_padded(3, lengths=(5, 8), width=8)

  def loss(cfg, p):
    return jnp.mean(transformer.forward(cfg, p, tokens, mask)[mask]**2)

  ref_loss, ref_grad = jax.value_and_grad(lambda p: loss(base, p))(params)
  for cfg, p in ((base.replace(remat=True), params), (base.replace(scan_layers=True, remat=True), scanned)):
    value, grad = jax.value_and_grad(lambda q: loss(cfg, q))(p)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
    if cfg.scan_layers:
      grad = {
          "embedding": grad["embedding"],
          "final_norm": grad["final_norm"],
          **{
              f"layer_{i}": jax.tree.map(lambda x: x[i], grad["layers"]["block"]) for i in range(2)
          }
      }
    for a, b in zip(jax.tree.leaves(ref_grad), jax.tree.leaves(grad)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_tracks_float32():
  cfg = ModelConfig(**BASE)
  params = _params(cfg)
  tokens, mask = _left_padded(4, lengths=(8, 4), width=8)
  f32 = np.asarray(FORWARD(cfg, params, tokens, mask))
  bf16 = np.asarray(FORWARD(cfg.replace(compute_dtype="bfloat16"), params, tokens, mask))
  assert bf16.dtype == np.float32  # logits come back in float32 whatever the compute dtype
  rel = np.abs(bf16 - f32)[mask].max() / np.abs(f32[mask]).max()
  assert 0 < rel < 0.05, rel


def test_positions_count_real_tokens_only():
  mask = np.array([[False, False, True, True, True], [True, True, True, True, True]])
  np.testing.assert_array_equal(transformer.positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


@pytest.mark.parametrize("field,value,message", [
    ("family", "gpt2", r"model family 'gpt2' is not supported; allowed: llama, gemma"),
    ("num_kv_heads", 3, r"num_heads=4 must be a multiple of num_kv_heads=3"),
    ("compute_dtype", "int8", r"compute_dtype='int8' is not supported"),
])
def test_bad_model_config_is_rejected(field, value, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**{**BASE, field: value})


def test_prompt_longer_than_cache_is_rejected():
  cfg = ModelConfig(**BASE)
  tokens, mask = _left_padded(0, lengths=(10,), width=10)
  with pytest.raises(ValueError, match="prompt length 10 exceeds the cache length 8"):
    transformer.prefill(cfg, _params(cfg), tokens, mask, 8)
