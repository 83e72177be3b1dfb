"""Decoder-only LM (Llama, Qwen, Mistral and Gemma families) as Flax Linen modules, with a KV cache.

Shapes: B batch rows, T tokens in this call, S cache slots, D d_model, H query heads, K kv heads,
Dh head_dim, V vocab.

Padding: batches are LEFT-padded. `token_mask` [B, T] is True on real tokens; a row's positions count its
real tokens only (positions_from_mask), so a prompt's logits do not depend on how much padding precedes it.
Pad tokens are never attended to; their own outputs are garbage and must be ignored by callers.

KV cache (init_cache): {'k','v': [L, B, S, K, Dh], 'valid': [B, S] bool, 'index': int32 []}. A call
with a cache writes its T tokens at slots [index, index + T) and attends to every valid slot up to its
own (a sliding layer: only the last sliding_window slots of those). Prefill = one call with the whole
prompt; decode = calls with T = 1.

The math of a block (RMSNorm, RoPE, the MLP activation, the score scale and mask, the embedding, the LM
head) is layers.py's, shared with the sampler's fused one-token decode step (decode.py), so a family or
architecture difference is written once.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bond_jax.models import layers, lora
from bond_jax.models.config import ModelConfig
from bond_jax.sharding import constrain

Cache = dict[str, jax.Array]
_HEADS = {"q": "heads", "k": "kv_heads", "v": "kv_heads"}  # the logical axis of each projection's heads


def _param(module: nn.Module, name: str, init, shape, names, dtype):
  return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def _adapted(module: nn.Module, name: str, x: jax.Array, out: jax.Array) -> jax.Array:
  """out (x's product with the `name` weight) plus its LoRA product where the params tree carries one
  (models/lora.py: a tree without adapters, such as pi_ref's, compiles to the base's graph)."""
  if not module.has_variable("params", name + lora.SUFFIX_A):
    return out
  a, b = (module.get_variable("params", name + suffix) for suffix in (lora.SUFFIX_A, lora.SUFFIX_B))
  return out + lora.low_rank(x, a, b, lora.TARGETS[name][1], out.dtype)


def positions_from_mask(token_mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
  """[B, T] positions: the number of real tokens before each one (+ offset [B] or scalar); pads get 0."""
  positions = jnp.cumsum(token_mask.astype(jnp.int32), axis=-1) - 1 + jnp.asarray(offset)[..., None]
  return jnp.where(token_mask, positions, 0)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding of x [B, T, heads, Dh] at positions [B, T]."""
  return layers.rotate(x, *layers.rope_table(positions, inv_freq, x.dtype))


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    scale = _param(self, "scale", layers.norm_init(self.cfg), (self.cfg.d_model,), ("embed",),
                   self.cfg.params_dtype)
    return layers.rms_norm(self.cfg, scale, x)


class Attention(nn.Module):
  cfg: ModelConfig

  def _project(self, x, name, heads, init):
    """x [B, T, D] -> [B, T, heads, Dh]: the `name` projection, plus its bias when the config has them."""
    cfg = self.cfg
    w = _param(self, name, init, (cfg.d_model, heads, cfg.head_dim), ("embed", _HEADS[name], "head_dim"),
               cfg.params_dtype)
    out = _adapted(self, name, x, jnp.einsum("btd,dhk->bthk", x, w.astype(cfg.dtype)))
    if cfg.qkv_bias:
      bias = _param(self, f"{name}_bias", nn.initializers.zeros, (heads, cfg.head_dim),
                    (_HEADS[name], "head_dim"), cfg.params_dtype)
      out = out + bias.astype(cfg.dtype)
    if cfg.qk_norm and name != "v":
      scale = _param(self, f"{name}_norm", layers.norm_init(cfg), (cfg.head_dim,), ("head_dim",),
                     cfg.params_dtype)
      out = layers.rms_norm(cfg, scale, out)
    return out

  @nn.compact
  def __call__(self, x, positions, attend, layer_cache, sliding=False):
    """x [B, T, D]; attend (full, window or None) [B, T, S]: see Transformer; layer_cache None or (k, v)
    [B, S, K, Dh]; sliding: whether this layer reads the window (a bool, or a traced one when scanned)."""
    cfg, dt = self.cfg, self.cfg.dtype
    init = nn.initializers.normal(stddev=cfg.d_model**-0.5)
    inv_freq = layers.rope_inverse_frequencies(cfg)
    if cfg.rope_local_theta is not None:
      inv_freq = layers.pick(sliding, layers.rope_inverse_frequencies(cfg, local=True), inv_freq)
    q = apply_rope(self._project(x, "q", cfg.num_heads, init), positions, inv_freq)
    k = apply_rope(self._project(x, "k", cfg.num_kv_heads, init), positions, inv_freq)
    v = self._project(x, "v", cfg.num_kv_heads, init)
    wo = _param(self, "o", nn.initializers.normal(stddev=(cfg.num_heads * cfg.head_dim)**-0.5),
                (cfg.num_heads, cfg.head_dim, cfg.d_model), ("heads", "head_dim", "embed"), cfg.params_dtype)
    q = constrain(q, ("act_batch", "act_length", "act_heads", None))
    if layer_cache is not None:
      cache_k, cache_v, index = layer_cache
      k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
      new_cache = (k, v)
    else:
      new_cache = None
    batch, length = q.shape[:2]
    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(dt)).astype(jnp.float32) * layers.query_scale(cfg)
    attend = attend[0] if attend[1] is None else layers.pick(sliding, attend[1], attend[0])
    scores = layers.mask_scores(cfg, scores, attend[:, None, None, :, :])
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(dt)).reshape(batch, length, cfg.num_heads,
                                                                       cfg.head_dim)
    out = _adapted(self, "o", out, jnp.einsum("bthk,hkd->btd", out, wo.astype(dt)))
    return constrain(out, ("act_batch", "act_length", "act_embed")), new_cache


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.cfg, self.cfg.dtype
    init_in = nn.initializers.normal(stddev=cfg.d_model**-0.5)
    gate = _param(self, "gate", init_in, (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), cfg.params_dtype)
    up = _param(self, "up", init_in, (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), cfg.params_dtype)
    down = _param(self, "down", nn.initializers.normal(stddev=cfg.mlp_dim**-0.5), (cfg.mlp_dim, cfg.d_model),
                  ("mlp", "embed"), cfg.params_dtype)
    h = layers.gated(cfg, _adapted(self, "gate", x, x @ gate.astype(dt)),
                     _adapted(self, "up", x, x @ up.astype(dt)))
    h = constrain(h, ("act_batch", "act_length", "act_mlp"))
    return _adapted(self, "down", h, h @ down.astype(dt))


