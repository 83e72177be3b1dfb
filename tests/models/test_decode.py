"""The sampler's fused decode step (models/decode.py) pinned to the full forward pass at every step:
left-padded prompts of different lengths, N samples sharing each prompt's cache, several cache chunks."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax.models import decode, presets, transformer
from bond_jax.models.config import ModelConfig

SMALL = dict(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96,
             max_seq_len=128)
LLAMA3 = (8.0, 1.0, 4.0, 32)  # a short original context: scaled, ramped and unscaled frequencies all occur
PROMPT_LENGTHS, WIDTH = (7, 2, 11), 16
QWEN2 = dict(SMALL, family="qwen2", qkv_bias=True, tie_embeddings=False)
QWEN3 = dict(SMALL, family="qwen3", qk_norm=True, head_dim=24)
GEMMA2 = dict(SMALL, family="gemma2", head_dim=24, sliding_window=5, query_pre_attn_scalar=16.0,
              attn_softcap=1.0, final_softcap=3.0, layer_types=("sliding_attention", "full_attention"))
GEMMA3 = dict(SMALL, family="gemma3", num_layers=3, qk_norm=True, sliding_window=5,
              query_pre_attn_scalar=16.0,
              layer_types=("sliding_attention", "sliding_attention", "full_attention"), rope_theta=1e6,
              rope_local_theta=1e4, rope_linear_factor=8.0)
FORWARD = jax.jit(transformer.forward, static_argnums=0)

# name: (config, fuse, N samples per prompt, T tokens per row: T - 1 decode steps)
CASES = {
    "llama": (ModelConfig(**SMALL), True, 2, 40),
    "llama_untied_scanned": (ModelConfig(**SMALL, tie_embeddings=False, scan_layers=True), True, 3, 40),
    "gemma": (ModelConfig(**SMALL, family="gemma"), True, 2, 40),
    "gemma_scanned": (ModelConfig(**SMALL, family="gemma", scan_layers=True), True, 2, 20),
    "llama3_rope": (ModelConfig(**SMALL, rope_theta=500_000.0, rope_llama3_scaling=LLAMA3), True, 2, 20),
    "micro_unfused": (presets.get("micro"), False, 2, 20),  # the layout used when heads are sharded
    # Windows shorter than the prompts (5) and crossed during decode (20 > WIDTH = 16), mixed layers scanned
    "qwen2": (ModelConfig(**QWEN2), True, 2, 20),
    "qwen2_unfused": (ModelConfig(**QWEN2), False, 1, 20),
    "qwen3": (ModelConfig(**QWEN3), True, 2, 20),
    "qwen3_unfused_scanned": (ModelConfig(**QWEN3, scan_layers=True), False, 1, 20),
    "mistral": (ModelConfig(**SMALL, family="mistral", sliding_window=5), True, 2, 40),
    "mistral_window_20": (ModelConfig(**SMALL, family="mistral", sliding_window=20), True, 1, 40),
    "gemma2": (ModelConfig(**GEMMA2), True, 2, 40),
    "gemma2_scanned": (ModelConfig(**GEMMA2, scan_layers=True), True, 1, 20),
    "gemma3": (ModelConfig(**GEMMA3), True, 2, 40),
    "gemma3_scanned_unfused": (ModelConfig(**GEMMA3, scan_layers=True), False, 1, 20),
    "tiny": (presets.get("tiny"), True, 2, 20),
    "tiny_scanned": (presets.get("tiny", scan_layers=True), True, 1, 20),
}


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _decode_logits(cfg, params, prompts, prompt_mask, fed, num_samples, fuse):
  """Prefill, then feed fed [R, T - 1] one token per step as sampling's chunk loop does (a scan per
  chunk instead of its early-stopping while loop) -> logits [R, T, V] of every step, prefill's first."""
  rows, steps = fed.shape[0], fed.shape[1] + 1
  params = decode.cast_weights(params, cfg.dtype)
  first, prompt_cache = decode.prefill(cfg, params, prompts, prompt_mask)
  weights = decode.decode_weights(cfg, params, fuse)
  rope = decode.rope_by_position(cfg, prompts.shape[1] + steps)
  row_lengths = jnp.repeat(jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32), num_samples)
  slots, spans = decode.chunks(steps - 1)
  finished, out = [], [jnp.repeat(first, num_samples, axis=0)[:, None]]
  for start, stop in spans:

    def body(block, step, start=start, earlier=list(finished)):
      logits, block = decode.step(cfg, weights, rope, prompt_cache, earlier, block, fed[:, step - 1],
                                  row_lengths + step - 1, step - 1 - start, num_samples)
      return block, logits

    block, logits = jax.lax.scan(body, decode.empty_block(cfg, rows, slots), jnp.arange(start + 1, stop + 1))
    finished.append(block)
    out.append(logits.swapaxes(0, 1))
  return jnp.concatenate(out, axis=1)


