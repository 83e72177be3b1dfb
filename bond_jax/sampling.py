"""Best-of-N sampling: prefill each prompt once, decode N samples that share its KV cache.

Shapes: B prompts, N samples per prompt, R = B * N sample rows (row r = b * N + n), P prompt tokens,
T = max_new_tokens response tokens, V vocab, L layers, K kv heads, Dh head_dim.

Prompts are LEFT-padded ([B, P] tokens + mask, real tokens at the right end). Responses are RIGHT-padded:
`tokens[b, n, :lengths[b, n]]` is the response, its last token is an EOS id when the sample stopped, and
everything after it is `pad_id` with mask False (EOS itself is in the response, mask True).

How `generate` spends its FLOPs (the decode step and its cache layout are models/decode.py's):
- ONE prefill per prompt. Its KV cache is never copied: the N samples of a prompt attend to the shared
  prompt cache (per layer: keys [B, K, Dh, P], values [B, K, P, Dh]) plus their own cache of generated
  tokens (per layer: keys and values [R, K, S, Dh]).
- The decode loop is a lax.while_loop per chunk of steps that stops as soon as every row has emitted EOS;
  chunk c reads only the generated-cache slots that can be filled by then (one block per chunk), not the
  whole preallocated buffer. Each step writes its token's k, v into the carried block before reading it,
  and q, k, v (and gate, up) come from one fused matmul: BENCHMARKS.md says why each of these matters.
- Every product takes compute-dtype operands and accumulates in float32 (`layers.dense`): in bfloat16 that is
  the native AMX / AVX512_BF16 / MXU product, where a bf16-out dot is widened to f32 by XLA CPU.
- Sampling is by inverse CDF (one uniform per token; a block of the vocabulary, then a token in it): exact,
  and cheaper than a full-vocabulary cumulative sum, which XLA CPU runs as a slow scan.
- RoPE angles of all decode steps are computed once before the loop (decode.rope_by_position).
- Prompt widths are bucketed (`bucket_length`), so a run compiles once per bucket, not once per batch.

Randomness: row r's uniforms come from fold_in(rng, r) alone, so a prompt's samples depend only on
(rng, its batch index b, N) and not on its padding, the other prompts, or the device mesh. Generating
prompts repeated N times with num_samples=1 gives the same samples as num_samples=N (same row keys).
"The same" is up to float rounding: another mesh or batch can run the products with another summation
order, which moves log-probs by ~1e-6 and so flips a draw whose uniform lands that close to a CDF boundary
(tiny preset, 64 rows x 64 tokens on 1 vs 2 CPU devices: one row differs, from its 28th token on).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bond_jax import sharding
from bond_jax.models import decode
from bond_jax.models import lora
from bond_jax.models import params as params_lib
from bond_jax.models.config import ModelConfig

MIN_BUCKET = 16

# Incremented each time generate's jitted body is traced (i.e. compiled); tests read it.
TRACE_COUNT = {"generate": 0}


class Samples(NamedTuple):
  """What `generate` returns (a pytree). All [B, N, T] arrays are right-padded after EOS.

  tokens: [B, N, T] int32 response tokens; `pad_id` after EOS.
  mask: [B, N, T] bool, True on the response (EOS included), False on the padding after it.
  lengths: [B, N] int32 response lengths (= mask.sum(-1)), EOS included.
  sample_logprobs: [B, N, T] float32 log-prob of each token under the distribution ACTUALLY SAMPLED: the
    softmax of logits / temperature after top-k and top-p truncation, renormalised. 0 for greedy
    (temperature 0: a point mass) and on padding. Use it for importance weights of the sampler.
  model_logprobs: [B, N, T] float32 log pi(token) of the model itself: log-softmax of the raw logits
    (temperature 1, no truncation), 0 on padding. This is the log pi that BOND's math uses; it equals
    `scoring.sequence_logprobs(...)[0]` of the same tokens.
  """
  tokens: jax.Array
  mask: jax.Array
  lengths: jax.Array
  sample_logprobs: jax.Array
  model_logprobs: jax.Array


# ---------------------------------------------------------------------------------------------------------
# Validation and bucketing (host side, before anything is traced).


def validate_sampling(*, num_samples: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                      compact_rows: int = 0) -> None:
  """One-line ValueErrors naming the bad value and what is allowed."""
  if int(num_samples) != num_samples or num_samples < 1:
    raise ValueError(f"num_samples={num_samples} is not allowed: need an integer >= 1")
  if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} is not allowed: need an integer >= 1")
  if not temperature >= 0:  # also rejects NaN
    raise ValueError(f"temperature={temperature} is not allowed: need temperature >= 0 (0 = greedy)")
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k={top_k} is not allowed: need an integer >= 0 (0 = no top-k truncation)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} is not allowed: need 0 < top_p <= 1 (1 = no nucleus truncation)")
  check_compact_rows(compact_rows)


def check_compact_rows(compact_rows: int, name: str = "compact_rows") -> None:
  """One-line ValueError unless compact_rows is 0 (off) or an integer K >= 2 (see generate)."""
  if int(compact_rows) != compact_rows or compact_rows < 0 or compact_rows == 1:
    raise ValueError(f"{name}={compact_rows} is not allowed: need 0 (off) or an integer >= 2")


def bucket_length(length: int, limit: int | None = None) -> int:
  """Prompt width to compile for: the next power of two >= length (at least MIN_BUCKET), capped at limit.

  Powers of two bound the number of compilations to log2(max_seq_len) while wasting < 2x prefill work
  (the decode reads the prompt cache through its mask, so the padding costs little there).
  """
  bucket = max(MIN_BUCKET, 1 << max(0, int(length) - 1).bit_length())
  return max(int(length), min(bucket, limit)) if limit is not None else bucket


def _prompt_stats(prompt_mask, xp=jnp):
  real = xp.sum(prompt_mask, axis=-1)
  left_padded = xp.all(prompt_mask[:, 1:] >= prompt_mask[:, :-1])
  return xp.min(real), xp.argmin(real), xp.max(real), left_padded


_device_prompt_stats = jax.jit(_prompt_stats)


def check_prompts(cfg: ModelConfig, prompts, prompt_mask, max_new_tokens: int) -> int:
  """Validates a prompt batch [B, P] (one-line ValueErrors); returns the longest real prompt length.
  Host (numpy) arrays are checked on the host, device arrays by one read back from the device."""
  if prompts.ndim != 2 or prompts.shape != prompt_mask.shape:
    raise ValueError(f"prompts {tuple(prompts.shape)} and prompt_mask {tuple(prompt_mask.shape)} must "
                     f"both be [B, P]")
  if prompts.shape[0] < 1 or prompts.shape[1] < 1:
    raise ValueError(f"prompts {tuple(prompts.shape)} is empty; need B >= 1 prompts of P >= 1 tokens")
  if isinstance(prompt_mask, np.ndarray):
    shortest, shortest_row, longest, left_padded = _prompt_stats(prompt_mask.astype(bool), np)
  else:
    shortest, shortest_row, longest, left_padded = jax.device_get(_device_prompt_stats(prompt_mask))
  if shortest < 1:
    raise ValueError(f"prompt row {int(shortest_row)} is empty (prompt_mask has no True); every prompt "
                     f"needs >= 1 real token (e.g. BOS)")
  if not left_padded:
    raise ValueError("prompt_mask is not left-padded: each row must be False...False then True...True")
  if longest + max_new_tokens > cfg.max_seq_len:
    raise ValueError(f"prompt length {int(longest)} + max_new_tokens {max_new_tokens} = "
                     f"{int(longest) + max_new_tokens} exceeds the context max_seq_len={cfg.max_seq_len}")
  return int(longest)


def _fit_width(prompts, prompt_mask, width: int):
  """Left-padded prompts cut or padded on the LEFT to `width` columns (real tokens stay at the right)."""
  have = prompts.shape[1]
  if have == width:
    return prompts, prompt_mask
  if have > width:
    return prompts[:, have - width:], prompt_mask[:, have - width:]
  extra = width - have
  return (jnp.pad(prompts, ((0, 0), (extra, 0))), jnp.pad(prompt_mask, ((0, 0), (extra, 0))))


# ---------------------------------------------------------------------------------------------------------
# Token choice.


def _cdf_block(vocab: int) -> int:
  """Block width of the two-level inverse CDF: the power of two >= sqrt(V) (>= 16), so that both levels'
  cumulative sums are short."""
  return max(16, 1 << math.isqrt(max(vocab - 1, 0)).bit_length())


def _inverse_cdf(probs: jax.Array, uniforms: jax.Array) -> jax.Array:
  """Index i with cdf[i-1] <= u * total < cdf[i]: exact sampling from unnormalised probs [R, V].

  Two levels, because a cumulative sum over the whole vocabulary is a slow scan on CPU (~0.5 ms per decode
  step at [64, 2048]): the vocabulary is cut into blocks of `_cdf_block(V)` tokens, the block is chosen
  by inverse CDF over the block sums, then the token by inverse CDF inside that block.
  A zero-probability token is never chosen: at each level the pick is the first entry whose cumulative
  sum exceeds a threshold held strictly below that level's total (so float rounding of u * total, or of
  the residual inside the block, can never run past the last entry with mass), and a zero entry does not
  raise the cumulative sum.
  """
  rows, vocab = probs.shape
  width = _cdf_block(vocab)
  blocks = -(-vocab // width)
  padded = jnp.pad(probs, ((0, 0), (0, blocks * width - vocab))).reshape(rows, blocks, width)
  first = lambda cdf, threshold: jnp.sum(cdf <= threshold[:, None], axis=-1).astype(jnp.int32)
  below = lambda total: jnp.nextafter(total, jnp.zeros_like(total))
  block_cdf = jnp.cumsum(jnp.sum(padded, axis=-1), axis=-1)  # [R, blocks]
  threshold = jnp.minimum(uniforms * block_cdf[:, -1], below(block_cdf[:, -1]))
  block = first(block_cdf, threshold)
  block_starts = jnp.pad(block_cdf[:, :-1], ((0, 0), (1, 0)))  # mass of the blocks before each block
  mass_before = jnp.take_along_axis(block_starts, block[:, None], axis=-1)[:, 0]
  inner_cdf = jnp.cumsum(jnp.take_along_axis(padded, block[:, None, None], axis=1)[:, 0], axis=-1)
  residual = jnp.minimum(jnp.maximum(threshold - mass_before, 0.0), below(inner_cdf[:, -1]))
  return block * width + first(inner_cdf, residual)


def _top_k(scaled: jax.Array, top_k: int) -> jax.Array:
  """Logits [R, V] with every token below the k-th largest set to -inf (ties with the k-th stay, as in
  transformers' TopKLogitsWarper)."""
  if not top_k or top_k >= scaled.shape[-1]:
    return scaled
  kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
  return jnp.where(scaled < kth, -jnp.inf, scaled)


def _nucleus(logp: jax.Array, uniforms: jax.Array, top_p: float) -> tuple[jax.Array, jax.Array]:
  """Top-p sampling from normalised log-probs [R, V]: (tokens [R], their log-prob in the nucleus [R]).

  The nucleus is the shortest prefix of the tokens sorted by probability (stable: lower id first on exact
  ties) whose mass reaches top_p; it is renormalised and sampled by inverse CDF IN SORTED ORDER, then
  mapped back to token ids. Deciding membership on the sorted array itself (instead of comparing every
  token against a cutoff value) keeps the decision exact: a recomputed cutoff can differ by an ulp.
  """
  ids = jnp.broadcast_to(jnp.arange(logp.shape[-1], dtype=jnp.int32), logp.shape)
  neg_sorted, order = jax.lax.sort_key_val(-logp, ids, dimension=-1)
  sorted_logp = -neg_sorted
  sorted_probs = jnp.exp(sorted_logp)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # of the strictly likelier tokens
  kept = jnp.where(mass_before < top_p, sorted_logp, -jnp.inf)
  kept = kept - jax.nn.logsumexp(kept, axis=-1, keepdims=True)
  index = _inverse_cdf(jnp.exp(kept), uniforms)
  pick = lambda x: jnp.take_along_axis(x, index[:, None], axis=-1)[:, 0]
  return pick(order), pick(kept)


def _choose(logits, uniforms, temperature, top_p, *, greedy: bool, plain: bool, top_k: int, nucleus: bool):
  """choose_tokens with the static decisions separated from the (traced) temperature and top_p values."""
  pick = lambda logp, tokens: jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
  if plain:
    # Temperature 1, no truncation: sample from exp(logits - max) unnormalised (the inverse CDF scales by
    # its own total) and normalise only the chosen token's log-prob: one exp over [R, V] instead of two.
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(shifted)
    tokens = _inverse_cdf(weights, uniforms)
    chosen = pick(shifted, tokens) - jnp.log(jnp.sum(weights, axis=-1))
    return tokens, chosen, chosen
  model_logp = jax.nn.log_softmax(logits, axis=-1)
  if greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    chosen = pick(model_logp, tokens)
    return tokens, jnp.zeros_like(chosen), chosen
  sample_logp = jax.nn.log_softmax(_top_k(logits / temperature, top_k), axis=-1)
  if nucleus:
    tokens, chosen = _nucleus(sample_logp, uniforms, top_p)
    return tokens, chosen, pick(model_logp, tokens)
  tokens = _inverse_cdf(jnp.exp(sample_logp), uniforms)
  return tokens, pick(sample_logp, tokens), pick(model_logp, tokens)


def _static_mode(temperature: float, top_k: int, top_p: float) -> dict[str, Any]:
  """What must be compiled in: greedy or not, the plain fast path, k, whether there is a nucleus."""
  return dict(greedy=temperature == 0, plain=temperature == 1.0 and not top_k and top_p == 1.0,
              top_k=int(top_k), nucleus=top_p < 1.0)


def choose_tokens(logits: jax.Array, uniforms: jax.Array, *, temperature: float, top_k: int,
                  top_p: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sample one token per row. logits [R, V] float32, uniforms [R] in [0, 1).

  Order as transformers' warpers: temperature, then top-k, then top-p on the renormalised top-k
  distribution. Returns (tokens [R] int32, sample_logprobs [R], model_logprobs [R]): see `Samples` for
  which is which. temperature 0 is greedy (argmax, lowest id on ties; sample log-prob 0).
  """
  return _choose(logits, uniforms, jnp.float32(max(temperature, 1e-30)), jnp.float32(top_p),
                 **_static_mode(temperature, top_k, top_p))


def row_uniforms(rng: jax.Array, num_rows: int, num_tokens: int) -> jax.Array:
  """[R, T] uniforms; row r's come from fold_in(rng, r) only (batch-, padding- and mesh-independent)."""
  keys = jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(num_rows, dtype=jnp.uint32))
  return jax.vmap(lambda key: jax.random.uniform(key, (num_tokens,), jnp.float32))(keys)


# ---------------------------------------------------------------------------------------------------------
# generate (the decode step and its cache layout are in models/decode.py)


def _empty_state(rows: int, steps: int, pad_id) -> dict[str, jax.Array]:
  """The loop's per-row outputs [R, T] (filled by _emit), the last token fed [R] and whether a row is done."""
  return {
      "tokens": jnp.full((rows, steps), pad_id, jnp.int32),
      "mask": jnp.zeros((rows, steps), bool),
      "sample_lp": jnp.zeros((rows, steps), jnp.float32),
      "model_lp": jnp.zeros((rows, steps), jnp.float32),
      "last": jnp.zeros((rows,), jnp.int32),
      "done": jnp.zeros((rows,), bool),
  }


def _emit(state, step, chosen, eos_mask, pad_id):
  """Writes step's chosen (tokens, sample log-probs, model log-probs) [R]; rows already done get padding."""
  tokens, sample_lp, model_lp = chosen
  live = ~state["done"]
  put = lambda buf, val: jax.lax.dynamic_update_slice(buf, val[:, None], (0, step))
  return dict(state, tokens=put(state["tokens"], jnp.where(live, tokens,
                                                           pad_id)), mask=put(state["mask"], live),
              sample_lp=put(state["sample_lp"],
                            jnp.where(live, sample_lp, 0.0)), model_lp=put(state["model_lp"],
                                                                           jnp.where(live, model_lp, 0.0)),
              last=tokens, done=state["done"] | (live & eos_mask[tokens]))


def compact_sizes(rows: int, steps: int, shards: int = 1) -> list[int]:
  """Row counts below R, largest first, that a compacting chunk may gather its live rows into: multiples of
  R / steps, each whole per batch shard so that the gathered rows stay split over the devices."""
  sizes = {rows * j // steps for j in range(1, steps) if rows * j % steps == 0}
  return sorted((size for size in sizes if size % shards == 0), reverse=True)


def _run_chunk(cfg, weights, prompt_cache, rope, row_lengths, state, uniforms, emit, earlier, span, slots,
               num_samples):
  """One chunk's lax.while_loop over steps span = [start, stop), stopping once every row is done:
  (state, the chunk's block). Rows: state's; row r decodes from prompt r // num_samples of prompt_cache."""
  start, stop = span

  def cond(carry):
    step, _, state = carry
    return (step <= stop) & ~jnp.all(state["done"])

  def body(carry):
    step, block, state = carry
    logits, block = decode.step(cfg, weights, rope, prompt_cache, earlier, block, state["last"],
                                row_lengths + step - 1, step - 1 - start, num_samples)
    return step + 1, block, emit(state, step, logits, uniforms)

  block = decode.empty_block(cfg, row_lengths.shape[0], slots)
  _, block, state = jax.lax.while_loop(cond, body, (jnp.int32(start + 1), block, state))
  return state, block


def _compacted_chunk(cfg, weights, prompt_cache, rope, row_lengths, state, uniforms, emit, earlier, span,
                     slots, num_samples, size):
  """_run_chunk on `size` rows: the live ones (done ones fill up), gathered with their prompt cache, blocks,
  uniforms and outputs, then scattered back. A done row left out keeps its padding, all it would get."""
  order = jnp.argsort(state["done"], stable=True)[:size]  # live rows first (False sorts before True)
  take = lambda x: jnp.take(x, order, axis=0)
  cache = decode.prompt_rows(cfg, prompt_cache, order // num_samples)
  earlier = [decode.block_rows(cfg, b, order) for b in earlier]
  sub_state, sub_block = _run_chunk(cfg, weights, cache, rope, take(row_lengths), jax.tree.map(take, state),
                                    take(uniforms), emit, earlier, span, slots, 1)
  state = jax.tree.map(lambda full, part: full.at[order].set(part), state, sub_state)
  block = decode.empty_block(cfg, row_lengths.shape[0], slots)
  return state, decode.put_block_rows(cfg, block, order, sub_block)


def _decode_chunks(cfg: ModelConfig, weights, prompt_cache, rope, row_lengths, state, uniforms, emit, *,
                   steps: int, num_samples: int, compact: int):
  """Steps 1..T-1 as one lax.while_loop per chunk (decode.chunks), each stopping once every row is done.

  Step s feeds token s-1 (cache slot s-1, position prompt_length + s - 1) and samples token s. A chunk's
  block is carried and written in place; finished blocks are loop invariants of the later chunks.
  compact: K > 0: chunks after the first run only the rows they must (the smallest of compact_sizes(R, K)
  holding the live rows; lax.switch over compiled loops), each reading its own copy of its prompt's cache.
  """
  slots, spans = decode.chunks(steps - 1)
  rows, shards = row_lengths.shape[0], sharding.logical_size("act_batch")
  sizes = compact_sizes(rows, compact, shards) if compact else []
  finished = []
  for c, span in enumerate(spans):
    args = (cfg, weights, prompt_cache, rope, row_lengths, state, uniforms, emit, list(finished), span, slots,
            num_samples)
    if c == 0 or not sizes:
      state, block = _run_chunk(*args)
    else:
      live = rows - jnp.sum(state["done"], dtype=jnp.int32)
      branch = sum((live <= size).astype(jnp.int32) for size in sizes)  # 0: all rows; i: sizes[i - 1]
      variants = [functools.partial(_compacted_chunk, *args, size) for size in sizes]
      state, block = jax.lax.switch(branch, [functools.partial(_run_chunk, *args)] + variants)
    finished.append(block)
  return state


def _generate_body(cfg: ModelConfig, params: Any, prompts, prompt_mask, rng, temperature, top_p, eos_mask,
                   pad_id, *, num_samples: int, max_new_tokens: int, mode: dict[str, Any], fuse: bool,
                   merge_adapters: bool = True, compact: int = 0) -> Samples:
  """The jitted generate. temperature, top_p: float32 []; eos_mask [V] bool; pad_id int32 [] (traced, so
  changing them does not recompile); mode: _static_mode's decisions (compiled in); fuse: see
  decode.fuse_layer; merge_adapters: fold LoRA adapters (if params carry any) into the weights once here,
  else apply their product at every step (models/lora.py); compact: see _decode_chunks."""
  TRACE_COUNT["generate"] += 1
  batch, width = prompts.shape
  rows, steps = batch * num_samples, max_new_tokens
  if merge_adapters:
    params = lora.merge(params)
  params = decode.cast_weights(params, cfg.dtype)  # once, for the prefill and the decode weights
  first_logits, prompt_cache = decode.prefill(cfg, params, prompts, prompt_mask)
  weights = decode.decode_weights(cfg, params, fuse)
  if fuse:  # all-gathered once, here, for every decode chunk: else XLA gathers them in each chunk's loop
    # and holds every copy at once (fsdp 8, 3 chunks: 58 -> 31 MiB temp per device; BENCHMARKS.md)
    weights = jax.tree.map(lambda w: sharding.constrain(w, (None,) * w.ndim), weights)
  uniforms = sharding.constrain(row_uniforms(rng, rows, steps), ("act_batch", None))
  emit = lambda state, step, logits, uniforms: _emit(
      state, step, _choose(logits, uniforms[:, step], temperature, top_p, **mode), eos_mask, pad_id)
  state = emit(_empty_state(rows, steps, pad_id), 0, jnp.repeat(first_logits, num_samples, axis=0), uniforms)
  row_lengths = jnp.repeat(jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32), num_samples)
  state = _decode_chunks(cfg, weights, prompt_cache, decode.rope_by_position(cfg, width + steps), row_lengths,
                         state, uniforms, emit, steps=steps, num_samples=num_samples, compact=compact)
  shape = (batch, num_samples, steps)
  return Samples(tokens=state["tokens"].reshape(shape), mask=state["mask"].reshape(shape),
                 lengths=jnp.sum(state["mask"], axis=-1, dtype=jnp.int32).reshape(shape[:2]),
                 sample_logprobs=state["sample_lp"].reshape(shape),
                 model_logprobs=state["model_lp"].reshape(shape))


def _eos_mask(cfg: ModelConfig, eos_ids: Sequence[int]) -> np.ndarray:
  """[V] bool, True at the ids that end a response (one-line ValueError for an id outside the vocabulary)."""
  bad = [int(i) for i in eos_ids if not 0 <= int(i) < cfg.vocab_size]
  if bad:
    raise ValueError(f"eos id {bad[0]} is not allowed: need 0 <= id < vocab_size={cfg.vocab_size}")
  eos_mask = np.zeros(cfg.vocab_size, bool)
  eos_mask[list(eos_ids)] = True
  return eos_mask


def _mesh_of(params: Any, mesh: Mesh | None) -> Mesh:
  """The mesh to run on: given, else the params' own (NamedSharding), else the first device alone."""
  if mesh is not None:
    return mesh
  leaf = jax.tree.leaves(params)[0]
  if isinstance(getattr(leaf, "sharding", None), NamedSharding):
    return leaf.sharding.mesh
  device = next(iter(leaf.devices())) if hasattr(leaf, "devices") else jax.devices()[0]
  return sharding.make_mesh({"data": 1}, [device])


@functools.lru_cache(maxsize=None)
def _jitted_generate(cfg: ModelConfig, mesh: Mesh, batch: int, num_samples: int, max_new_tokens: int,
                     mode: tuple[tuple[str, Any], ...], adapters: tuple[Any, ...] = (),
                     merge_adapters: bool = True, compact: int = 0):
  """One jax.jit per (config, mesh, static options, batch, adapter layout: lora.layout); jit's own cache
  keys the prompt bucket."""
  axes = params_lib.logical_axes(cfg, "lm")
  if adapters:
    axes = lora.attached_axes(axes, adapters)
  param_shardings = sharding.tree_shardings(axes, mesh)
  prompt_sharding = sharding.fitted(mesh, (batch, 1), ("act_batch", None))
  out_3d = sharding.fitted(mesh, (batch, num_samples, 1), ("act_batch", None, None))
  out_2d = sharding.fitted(mesh, (batch, num_samples), ("act_batch", None))
  body = functools.partial(_generate_body, cfg, num_samples=num_samples, max_new_tokens=max_new_tokens,
                           mode=dict(mode), fuse=mesh.shape.get("tensor", 1) == 1,
                           merge_adapters=merge_adapters, compact=compact)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(body, in_shardings=(param_shardings, prompt_sharding, prompt_sharding) + (replicated,) * 5,
                 out_shardings=Samples(out_3d, out_3d, out_2d, out_3d, out_3d))


def generate(cfg: ModelConfig, params: Any, prompts: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *,
             num_samples: int, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_ids: Sequence[int] = (), pad_id: int = 0, mesh: Mesh | None = None,
             prompt_width: int | None = None, merge_adapters: bool = True, prompts_checked: bool = False,
             compact_rows: int = 0) -> Samples:
  """Sample N responses per prompt.

  Args:
    prompts, prompt_mask: [B, P] LEFT-padded prompts; every row needs >= 1 real token. The width is cut
      or padded to `bucket_length(longest real prompt)` before compiling.
    rng: a jax.random key; row r = b * N + n samples with fold_in(rng, r) (see module docstring).
    num_samples: N >= 1 samples per prompt (one prefill per prompt, shared by its N samples).
    max_new_tokens: T, the response length limit; longest real prompt + T must fit cfg.max_seq_len.
    temperature: >= 0; 0 = greedy. top_k: >= 0, 0 = off. top_p: in (0, 1], 1 = off.
    eos_ids: token ids that end a response (kept in it); () = always T tokens.
    pad_id: token written after EOS.
    mesh: defaults to the params' mesh; rows run on ('data', 'fsdp'), heads on 'tensor'.
    prompt_width: compile for exactly this prompt width instead of bucket_length(longest real prompt),
      e.g. the caller's own padding bucket (the trainer's prompts come in a few fixed widths already).
    merge_adapters: with LoRA adapters attached to params (models/lora.py), merge them into the weights
      once per call (True) or apply the low-rank product at every decode step (False).
    prompts_checked: the caller has run `check_prompts` on this batch with this max_new_tokens (the
      trainer does, on each host batch before placing it); needs prompt_width. Nothing is then read back
      from the device: a rollout's steps are dispatched without waiting on each other.
    compact_rows: 0 = off (finished rows ride along). K >= 2: chunks after the first decode only the live
      rows, in the fewest multiple of R / K rows that holds them (_decode_chunks): the same samples, faster
      where many responses end early, up to K - 1 more compiled loops per chunk (BENCHMARKS.md, eos rows).
  Compiles once per (cfg, mesh, B, N, T, prompt bucket, top_k, compact_rows, and whether temperature is 0
  or 1 and top_p < 1); the values of temperature, top_p, eos_ids and pad_id are traced and never recompile.
  Returns:
    Samples with [B, N, T] arrays (see `Samples`: sample_logprobs is the sampled distribution,
    model_logprobs the temperature-1, untruncated log pi).
  """
  validate_sampling(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, compact_rows=compact_rows)
  if prompts_checked and prompt_width is None:
    raise ValueError("prompts_checked=True needs prompt_width (the checked batch's width)")
  host = lambda x, dtype: x if isinstance(x, jax.Array) else np.asarray(x, dtype)  # checked where it is
  prompts, prompt_mask = host(prompts, np.int32), host(prompt_mask, bool)
  longest = prompt_width if prompts_checked else check_prompts(cfg, prompts, prompt_mask, max_new_tokens)
  prompts, prompt_mask = jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_mask, bool)
  width = bucket_length(longest, limit=cfg.max_seq_len - max_new_tokens)
  if prompt_width is not None:
    if not longest <= prompt_width <= cfg.max_seq_len - max_new_tokens:
      raise ValueError(f"prompt_width={prompt_width} is not allowed: need the longest prompt ({longest}) <= "
                       f"prompt_width <= max_seq_len - max_new_tokens = {cfg.max_seq_len - max_new_tokens}")
    width = int(prompt_width)
  prompts, prompt_mask = _fit_width(prompts, prompt_mask, width)
  mesh = _mesh_of(params, mesh)
  eos_mask = _eos_mask(cfg, eos_ids)
  fn = _jitted_generate(cfg, mesh, prompts.shape[0], int(num_samples), int(max_new_tokens),
                        tuple(sorted(_static_mode(temperature, top_k, top_p).items())), lora.layout(params),
                        bool(merge_adapters), int(compact_rows))
  # jit refuses committed arguments on another layout (e.g. prompts replicated over a multi-process mesh)
  prompts, prompt_mask = jax.device_put((prompts, prompt_mask),
                                        sharding.fitted(mesh, (prompts.shape[0], 1), ("act_batch", None)))
  with jax.set_mesh(mesh):
    return fn(params, prompts, prompt_mask, rng, np.float32(max(temperature, 1e-30)), np.float32(top_p),
              eos_mask, np.int32(pad_id))