class Block(nn.Module):
  """Pre-norm residual block (Gemma 2/3: the attention's and the MLP's outputs normed too, by attn_post_norm
  and mlp_post_norm). Returns (x, new layer cache); scan-compatible signature."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, attend, layer_cache, sliding=False):
    cfg = self.cfg
    h, new_cache = Attention(cfg, name="attn")(RMSNorm(cfg, name="attn_norm")(x), positions, attend,
                                               layer_cache, sliding)
    x = x + (RMSNorm(cfg, name="attn_post_norm")(h) if cfg.sandwich_norms else h)
    h = Mlp(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x))
    x = x + (RMSNorm(cfg, name="mlp_post_norm")(h) if cfg.sandwich_norms else h)
    return constrain(x, ("act_batch", "act_length", "act_embed")), new_cache


class _ScanBlock(nn.Module):
  """Block with (carry, xs) -> (carry, ys) for nn.scan; the cache is scanned over its layer axis."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, layer_cache, sliding, positions, attend, index):
    """sliding: this layer's scanned flag [] when the layers are mixed, else None (all alike)."""
    block = nn.remat(Block, prevent_cse=False)(self.cfg, name="block") if self.cfg.remat else \
        Block(self.cfg, name="block")
    cache_in = None if layer_cache is None else (layer_cache[0], layer_cache[1], index)
    return block(x, positions, attend, cache_in, self.cfg.sliding_layers[0] if sliding is None else sliding)