def _inputs(cfg, num_samples, length, seed=0):
  """Left-padded prompts [B, P] and their mask, and the tokens fed [R, T - 1] (a different row per sample)."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(PROMPT_LENGTHS)
  mask = np.arange(WIDTH)[None] >= (WIDTH - lengths)[:, None]
  prompts = np.where(mask, rng.integers(1, cfg.vocab_size, mask.shape), 0).astype(np.int32)
  fed = rng.integers(1, cfg.vocab_size, (len(lengths) * num_samples, length - 1)).astype(np.int32)
  return prompts, mask, fed


def decode_vs_forward(name):
  """(max |decode - forward| over every row and step, max |forward|, number of cache chunks crossed)."""
  cfg, fuse, num_samples, length = CASES[name]
  params = nn.unbox(jax.jit(lambda r: transformer.init_boxed(cfg, r))(jax.random.key(0)))
  # biases start at 0 and norms at identity: perturb them so a step that drops or misplaces one shows
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.2 * jax.random.normal(jax.random.key(len(jax.tree_util.keystr(p))), x.shape)
      if re.search("norm|bias", jax.tree_util.keystr(p)) else x, params)
  prompts, mask, fed = _inputs(cfg, num_samples, length)
  decoded = np.asarray(_decode_logits(cfg, params, prompts, mask, fed, num_samples, fuse))
  rows = np.concatenate([np.repeat(prompts, num_samples, 0), fed], 1)
  row_mask = np.concatenate([np.repeat(mask, num_samples, 0), np.ones_like(fed, bool)], 1)
  full = np.asarray(FORWARD(cfg, params, rows, row_mask))[:, WIDTH - 1:]  # the logits of tokens P..P+T-1
  assert decoded.shape == full.shape == (len(PROMPT_LENGTHS) * num_samples, length, cfg.vocab_size)
  return np.abs(decoded - full).max(), np.abs(full).max(), len(decode.chunks(length - 1)[1])


@pytest.mark.parametrize("name", list(CASES))
def test_every_decode_step_matches_the_full_forward(name):
  diff, scale, num_chunks = decode_vs_forward(name)
  assert diff <= 1e-5, diff
  assert scale > 0.1  # the logits are not all ~0 (which any step would match)
  assert num_chunks >= 2  # the generated cache spans several blocks


def test_decode_weights_fold_the_score_scale_and_fuse_the_products():
  cfg = ModelConfig(**SMALL, tie_embeddings=False)
  params = nn.unbox(jax.jit(lambda r: transformer.init_boxed(cfg, r))(jax.random.key(1)))
  fused = decode.decode_weights(cfg, params, fuse=True)
  attn, mlp = params["layer_1"]["attn"], params["layer_1"]["mlp"]
  qkv = fused.layers[1]["attn"]["qkv"]
  assert qkv.shape == (64, (4 + 2 * 2) * 16) and fused.layers[1]["mlp"]["gate_up"].shape == (64, 2 * 96)
  np.testing.assert_array_equal(qkv[:, :64], attn["q"].reshape(64, -1) * 16**-0.5)
  np.testing.assert_array_equal(fused.layers[1]["mlp"]["gate_up"][:, 96:], mlp["up"])
  np.testing.assert_array_equal(fused.head, params["lm_head"])
  unfused = decode.decode_weights(cfg, params, fuse=False)
  assert set(unfused.layers[0]["attn"]) == {"q", "k", "v", "o"}
