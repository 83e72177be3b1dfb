"""The sampler's fused one-token decode step and its cache layout.

Shapes: B prompts, N samples per prompt, R = B * N rows (row r = b * N + n), P prompt slots, S slots of one
generated-token block, L layers, D d_model, H query heads, K kv heads, g = H / K, Dh head_dim, M mlp_dim,
V vocab.

This is the model's only block math besides transformer.py's forward. Both are written with the building
blocks of layers.py (RMSNorm, RoPE, the MLP activation, the score scale and mask, the embedding, the LM
head), so an architecture change is written once; tests/models/test_decode.py pins this step to the forward
at every step.

Cache layout (what `prefill` and `empty_block` build):
- The prompt cache, written once per prompt by the forward and shared by its N samples, per layer: keys
  [B, K, Dh, P] (transposed: read as a plain [contraction, cols] operand), values [B, K, P, Dh], and its
  mask valid [B, P].
- The generated tokens: one block of S slots per chunk of steps (`chunks`), keys and values [R, K, S, Dh]
  per layer. Finished blocks are loop invariants of later chunks (full: read unmasked); the current one is
  carried and written in place, its slots past the step masked. A sliding layer masks, in addition, the
  prompt slots and generated slots out of its window (_window_masks: the same for every row, since rows
  decode in step); the caches keep every slot.
Per-layer arrays are lists of L arrays (unrolled layers; see per_layer) or stacked [L, ...] (scanned).

Weights (`decode_weights`, built once per call, outside the loop): matrices cast to the compute dtype, q's
weights carrying the score scale (layers.query_scale; after a q norm, q is scaled instead), q/k/v fused into one [D, (H + 2K) * Dh] matrix and gate/up into
one [D, 2M] matrix, the LM head a contiguous [D, V] matrix. Every product takes compute-dtype operands and
accumulates in float32 (layers.dense). BENCHMARKS.md measures why each of these choices matters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bond_jax import sharding
from bond_jax.models import layers, lora, transformer
from bond_jax.models.config import ModelConfig


class PromptCache(NamedTuple):
  """The prompt cache shared by each prompt's N samples (a pytree): k [B, K, Dh, P] and v [B, K, P, Dh]
  per layer, valid [B, P] bool."""
  k: Any
  v: Any
  valid: jax.Array


class DecodeWeights(NamedTuple):
  """What a decode step reads (a pytree): embedding [V, D] and head [D, V] in the compute dtype,
  final_norm [D], layers: per-layer param dicts from fuse_layer (a list, or one stacked [L, ...] dict)."""
  embedding: jax.Array
  layers: Any
  final_norm: jax.Array
  head: jax.Array


# ---------------------------------------------------------------------------------------------------------
# Weights and caches, built once per call (outside the decode loop).


def cast_weights(params: Any, dtype) -> Any:
  """Matrices in the compute dtype once, outside the loop (norm scales keep their dtype and math)."""
  return jax.tree.map(lambda w: w.astype(dtype) if w.ndim >= 2 else w, params)


def layer_params(cfg: ModelConfig, params: Any) -> list[Any] | Any:
  """Per-layer param dicts (a list), or the stacked [L, ...] dict when the model scans its layers."""
  if cfg.scan_layers:
    return params["layers"]["block"]
  return [params[f"layer_{i}"] for i in range(cfg.num_layers)]


def per_layer(cfg: ModelConfig, stacked: jax.Array) -> list[jax.Array] | jax.Array:
  """[L, ...] -> a list of L arrays (unrolled layers), or unchanged (scanned layers).

  Done once, outside the decode loop: XLA CPU copies every slice x[i] it feeds to a matmul, so a loop body
  that indexes stacked caches pays a copy per layer per step.
  """
  return stacked if cfg.scan_layers else [stacked[i] for i in range(cfg.num_layers)]


def fuse_layer(cfg: ModelConfig, p: Any, fuse: bool) -> Any:
  """A layer's params (or the stacked [L, ...] ones) for the decode step.

  Always: q's weights (and bias) carry the score scale (RoPE is linear, so scaling the weights once equals
  scaling q every step), unless a q norm follows them (its output is scale-free: the step scales q then).
  fuse: q, k, v as ONE [D, (H + 2K) * Dh] matrix (their biases one [(H + 2K) * Dh] vector) and gate, up
  as ONE [D, 2M] matrix, so each step runs two matmuls where it would run five: at decode sizes the per-op
  overhead, not the FLOPs, sets the pace. Not done when heads are sharded over 'tensor' (a fused matrix
  would mix the head shards).
  """
  attn, mlp = p["attn"], p["mlp"]
  if not cfg.qk_norm:
    scale = lambda w: w * jnp.asarray(layers.query_scale(cfg), w.dtype)
    scaled = [n for n in ("q", "q_bias", "q" + lora.SUFFIX_B) if n in attn]  # q's product, wherever it is
    attn = dict(attn, **{n: scale(attn[n]) for n in scaled})
  if not fuse:
    return dict(p, attn=attn)
  flat = lambda w: w.reshape(*w.shape[:-2], -1)  # [..., D?, heads, Dh] -> [..., D?, heads * Dh]
  fused = {"qkv": jnp.concatenate([flat(attn[name]) for name in ("q", "k", "v")], axis=-1), "o": attn["o"]}
  if cfg.qkv_bias:
    fused["qkv_bias"] = jnp.concatenate([flat(attn[f"{name}_bias"]) for name in ("q", "k", "v")], axis=-1)
  fused.update({name: attn[name] for name in ("q_norm", "k_norm") if name in attn})
  fused_mlp = {"gate_up": jnp.concatenate([mlp["gate"], mlp["up"]], axis=-1), "down": mlp["down"]}
  _fuse_adapters(fused, attn, ("q", "k", "v"), "qkv", flat)
  _fuse_adapters(fused_mlp, mlp, ("gate", "up"), "gate_up", lambda w: w)
  for group, out, name in ((attn, fused, "o"), (mlp, fused_mlp, "down")):
    out.update({name + s: group[name + s] for s in (lora.SUFFIX_A, lora.SUFFIX_B) if name + s in group})
  return dict(p, attn=fused, mlp=fused_mlp)


def _fuse_adapters(out: dict, group: dict, names: tuple[str, ...], fused: str, flat) -> None:
  """out[fused + '_lora_a' / '_lora_b']: the fused adapter of the `names` weights of `group`, if any has
  one (lora.decode 'low_rank'; with 'merge' the sampler's params carry none)."""
  parts = [
      (group.get(n + lora.SUFFIX_A),
       None if n + lora.SUFFIX_B not in group else flat(group[n + lora.SUFFIX_B]), flat(group[n]).shape[-1])
      for n in names
  ]
  adapter = lora.fuse(parts)
  if adapter is not None:
    out[fused + lora.SUFFIX_A], out[fused + lora.SUFFIX_B] = adapter


def _adapted(p: Any, name: str, x: jax.Array, out: jax.Array, n_in: int = 1) -> jax.Array:
  """out plus the low-rank product of the `name` adapter on x where p carries one."""
  if name + lora.SUFFIX_A not in p:
    return out
  return out + lora.low_rank(x, p[name + lora.SUFFIX_A], p[name + lora.SUFFIX_B], n_in, out.dtype)


def decode_weights(cfg: ModelConfig, params: Any, fuse: bool) -> DecodeWeights:
  """The decode step's weights from the model's params tree (see the module docstring; fuse: fuse_layer).

  The head is a contiguous [D, V] matrix: a tied head used as embedding.T inside the loop is a
  transposed-operand matmul, ~20% slower on XLA CPU than the plain [R, D] x [D, V] one.
  """
  params = cast_weights(params, cfg.dtype)
  stacked_or_list = layer_params(cfg, params)
  fused = (fuse_layer(cfg, stacked_or_list, fuse)
           if cfg.scan_layers else [fuse_layer(cfg, p, fuse) for p in stacked_or_list])
  head = layers.head_matrix(cfg, params["embedding"], params.get("lm_head")).astype(cfg.dtype)
  return DecodeWeights(embedding=params["embedding"], layers=fused, final_norm=params["final_norm"]["scale"],
                       head=head)


def prefill(cfg: ModelConfig, params: Any, prompts: jax.Array,
            prompt_mask: jax.Array) -> tuple[jax.Array, PromptCache]:
  """The forward over left-padded prompts [B, P] into a cache of exactly P slots: (logits [B, V] float32
  of each prompt's next token, its PromptCache). params: the model's tree (cast_weights' output saves the
  forward its casts)."""
  model = transformer.Transformer(cfg)
  hidden, cache = model.apply({"params": params}, prompts, prompt_mask,
                              transformer.init_cache(cfg, *prompts.shape), method="hidden")
  logits = model.apply({"params": params}, hidden[:, -1:], method="logits")[:, 0]
  # keys [B, K, Dh, P], values [B, K, P, Dh], so that both attention products are plain
  # [rows, contraction] x [contraction, cols] matmuls (see _attend)
  return logits, PromptCache(k=per_layer(cfg, cache["k"].transpose(0, 1, 3, 4, 2)),
                             v=per_layer(cfg, cache["v"].swapaxes(2, 3)), valid=cache["valid"])


def rope_by_position(cfg: ModelConfig, length: int) -> tuple[jax.Array, ...]:
  """RoPE (cos, sin) [length, 1, Dh/2] of positions 0..length-1, built once and gathered per step: computed
  inside the step, XLA fuses cos/sin into each layer's rotation and evaluates them per head and element
  (~13% of a tiny step). With a sliding layers' own base (Gemma 3): (cos, sin, local cos, local sin)."""
  positions = jnp.arange(length, dtype=jnp.int32)
  table = layers.rope_table(positions, layers.rope_inverse_frequencies(cfg), cfg.dtype)
  if cfg.rope_local_theta is None:
    return table
  return table + layers.rope_table(positions, layers.rope_inverse_frequencies(cfg, local=True), cfg.dtype)


def chunks(num_steps: int) -> tuple[int, list[tuple[int, int]]]:
  """(slots, [start, stop) ranges of decode steps): chunk c writes its own cache block of `slots` slots.

  Chunk c attends to the blocks of chunks 0..c whole, so it reads only slots that can be filled by then.
  slots is the smallest multiple of 16 that needs at most 8 chunks (each chunk is a compiled copy of the
  step); only the last chunk can stop short of its block. Why multiples of 16: YNNPACK's batched score
  products (measured with keys then stored [Dh, S]) run ~2x faster per slot at S = 16 or 32 than at S = 21
  (isolated), and a tiny / small generate of 64 tokens with 16-slot blocks took 0.93x / 0.92x the time of
  three 21-slot blocks (median paired ratios over 20 / 12 alternating rounds, BENCHMARKS.md). On a Zen 5
  VM, with keys [S, Dh], blocks of 24, 32 or 64 slots were no faster than 16 (1.01-1.05x its time).
  """
  if num_steps <= 0:
    return 0, []
  slots = 16 * -(-num_steps // (16 * 8))
  return slots, [(start, min(start + slots, num_steps)) for start in range(0, num_steps, slots)]


def empty_block(cfg: ModelConfig, rows: int, slots: int) -> dict[str, Any]:
  """A chunk's generated-token block: {'k', 'v'} of zeros [R, K, S, Dh] per layer."""
  layer_axis = ((cfg.num_layers,), ("layers",)) if cfg.scan_layers else ((), ())
  shape = layer_axis[0] + (rows, cfg.num_kv_heads, slots, cfg.head_dim)
  axes = layer_axis[1] + ("act_batch", "act_kv_heads", "cache_length", "head_dim")
  zeros = lambda: sharding.constrain(jnp.zeros(shape, cfg.dtype), axes)
  if cfg.scan_layers:
    return {"k": zeros(), "v": zeros()}
  return {"k": [zeros() for _ in range(cfg.num_layers)], "v": [zeros() for _ in range(cfg.num_layers)]}


def _row_axis(cfg: ModelConfig) -> int:
  return 1 if cfg.scan_layers else 0  # stacked [L, R, ...] or a list of [R, ...] per layer


def prompt_rows(cfg: ModelConfig, cache: PromptCache, prompt_index: jax.Array) -> PromptCache:
  """A PromptCache with one row per entry of prompt_index [R'] (prompt_index[r] = the prompt row r decodes
  from): the layout a step with num_samples = 1 reads, for rows that no longer come N to a prompt."""
  take = lambda x: jnp.take(x, prompt_index, axis=_row_axis(cfg))
  return PromptCache(k=jax.tree.map(take, cache.k), v=jax.tree.map(take, cache.v),
                     valid=jnp.take(cache.valid, prompt_index, axis=0))


def block_rows(cfg: ModelConfig, block: dict[str, Any], index: jax.Array) -> dict[str, Any]:
  """Rows index [R'] of a generated block (empty_block's layout)."""
  return jax.tree.map(lambda x: jnp.take(x, index, axis=_row_axis(cfg)), block)


def put_block_rows(cfg: ModelConfig, block: dict[str, Any], index: jax.Array,
                   rows: dict[str, Any]) -> dict[str, Any]:
  """block with its rows index [R'] (distinct) replaced by those of `rows` (block_rows' inverse)."""
  where = (slice(None),) * _row_axis(cfg) + (index,)
  return jax.tree.map(lambda full, part: full.at[where].set(part), block, rows)


# ---------------------------------------------------------------------------------------------------------
# The step (inside the loop).


def _project_qkv(cfg: ModelConfig, p: Any, x: jax.Array, rope):
  """x [R, D] -> q [R, H, Dh], k [R, K, Dh] (both rotated), v [R, K, Dh], from fuse_layer's params
  (q's scale is in its weights). Fused weights: one matmul, and q, k rotated as one [R, H + K, Dh] array
  (one RoPE op per layer, not two). Biases and q/k norms (then q's scale) as configured.
  """
  h, kv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  if "qkv" not in p:
    q, k, v = (_adapted(p, name, x, layers.dense(x, p[name], "rd,dhk->rhk")) for name in ("q", "k", "v"))
    if cfg.qkv_bias:
      q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if cfg.qk_norm:
      q, k = _qk_norm(cfg, p, q, k)
    return layers.rotate(q, *rope), layers.rotate(k, *rope), v
  qkv = _adapted(p, "qkv", x, layers.dense(x, p["qkv"]))
  if cfg.qkv_bias:
    qkv = qkv + p["qkv_bias"]
  qk = qkv[:, :(h + kv) * dh].reshape(-1, h + kv, dh)
  if cfg.qk_norm:
    qk = jnp.concatenate(_qk_norm(cfg, p, qk[:, :h], qk[:, h:]), axis=1)
  qk = layers.rotate(qk, *rope)
  return qk[:, :h], qk[:, h:], qkv[:, (h + kv) * dh:].reshape(-1, kv, dh)


def _qk_norm(cfg: ModelConfig, p: Any, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """q [R, H, Dh], k [R, K, Dh] normed per head; q then carries the score scale (see fuse_layer)."""
  q = layers.rms_norm(cfg, p["q_norm"], q)
  return q * jnp.asarray(layers.query_scale(cfg), q.dtype), layers.rms_norm(cfg, p["k_norm"], k)


def _attend(cfg: ModelConfig, q, prompt_kv, prompt_valid, blocks, num_samples: int) -> jax.Array:
  """Softmax (float32) of q [R, K, g, Dh] over the prompt slots and the generated blocks -> [R, H, Dh].

  prompt_kv: keys [B, K, Dh, P], values [B, K, P, Dh]; prompt_valid [B, P]; blocks: (keys, values
  [R, K, S_c, Dh], valid [R, S_c] or None for a full block). The N samples of prompt b share its cache:
  one [N*g, Dh] x [Dh, P] product per (b, kv head).
  """
  dt, f32 = cfg.dtype, jnp.float32
  rows, k_heads, groups, dh = q.shape
  batch = rows // num_samples
  q_by_prompt = q.reshape(batch, num_samples, k_heads, groups,
                          dh).transpose(0, 2, 1, 3, 4).reshape(batch, k_heads, num_samples * groups, dh)
  s_prompt = jnp.einsum("bkmd,bkdp->bkmp", q_by_prompt, prompt_kv[0], preferred_element_type=f32)
  s_prompt = layers.mask_scores(cfg, s_prompt, prompt_valid[:, None, None, :])
  s_gen = [jnp.einsum("rkgd,rksd->rkgs", q, gk, preferred_element_type=f32) for gk, _, _ in blocks]
  s_gen = [
      layers.soft_cap(s, cfg.attn_softcap) if valid is None else layers.mask_scores(
          cfg, s, valid[:, None, None, :]) for s, (_, _, valid) in zip(s_gen, blocks)
  ]

  by_row = lambda t: t.reshape(batch, k_heads, num_samples, groups, *t.shape[3:]).swapaxes(1, 2).reshape(
      rows, k_heads, groups, *t.shape[3:])  # [B, K, N*g, ...] -> [R, K, g, ...]
  top = by_row(jnp.max(s_prompt, axis=-1))
  for scores in s_gen:
    top = jnp.maximum(top, jnp.max(scores, axis=-1))
  top_by_prompt = top.reshape(batch, num_samples, k_heads,
                              groups).transpose(0, 2, 1, 3).reshape(batch, k_heads, num_samples * groups, 1)
  e_prompt = jnp.exp(s_prompt - top_by_prompt)
  denom = by_row(jnp.sum(e_prompt, axis=-1))
  total = by_row(jnp.einsum("bkmp,bkpd->bkmd", e_prompt.astype(dt), prompt_kv[1], preferred_element_type=f32))
  for scores, (_, gv, _) in zip(s_gen, blocks):
    e_gen = jnp.exp(scores - top[..., None])
    denom = denom + jnp.sum(e_gen, axis=-1)
    total = total + jnp.einsum("rkgs,rksd->rkgd", e_gen.astype(dt), gv, preferred_element_type=f32)
  return (total / denom[..., None]).astype(dt).reshape(rows, cfg.num_heads, dh)


def _attention(cfg: ModelConfig, p: Any, x, rope, window, prompt_kv, prompt_valid, earlier, current, slot,
               num_samples: int):
  """One decode token per row: x [R, D] -> (out [R, D], current (keys, values) with this token at `slot`).

  rope: (cos, sin) [R, 1, Dh/2] of the rows' positions; earlier: (keys, values [R, K, S, Dh]) of the
  finished chunks; current: this chunk's (keys, values), whose slots < `slot` are filled. This token's k, v
  go to slot `slot` FIRST and are then read back with the rest: written after the read, the carried
  buffers would be copied twice per step by the while loop. Heads-before-slots layouts make every product
  a batched matmul, which XLA CPU runs far faster than reductions over a non-minor axis. The generated keys
  are not transposed ([S, Dh], unlike the prompt's), so that each step's write is one contiguous Dh-row per
  head instead of a strided column (BENCHMARKS.md: faster in bfloat16, equal in float32, at 16-slot
  blocks). Each block is read whole (a slice of a bigger buffer would be copied first). window: None, or a
  sliding layer's _window_masks.
  """
  dt = cfg.dtype
  rows = x.shape[0]
  q, k, v = _project_qkv(cfg, p, x, rope)
  current = (jax.lax.dynamic_update_slice(current[0], k[:, :, None].astype(dt), (0, 0, slot, 0)),
             jax.lax.dynamic_update_slice(current[1], v[:, :, None].astype(dt), (0, 0, slot, 0)))
  span = current[1].shape[2]
  blocks = [(gk, gv, None) for gk, gv in earlier
           ] + [(current[0], current[1], jnp.broadcast_to(jnp.arange(span) <= slot, (rows, span)))]
  if window is not None:
    prompt_ok, blocks_ok = window
    prompt_valid = prompt_valid & prompt_ok
    blocks = [
        (gk, gv, ok[None] if valid is None else valid & ok) for (gk, gv, valid), ok in zip(blocks, blocks_ok)
    ]
  q = q.reshape(rows, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
  q = sharding.constrain(q, ("act_batch", "act_kv_heads", None, None))
  heads = _attend(cfg, q, prompt_kv, prompt_valid, blocks, num_samples)
  out = _adapted(p, "o", heads, layers.dense(heads, p["o"], "rhk,hkd->rd"), n_in=2)
  return sharding.constrain(out, ("act_batch", "act_embed")), current


def mlp(cfg: ModelConfig, p: Any, x: jax.Array) -> jax.Array:
  """x [R, D] -> [R, D] with fuse_layer's params. The activation runs on the float32 products (XLA CPU's
  bfloat16 exp is slow)."""
  f32 = jnp.float32
  if "gate_up" in p:
    g, up = jnp.split(_adapted(p, "gate_up", x, layers.dense(x, p["gate_up"], out_dtype=f32)), 2, axis=-1)
  else:
    g, up = (_adapted(p, n, x, layers.dense(x, p[n], out_dtype=f32)) for n in ("gate", "up"))
  h = sharding.constrain(layers.gated(cfg, g, up).astype(x.dtype), ("act_batch", "act_mlp"))
  return _adapted(p, "down", h, layers.dense(h, p["down"]))


def _block(cfg, p, x, rope, window, prompt_kv, prompt_valid, earlier, current, slot, num_samples):
  """Pre-norm residual block (transformer.Block) of one token per row: x [R, D] -> (x, current).
  rope, window: this layer's (see _for_layer)."""
  norm = lambda name, y: layers.rms_norm(cfg, p[name]["scale"], y)
  h, current = _attention(cfg, p["attn"], norm("attn_norm", x), rope, window, prompt_kv, prompt_valid,
                          earlier, current, slot, num_samples)
  x = x + (norm("attn_post_norm", h) if cfg.sandwich_norms else h)
  h = mlp(cfg, p["mlp"], norm("mlp_norm", x))
  x = x + (norm("mlp_post_norm", h) if cfg.sandwich_norms else h)
  return sharding.constrain(x, ("act_batch", "act_embed")), current


def _window_masks(cfg: ModelConfig, prompt_slots: int, num_earlier: int, slots: int, slot):
  """What a sliding layer's query may read: (prompt slots [P] bool, [S] bool for each generated block,
  the earlier ones then the current). The query's cache slot is P + (its generated index), the same for
  every row (rows decode in step); None without a sliding window."""
  if cfg.sliding_window is None:
    return None
  query = prompt_slots + num_earlier * slots + slot
  prompt_ok = layers.in_window(cfg, query, jnp.arange(prompt_slots))
  return prompt_ok, [
      layers.in_window(cfg, query, prompt_slots + c * slots + jnp.arange(slots))
      for c in range(num_earlier + 1)
  ]


def _for_layer(cfg: ModelConfig, rope, window, sliding):
  """This layer's (rope, window): the local RoPE table and the window masks where it slides. sliding: a
  bool (unrolled layers), or a traced flag (scanned mixed layers), or None (scanned, all alike)."""
  sliding = cfg.sliding_layers[0] if sliding is None else sliding
  if len(rope) == 4:  # rope_by_position's local table too
    rope = layers.pick(sliding, rope[2:], rope[:2])
  if window is None or sliding is False:
    return rope, None
  return rope, window if sliding is True else jax.tree.map(lambda ok: ok | ~sliding, window)


def lm_logits(head: jax.Array, hidden: jax.Array) -> jax.Array:
  """hidden [R, D] x head [D, V] (decode_weights' contiguous head) -> float32 logits [R, V]."""
  logits = jnp.dot(hidden, head, preferred_element_type=jnp.float32)
  return sharding.constrain(logits, ("act_batch", "act_vocab"))


def step(cfg: ModelConfig, weights: DecodeWeights, rope_table, prompt_cache: PromptCache, earlier, current,
         tokens: jax.Array, positions: jax.Array, slot, num_samples: int) -> tuple[jax.Array, Any]:
  """Feed tokens [R] at positions [R] -> (logits [R, V] float32 of the next tokens, updated current block).

  rope_table: rope_by_position's (cos, sin), gathered here at positions. earlier: the finished chunks'
  blocks; current: this chunk's block, whose slots < slot (int32 []) hold its earlier tokens and whose slot
  `slot` receives these (blocks: see empty_block).
  """
  rope = tuple(jnp.take(table, positions, axis=0) for table in rope_table)  # [R, 1, Dh/2]
  x = layers.embed(cfg, weights.embedding, tokens)
  pk, pv, p_valid = prompt_cache
  earlier_kv = [(b["k"], b["v"]) for b in earlier]
  window = _window_masks(cfg, p_valid.shape[1], len(earlier),
                         jax.tree.leaves(current["k"])[0].shape[-2], slot)
  if cfg.scan_layers:
    sliding = jnp.asarray(cfg.sliding_layers) if cfg.mixed_layers else None

    def body(x, xs):
      p, lpk, lpv, layer_kv, ck, cv, flag = xs
      return _block(cfg, p, x, *_for_layer(cfg, rope, window, flag), (lpk, lpv), p_valid, layer_kv, (ck, cv),
                    slot, num_samples)

    x, (new_k,
        new_v) = jax.lax.scan(body, x,
                              (weights.layers, pk, pv, earlier_kv, current["k"], current["v"], sliding))
  else:
    new_k, new_v = [], []
    for i, p in enumerate(weights.layers):
      x, (k, v) = _block(cfg, p, x, *_for_layer(cfg, rope, window, cfg.sliding_layers[i]), (pk[i], pv[i]),
                         p_valid, [(k[i], v[i]) for k, v in earlier_kv], (current["k"][i], current["v"][i]),
                         slot, num_samples)
      new_k.append(k)
      new_v.append(v)
  x = layers.rms_norm(cfg, weights.final_norm, x)
  return layers.soft_cap(lm_logits(weights.head, x), cfg.final_softcap), {"k": new_k, "v": new_v}