class Transformer(nn.Module):
  """The LM. __call__ gives logits; `hidden` gives final-norm states (what the reward head reads)."""
  cfg: ModelConfig
  with_lm_head: bool = True  # False for the reward model's backbone (no untied output matrix)

  def setup(self):
    cfg = self.cfg
    # 1/sqrt(D): unit-scale rows after Gemma's sqrt(D) multiplier, and modest logits when tied.
    self.embedding = _param(self, "embedding", nn.initializers.normal(stddev=cfg.d_model**-0.5),
                            (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.params_dtype)
    if cfg.scan_layers:
      self.layers = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    else:
      block_cls = nn.remat(Block) if cfg.remat else Block
      self.blocks = [block_cls(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg)
    if self.with_lm_head and not cfg.tie_embeddings:
      self.lm_head = _param(self, "lm_head", nn.initializers.normal(stddev=cfg.d_model**-0.5),
                            (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.params_dtype)

  def hidden(self, tokens: jax.Array, token_mask: jax.Array, cache: Cache | None = None):
    """tokens, token_mask [B, T] -> (hidden [B, T, D] after the final norm, new cache or None)."""
    cfg = self.cfg
    x = constrain(layers.embed(cfg, self.embedding, tokens), ("act_batch", "act_length", "act_embed"))
    length = tokens.shape[1]
    if cache is None:
      positions = positions_from_mask(token_mask)
      causal = jnp.tril(jnp.ones((length, length), bool))
      attend = causal[None] & token_mask[:, None, :]  # [B, T, T]: query t may read key s
      index = None
      slots = lambda: (jnp.arange(length)[:, None], jnp.arange(length)[None, :])  # (query [T, 1], key [1, T])
    else:
      index = cache["index"]
      positions = positions_from_mask(token_mask, jnp.sum(cache["valid"], axis=-1))
      valid = jax.lax.dynamic_update_slice(cache["valid"], token_mask, (0, index))
      key_slots = jnp.arange(valid.shape[1])[None, :]  # [1, S]
      query_slots = (index + jnp.arange(length))[:, None]  # [T, 1]
      attend = (key_slots <= query_slots)[None] & valid[:, None, :]  # [B, T, S]
      slots = lambda: (query_slots, key_slots)
    window = None if cfg.sliding_window is None else attend & layers.in_window(cfg, *slots())
    attend = (attend, window)
    if cfg.scan_layers:
      layer_caches = None if cache is None else (cache["k"], cache["v"])
      sliding = jnp.asarray(cfg.sliding_layers) if cfg.mixed_layers else None
      x, new_kv = self.layers(x, layer_caches, sliding, positions, attend, index)
    else:
      new_k, new_v = [], []
      for i, block in enumerate(self.blocks):
        layer_cache = None if cache is None else (cache["k"][i], cache["v"][i], index)
        x, kv = block(x, positions, attend, layer_cache, cfg.sliding_layers[i])
        if kv is not None:
          new_k.append(kv[0])
          new_v.append(kv[1])
      new_kv = (jnp.stack(new_k), jnp.stack(new_v)) if cache is not None else None
    x = self.final_norm(x)
    if cache is None:
      return x, None
    return x, {"k": new_kv[0], "v": new_kv[1], "valid": valid, "index": index + length}

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [B, T, D] -> float32 logits [B, T, V]."""
    head = layers.head_matrix(self.cfg, self.embedding, getattr(self, "lm_head", None))
    logits = layers.soft_cap((hidden @ head.astype(self.cfg.dtype)).astype(jnp.float32),
                             self.cfg.final_softcap)
    return constrain(logits, ("act_batch", "act_length", "act_vocab"))

  def __call__(self, tokens: jax.Array, token_mask: jax.Array, cache: Cache | None = None):
    """tokens, token_mask [B, T] -> (logits [B, T, V] float32, new cache or None)."""
    hidden, cache = self.hidden(tokens, token_mask, cache)
    return self.logits(hidden), cache


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
  """An empty cache of `length` slots for `batch` rows (dtype defaults to the compute dtype)."""
  dtype = cfg.dtype if dtype is None else dtype
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  return {
      "k": jnp.zeros(shape, dtype),
      "v": jnp.zeros(shape, dtype),
      "valid": jnp.zeros((batch, length), bool),
      "index": jnp.zeros((), jnp.int32)
  }


def forward(cfg: ModelConfig, params: Any, tokens: jax.Array, token_mask: jax.Array) -> jax.Array:
  """Full forward pass: logits [B, T, V] float32 for left-padded tokens [B, T]."""
  return Transformer(cfg).apply({"params": params}, tokens, token_mask)[0]


def prefill(cfg: ModelConfig, params: Any, tokens: jax.Array, token_mask: jax.Array,
            cache_length: int) -> tuple[jax.Array, Cache]:
  """Run a left-padded prompt [B, P] into a fresh cache of cache_length slots: (logits [B, P, V], cache)."""
  if tokens.shape[1] > cache_length:
    raise ValueError(f"prompt length {tokens.shape[1]} exceeds the cache length {cache_length}")
  cache = init_cache(cfg, tokens.shape[0], cache_length)
  return Transformer(cfg).apply({"params": params}, tokens, token_mask, cache)


def decode_step(cfg: ModelConfig, params: Any, token: jax.Array, cache: Cache,
                token_mask: jax.Array | None = None) -> tuple[jax.Array, Cache]:
  """One token per row, token [B] -> (logits [B, V], cache). token_mask [B] (default all True)."""
  token_mask = jnp.ones(token.shape, bool) if token_mask is None else token_mask
  logits, cache = Transformer(cfg).apply({"params": params}, token[:, None], token_mask[:, None], cache)
  return logits[:, 0], cache


def init_boxed(cfg: ModelConfig, rng: jax.Array) -> Any:
  """Params with their nn.LogicallyPartitioned boxes (sharding.init_sharded places them on a mesh)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg).init(rng, tokens, jnp.ones((1, 1), bool))["params"]
