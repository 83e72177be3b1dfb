"""Pure building blocks of the decoder LM, shared by the Flax forward (transformer.py) and the fused decode
step (decode.py): every family difference (Llama vs Gemma style, biases, q/k norms, sliding windows,
soft-capping) and every numeric convention lives here once.

Shapes: R rows (any leading axes), T tokens, D d_model, H heads, Dh head_dim, M mlp_dim, V vocab.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bond_jax.models.config import ModelConfig

NEG_INF = -1e30  # finite, so a score row with nothing to attend to (a left pad) gives no NaN


def pick(flag, if_true, if_false):
  """if_true where flag, else if_false: chosen at trace time for a Python bool (an unrolled layer knows its
  kind), by jnp.where for a traced one (a scanned body of mixed layers reads its kind as a flag)."""
  if isinstance(flag, bool):
    return if_true if flag else if_false
  return jax.tree.map(lambda a, b: jnp.where(flag, a, b), if_true, if_false)


def rope_inverse_frequencies(cfg: ModelConfig, local: bool = False) -> jax.Array:
  """[Dh / 2] rotary inverse frequencies of a full layer, with Llama 3 or linear scaling when configured;
  local: of a sliding layer, which has its own unscaled base when rope_local_theta is set (Gemma 3)."""
  if local and cfg.rope_local_theta is not None:
    return 1.0 / (cfg.rope_local_theta**(jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
  inv_freq = 1.0 / (cfg.rope_theta**(jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
  if cfg.rope_linear_factor is not None:
    inv_freq = inv_freq / cfg.rope_linear_factor
  if cfg.rope_llama3_scaling is None:
    return inv_freq
  factor, low_freq_factor, high_freq_factor, original_context = cfg.rope_llama3_scaling
  wavelength = 2 * math.pi / inv_freq
  long_wavelength = original_context / low_freq_factor
  short_wavelength = original_context / high_freq_factor
  scaled = jnp.where(wavelength > long_wavelength, inv_freq / factor, inv_freq)
  ramp = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - ramp) * scaled / factor + ramp * scaled
  in_between = (wavelength >= short_wavelength) & (wavelength <= long_wavelength)
  return jnp.where(in_between, smoothed, scaled)


def rope_table(positions: jax.Array, inv_freq: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) [*positions.shape, 1, Dh/2] in `dtype`: computed once, shared by every head (and, in the
  decode step, by every layer and step)."""
  angles = positions[..., None, None].astype(jnp.float32) * inv_freq
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Split-half rotary embedding (the Hugging Face layout) of x [..., heads, Dh] with a rope_table."""
  first, second = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def norm_init(cfg: ModelConfig):
  """Initializer of an RMSNorm scale: the identity norm, since Gemma scales by (1 + w) and Llama by w."""
  return nn.initializers.zeros if cfg.gemma_style else nn.initializers.ones


def rms_norm(cfg: ModelConfig, scale: jax.Array, x: jax.Array) -> jax.Array:
  """RMSNorm of x [..., F] with scale [F] (F: D, or Dh for q/k norms), normalised in float32, returned in
  x's dtype."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
  if cfg.gemma_style:  # Gemma scales in float32 by (1 + w), then casts
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
  return scale.astype(x.dtype) * normed.astype(x.dtype)  # Llama casts first, then scales


def gated(cfg: ModelConfig, gate: jax.Array, up: jax.Array) -> jax.Array:
  """The MLP's hidden activation [..., M] from its two input products: GeGLU (tanh GELU) for Gemma,
  SwiGLU for Llama. Runs in the operands' dtype (the decode step passes float32: XLA CPU's bf16 exp is
  slow)."""
  act = jax.nn.gelu(gate, approximate=True) if cfg.gemma_style else jax.nn.silu(gate)
  return act * up


def query_scale(cfg: ModelConfig) -> float:
  """The attention-score scale 1/sqrt(Dh), or query_pre_attn_scalar ** -0.5 when set (the forward
  multiplies scores by it; the decode step folds it into q's weights, which is the same map since RoPE is
  linear, or, after a q norm, multiplies q by it)."""
  return (cfg.head_dim if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar)**-0.5


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap) (Gemma 2's bound on attention scores and logits); x unchanged when cap is None."""
  return x if cap is None else jnp.tanh(x / cap) * cap


def mask_scores(cfg: ModelConfig, scores: jax.Array, attend: jax.Array) -> jax.Array:
  """Scores (float32, scaled) soft-capped when configured, with the slots a query may not read (attend
  False, broadcast against scores) set to NEG_INF: the cap comes first, so a masked slot stays masked."""
  return jnp.where(attend, soft_cap(scores, cfg.attn_softcap), NEG_INF)


def in_window(cfg: ModelConfig, query_slots: jax.Array, key_slots: jax.Array) -> jax.Array:
  """Whether a sliding layer's query at cache slot query_slots may read key_slots (broadcast together):
  the last sliding_window slots, its own included. Slots, not positions: a row's tokens fill consecutive
  slots after its left padding, as in Hugging Face's masks."""
  return query_slots - key_slots < cfg.sliding_window


def embed(cfg: ModelConfig, embedding: jax.Array, tokens: jax.Array) -> jax.Array:
  """Token embeddings [*tokens.shape, D] in the compute dtype, times sqrt(D) for Gemma."""
  x = jnp.take(embedding, tokens, axis=0).astype(cfg.dtype)
  if cfg.gemma_style:
    x = x * jnp.asarray(cfg.d_model**0.5, dtype=cfg.dtype)
  return x


def head_matrix(cfg: ModelConfig, embedding: jax.Array, lm_head: jax.Array | None) -> jax.Array:
  """The LM head [D, V]: the embedding's transpose when tied, else the separate lm_head param."""
  return embedding.T if cfg.tie_embeddings else lm_head


def dense(x: jax.Array, w: jax.Array, spec: str = "rd,df->rf", out_dtype=None) -> jax.Array:
  """A weight product x @ w in the compute dtype, accumulated in float32 and rounded once at the end.

  Asking for the float32 result is what keeps a bfloat16 product bfloat16 on XLA CPU: a bf16 x bf16 -> bf16
  dot is not native there, so XLA widens both operands (the weights too, every step) and runs it in f32,
  ~3-4x slower than the native bf16 x bf16 -> f32 product (AMX/AVX512_BF16). It is also what TPUs and GPUs
  do natively; for float32 it changes nothing. out_dtype: the result's dtype (default x's).
  """
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(out_dtype or x.dtype)
