"""Best-of-N sampler: exact sampling distribution, determinism across meshes and batches, bounded
compilation, EOS semantics, input validation. Its log-probs are checked against teacher forcing, and
rewards of its samples, in test_scoring.py."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bond_jax import sampling, sharding
from bond_jax.models import params as params_lib
from bond_jax.models import decode, transformer
from bond_jax.models.config import ModelConfig

VOCAB, PAD = 32, 0
BASE = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
            max_seq_len=64)
EOS_IDS = (1, 5, 9, 13)  # several ids: most rows stop early, some run to the limit
FORWARD = jax.jit(transformer.forward, static_argnums=0)


def _params(cfg, seed=0):
  params = nn.unbox(jax.jit(lambda r: transformer.init_boxed(cfg, r))(jax.random.key(seed)))
  # shrink the embedding (tied: also the output layer) so next-token distributions are far from one-hot
  return {**params, "embedding": params["embedding"] * 0.5}


def _prompts(seed, lengths, width):
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  mask = np.arange(width)[None] >= (width - lengths)[:, None]
  return np.where(mask, rng.integers(2, VOCAB, (len(lengths), width)), PAD).astype(np.int32), mask


@pytest.fixture(scope="module")
def llama():
  cfg = ModelConfig(**BASE)
  return cfg, _params(cfg)


@pytest.fixture(scope="module")
def sampled(llama):
  """One sampled batch (temperature 0.8, several EOS ids) that several tests read."""
  cfg, params = llama
  prompts, mask = _prompts(0, lengths=(7, 3, 10), width=10)
  out = sampling.generate(cfg, params, prompts, mask, jax.random.key(0), num_samples=4, max_new_tokens=12,
                          temperature=0.8, eos_ids=EOS_IDS, pad_id=PAD)
  return prompts, mask, jax.device_get(out)


# ---------------------------------------------------------------------------------------------------------
# The distribution actually sampled.


def _expected_probs(logits, temperature, top_k, top_p):
  """float64 reference of temperature -> top-k -> top-p on one row of logits [V]."""
  scaled = logits.astype(np.float64) / temperature
  if top_k:
    scaled = np.where(scaled < np.sort(scaled)[::-1][top_k - 1], -np.inf, scaled)
  probs = np.exp(scaled - scaled.max())
  probs /= probs.sum()
  if top_p < 1:
    order = np.argsort(-probs, kind="stable")  # the nucleus: shortest prefix reaching top_p
    mass_before = np.cumsum(probs[order]) - probs[order]
    assert np.min(np.abs(mass_before - top_p)) > 1e-4  # the float32 cut cannot land elsewhere
    keep = np.zeros_like(probs, bool)
    keep[order[mass_before < top_p]] = True
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
  return probs


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 6, 1.0),
                                                     (0.7, 0, 0.8), (1.0, 0, 0.9), (0.7, 6, 0.7)])
def test_first_tokens_follow_the_truncated_tempered_softmax(llama, temperature, top_k, top_p):
  cfg, params = llama
  prompts, mask = _prompts(1, lengths=(6,), width=6)
  draws = 20_000
  out = sampling.generate(cfg, params, prompts, mask, jax.random.key(7), num_samples=draws, max_new_tokens=1,
                          temperature=temperature, top_k=top_k, top_p=top_p)
  tokens = np.asarray(out.tokens)[0, :, 0]
  logits = np.asarray(FORWARD(cfg, params, prompts, mask))[0, -1]
  expected = _expected_probs(logits, temperature, top_k, top_p)
  counts = np.bincount(tokens, minlength=VOCAB)
  assert counts[expected == 0].sum() == 0  # nothing outside the support
  support = np.flatnonzero(expected)
  assert len(support) >= 3
  big = expected[support] * draws >= 5  # chi-square needs expected counts >= 5: pool the small ones
  observed = np.append(counts[support][big], counts[support][~big].sum())
  predicted = np.append(expected[support][big], expected[support][~big].sum()) * draws
  keep = predicted > 0
  p_value = stats.chisquare(observed[keep], predicted[keep]).pvalue
  assert p_value > 1e-3, (p_value, observed, predicted)
  # the returned log-probs are those of the sampled distribution and of the model at temperature 1
  np.testing.assert_allclose(np.asarray(out.sample_logprobs)[0, :, 0], np.log(expected[tokens]), atol=1e-5)
  model_logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
  np.testing.assert_allclose(np.asarray(out.model_logprobs)[0, :, 0], model_logp[tokens], atol=1e-5)


def test_temperature_zero_is_greedy(llama):
  cfg, params = llama
  prompts, mask = _prompts(2, lengths=(4, 9), width=9)
  out = sampling.generate(cfg, params, prompts, mask, jax.random.key(0), num_samples=2, max_new_tokens=6,
                          temperature=0.0)
  tokens = np.asarray(out.tokens)
  assert (tokens[:, 0] == tokens[:, 1]).all()  # no randomness
  assert np.asarray(out.sample_logprobs).max() == 0.0
  for row in range(2):  # each greedy token is the argmax of the full forward pass over what came before
    seq = np.concatenate([prompts[row][mask[row]], tokens[row, 0]])[None]
    logits = np.asarray(FORWARD(cfg, params, seq, np.ones_like(seq, bool)))[0]
    np.testing.assert_array_equal(tokens[row, 0], logits[mask[row].sum() - 1:-1].argmax(-1))


# Every family's features through the sampler's loop: windows (3) far shorter than prompt + response, mixed
# sliding / full layers scanned, soft caps, q/k norms, biases, a local RoPE base.
FAMILY_CASES = {
    "qwen2":
        dict(BASE, family="qwen2", qkv_bias=True, tie_embeddings=False),
    "qwen3_scanned":
        dict(BASE, family="qwen3", qk_norm=True, head_dim=12, scan_layers=True),
    "mistral":
        dict(BASE, family="mistral", sliding_window=3),
    "gemma2":
        dict(BASE, family="gemma2", sliding_window=3, query_pre_attn_scalar=6.0, attn_softcap=1.0,
             final_softcap=2.0, layer_types=("sliding_attention", "full_attention")),
    "gemma3_scanned":
        dict(BASE, family="gemma3", num_layers=3, qk_norm=True, sliding_window=3, scan_layers=True,
             layer_types=("sliding_attention", "full_attention", "sliding_attention"), rope_theta=1e6,
             rope_local_theta=1e4, rope_linear_factor=4.0),
}


@pytest.mark.parametrize("name", list(FAMILY_CASES))
def test_greedy_generate_follows_the_forward_in_every_family(name):
  cfg = ModelConfig(**FAMILY_CASES[name])
  params = jax.tree_util.tree_map_with_path(  # biases and norms off their initial 0 / identity
      lambda p, x: x + 0.2 * jax.random.normal(jax.random.key(len(jax.tree_util.keystr(p))), x.shape)
      if re.search("norm|bias", jax.tree_util.keystr(p)) else x, _params(cfg))
  prompts, mask = _prompts(4, lengths=(4, 9), width=9)
  out = sampling.generate(cfg, params, prompts, mask, jax.random.key(0), num_samples=1, max_new_tokens=12,
                          temperature=0.0)
  tokens = np.asarray(out.tokens)[:, 0]
  for row in range(2):
    seq = np.concatenate([prompts[row][mask[row]], tokens[row]])[None]
    logits = np.asarray(FORWARD(cfg, params, seq, np.ones_like(seq, bool)))[0, mask[row].sum() - 1:-1]
    np.testing.assert_array_equal(tokens[row], logits.argmax(-1))
    logp = logits.max(-1) - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) - logits.max(-1)
    np.testing.assert_allclose(np.asarray(out.model_logprobs)[row, 0], logp, atol=1e-5)


def test_inverse_cdf_never_picks_a_zero_probability_token():
  probs = jnp.asarray([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
  uniforms = jnp.asarray([0.0, 0.4999, 0.5, np.nextafter(np.float32(1), np.float32(0))])
  np.testing.assert_array_equal(sampling._inverse_cdf(probs, uniforms), [1, 1, 3, 3])


@pytest.mark.parametrize("vocab", [100, 3000])  # several blocks of the two-level search, a ragged last one
def test_inverse_cdf_matches_a_float64_search_across_blocks(vocab):
  rng = np.random.default_rng(vocab)
  probs = np.zeros(vocab, np.float32)
  support = rng.choice(vocab, 6, replace=False)
  probs[support] = rng.random(6).astype(np.float32)
  uniforms = np.append(np.linspace(0, 1, 4095, endpoint=False), np.nextafter(np.float32(1), np.float32(0)))
  tokens = np.asarray(
      sampling._inverse_cdf(jnp.asarray(np.tile(probs, (4096, 1))), jnp.asarray(uniforms, jnp.float32)))
  cdf = np.cumsum(probs.astype(np.float64))
  np.testing.assert_array_equal(tokens, np.searchsorted(cdf / cdf[-1], uniforms, side="right"))
  assert set(tokens) == set(support)  # every token with mass is reached, none without


# ---------------------------------------------------------------------------------------------------------
# Decode products, cache chunks and EOS semantics.


def test_bfloat16_decode_products_take_bf16_operands_and_accumulate_in_float32():
  """A bf16 x bf16 -> bf16 dot is widened to f32 (weights included, every step) by XLA CPU: 3-4x slower."""
  cfg = ModelConfig(**BASE, compute_dtype="bfloat16")
  params = _params(cfg)
  batch, num_samples = 3, 4
  prompts, mask = _prompts(0, lengths=(7, 3, 10), width=10)
  body = functools.partial(sampling._generate_body, cfg, num_samples=num_samples, max_new_tokens=12,
                           mode=sampling._static_mode(0.8, 0, 1.0), fuse=True)
  text = jax.jit(body).lower(params, prompts, mask, jax.random.key(0), np.float32(0.8), np.float32(1.0),
                             np.zeros(VOCAB, bool), np.int32(PAD)).as_text()
  rows = batch * num_samples
  signatures = [line.rsplit(" : ", 1)[1] for line in text.splitlines() if "stablehlo.dot_general" in line]
  decode_dots = [s for s in signatures if s.startswith(f"(tensor<{rows}x")]
  assert len(decode_dots) >= 4 * cfg.num_layers + 1  # q/k/v, o, gate/up, down per layer; the LM head
  for dot in decode_dots:
    assert re.fullmatch(r"\(tensor<[^>]*xbf16>, tensor<[^>]*xbf16>\) -> tensor<[^>]*xf32>", dot), dot


@pytest.mark.parametrize("num_steps", [1, 15, 16, 17, 63, 128, 129, 1000])
def test_cache_chunks_cover_the_steps_with_16_aligned_blocks(num_steps):
  slots, chunks = decode.chunks(num_steps)
  assert slots % 16 == 0 and 1 <= len(chunks) <= 8 and slots - 16 < -(-num_steps // 8)  # smallest such
  assert [start for start, _ in chunks] == list(range(0, num_steps, slots))
  assert chunks[-1][1] == num_steps and all(stop - start == slots for start, stop in chunks[:-1])


def test_eos_ends_a_response_and_pads_after_it(sampled):
  _, _, out = sampled
  tokens, mask, lengths = out.tokens, out.mask, out.lengths
  assert tokens.shape == mask.shape == out.sample_logprobs.shape == (3, 4, 12) and lengths.shape == (3, 4)
  is_eos = np.isin(tokens, EOS_IDS) & mask
  first_eos = np.where(is_eos.any(-1), is_eos.argmax(-1), 12)
  np.testing.assert_array_equal(lengths, np.minimum(first_eos + 1, 12))
  np.testing.assert_array_equal(mask, np.arange(12) < lengths[..., None])
  assert (tokens[~mask] == PAD).all() and (tokens[mask] != PAD).any()
  assert (out.sample_logprobs[~mask] == 0).all() and (out.model_logprobs[~mask] == 0).all()
  assert (out.sample_logprobs[mask] < 0).all()
  assert (lengths < 12).sum() >= 3 and (lengths == 12).sum() >= 1  # both kinds of rows occur


def test_loop_stops_when_every_row_hit_eos_and_values_do_not_recompile(llama, sampled):
  cfg, params = llama
  prompts, mask, _ = sampled
  traces = sampling.TRACE_COUNT["generate"]
  out = sampling.generate(cfg, params, prompts, mask, jax.random.key(0), num_samples=4, max_new_tokens=12,
                          temperature=0.9, eos_ids=tuple(range(VOCAB)), pad_id=31)
  assert sampling.TRACE_COUNT["generate"] == traces  # temperature, EOS ids and pad id are traced values
  np.testing.assert_array_equal(np.asarray(out.lengths), 1)
  assert (np.asarray(out.tokens)[:, :, 1:] == 31).all()


# ---------------------------------------------------------------------------------------------------------
# Determinism: meshes, padding, batch mates, forking; compilation count.


def test_same_samples_on_one_device_and_the_8_device_mesh(llama):
  cfg, params = llama
  prompts, mask = _prompts(5, lengths=(4, 9, 1, 6), width=9)
  kwargs = dict(num_samples=2, max_new_tokens=10, temperature=1.0, top_k=12, eos_ids=EOS_IDS, pad_id=PAD)
  single = sampling.generate(cfg, params, prompts, mask, jax.random.key(3), **kwargs)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  logical = sharding.logical_specs(jax.eval_shape(lambda r: transformer.init_boxed(cfg, r),
                                                  jax.random.key(0)))
  placed = sharding.place(params, logical, mesh)
  multi = sampling.generate(cfg, placed, prompts, mask, jax.random.key(3), **kwargs)
  assert multi.tokens.sharding.mesh.size == 8
  np.testing.assert_array_equal(np.asarray(single.tokens), np.asarray(multi.tokens))
  np.testing.assert_allclose(np.asarray(single.model_logprobs), np.asarray(multi.model_logprobs), atol=1e-5)


# Every family, the first two and Llama 3 RoPE scaling included (test_same_samples_on_one_device... above
# covers plain llama with top-k).
MESH_CASES = {
    **FAMILY_CASES, "gemma": dict(BASE, family="gemma"),
    "llama3_rope": dict(BASE, rope_theta=5e5, rope_llama3_scaling=(8.0, 1.0, 4.0, 32))
}


@pytest.mark.parametrize("name", list(MESH_CASES))
def test_every_family_samples_the_same_on_one_device_and_the_8_device_mesh(name):
  cfg = ModelConfig(**MESH_CASES[name])
  params = _params(cfg)
  prompts, mask = _prompts(4, lengths=(4, 9, 1), width=9)
  kwargs = dict(num_samples=2, max_new_tokens=10, temperature=1.0, eos_ids=EOS_IDS, pad_id=PAD)
  single = sampling.generate(cfg, params, prompts, mask, jax.random.key(3), **kwargs)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  placed = sharding.place(params, params_lib.logical_axes(cfg, "lm"), mesh)
  multi = sampling.generate(cfg, placed, prompts, mask, jax.random.key(3), **kwargs)
  assert multi.tokens.sharding.mesh.size == 8
  np.testing.assert_array_equal(np.asarray(single.tokens), np.asarray(multi.tokens))
  np.testing.assert_allclose(np.asarray(single.model_logprobs), np.asarray(multi.model_logprobs), atol=1e-5)


def test_compact_sizes_are_whole_multiples_of_r_over_k_per_batch_shard():
  assert sampling.compact_sizes(64, 8) == [56, 48, 40, 32, 24, 16, 8]
  assert sampling.compact_sizes(16, 8, shards=4) == [12, 8, 4]
  assert sampling.compact_sizes(12, 8) == [9, 6, 3]  # 12 * j / 8 whole for even j only
  assert sampling.compact_sizes(64, 2) == [32]
  assert sampling.compact_sizes(3, 2) == []


# Compaction runs from the second cache chunk on (16 slots each), so 40 new tokens: three chunks.
COMPACT_KWARGS = dict(num_samples=4, max_new_tokens=40, temperature=1.0, eos_ids=EOS_IDS, pad_id=PAD)


def _assert_compaction_ran(lengths, rows: int):
  """Enough rows ended by the second chunk for a compacted variant to run, and some rows outlived it."""
  live = int((np.asarray(lengths) > 17).sum())
  assert 0 < live <= rows // 2, live


def test_compacting_finished_rows_gives_the_same_samples():
  """Gathering the live rows (their prompt cache, blocks, uniforms, outputs) into fewer rows changes no
  sample: every row is decoded by the same math, only its prompt read is per row once compacted. Scanned
  layers, mixed sliding and full ones (the windows' masks are the same for every row); the unrolled llama
  below, on the 8-device mesh."""
  cfg, k = ModelConfig(**FAMILY_CASES["gemma3_scanned"]), 2
  params = _params(cfg)
  prompts, mask = _prompts(6, lengths=(4, 9, 1, 6), width=9)
  plain = sampling.generate(cfg, params, prompts, mask, jax.random.key(7), **COMPACT_KWARGS)
  compact = sampling.generate(cfg, params, prompts, mask, jax.random.key(7), compact_rows=k, **COMPACT_KWARGS)
  _assert_compaction_ran(plain.lengths, 16)
  for field in ("tokens", "mask", "lengths"):
    np.testing.assert_array_equal(np.asarray(getattr(plain, field)), np.asarray(getattr(compact, field)))
  for field in ("sample_logprobs", "model_logprobs"):
    np.testing.assert_allclose(np.asarray(getattr(plain, field)), np.asarray(getattr(compact, field)),
                               atol=1e-5)


def test_compacting_on_the_8_device_mesh_gives_the_one_device_samples(llama):
  cfg, params = llama
  prompts, mask = _prompts(6, lengths=(4, 9, 1, 6), width=9)
  single = sampling.generate(cfg, params, prompts, mask, jax.random.key(7), **COMPACT_KWARGS)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  placed = sharding.place(params, params_lib.logical_axes(cfg, "lm"), mesh)
  multi = sampling.generate(cfg, placed, prompts, mask, jax.random.key(7), compact_rows=4, **COMPACT_KWARGS)
  assert multi.tokens.sharding.mesh.size == 8
  _assert_compaction_ran(single.lengths, 16)
  np.testing.assert_array_equal(np.asarray(single.tokens), np.asarray(multi.tokens))
  np.testing.assert_allclose(np.asarray(single.model_logprobs), np.asarray(multi.model_logprobs), atol=1e-5)


def test_samples_do_not_depend_on_padding_or_batch_mates(llama, sampled):
  cfg, params = llama
  prompts, mask, out = sampled
  other, other_mask = _prompts(9, lengths=(14, 2, 11), width=16)  # longer mates: row 0 gets more padding
  other[0, -7:], other_mask[0] = prompts[0, -7:], np.arange(16) >= 9  # same prompt 0 (7 tokens)
  again = sampling.generate(cfg, params, other, other_mask, jax.random.key(0), num_samples=4,
                            max_new_tokens=12, temperature=0.8, eos_ids=EOS_IDS, pad_id=PAD)
  np.testing.assert_array_equal(np.asarray(again.tokens)[0], out.tokens[0])
  np.testing.assert_allclose(np.asarray(again.model_logprobs)[0], out.model_logprobs[0], atol=1e-5)
  assert not np.array_equal(np.asarray(again.tokens)[1], out.tokens[1])  # other rows did change


def test_forking_the_prompt_cache_equals_repeating_the_prompt(llama, sampled):
  cfg, params = llama
  prompts, mask, out = sampled
  repeated = sampling.generate(cfg, params, np.repeat(prompts, 4, 0), np.repeat(mask, 4,
                                                                                0), jax.random.key(0),
                               num_samples=1, max_new_tokens=12, temperature=0.8, eos_ids=EOS_IDS, pad_id=PAD)
  np.testing.assert_array_equal(np.asarray(repeated.tokens).reshape(3, 4, 12), out.tokens)
  np.testing.assert_allclose(
      np.asarray(repeated.sample_logprobs).reshape(3, 4, 12), out.sample_logprobs, atol=1e-5)


def test_new_prompts_of_a_bucketed_length_do_not_recompile(llama):
  cfg, params = llama
  kwargs = dict(num_samples=2, max_new_tokens=5, temperature=1.0, top_p=0.9, eos_ids=EOS_IDS, pad_id=PAD)
  first, first_mask = _prompts(10, lengths=(3, 12), width=12)
  sampling.generate(cfg, params, first, first_mask, jax.random.key(0), **kwargs)
  traces = sampling.TRACE_COUNT["generate"]
  for seed, lengths, width in [(11, (9, 16), 16), (12, (5, 2), 20), (13, (1, 11), 11)]:  # all bucket to 16
    prompts, mask = _prompts(seed, lengths, width)
    out = sampling.generate(cfg, params, prompts, mask, jax.random.key(seed), **kwargs)
    assert out.tokens.shape == (2, 2, 5)
  assert sampling.TRACE_COUNT["generate"] == traces
  assert [sampling.bucket_length(n) for n in (1, 16, 17, 33, 100)] == [16, 16, 32, 64, 128]
  assert sampling.bucket_length(100, limit=110) == 110 and sampling.bucket_length(120, limit=110) == 120


def test_a_fixed_prompt_width_compiles_once_and_gives_the_same_samples(llama, sampled):
  """The trainer passes its own padding bucket: prompts whose longest row buckets to 16 or to 32 share
  one compilation at prompt_width=40, and the samples are the bucketed ones (padding never matters)."""
  cfg, params = llama
  prompts, mask, out = sampled
  kwargs = dict(num_samples=4, max_new_tokens=12, temperature=0.8, eos_ids=EOS_IDS, pad_id=PAD,
                prompt_width=40)
  wide = sampling.generate(cfg, params, prompts, mask, jax.random.key(0), **kwargs)
  np.testing.assert_array_equal(np.asarray(wide.tokens), out.tokens)
  traces = sampling.TRACE_COUNT["generate"]
  longer, longer_mask = _prompts(5, lengths=(20, 30, 4), width=30)  # would bucket to 32
  sampling.generate(cfg, params, longer, longer_mask, jax.random.key(0), **kwargs)
  assert sampling.TRACE_COUNT["generate"] == traces
  with pytest.raises(
      ValueError, match=r"prompt_width=8 is not allowed: need the longest prompt \(10\) <= "
      r"prompt_width <= max_seq_len - max_new_tokens = 52"):
    sampling.generate(cfg, params, prompts, mask, jax.random.key(0), **(kwargs | dict(prompt_width=8)))


# ---------------------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("change,message", [
    (dict(num_samples=0), r"num_samples=0 is not allowed: need an integer >= 1"),
    (dict(top_p=0.0), r"top_p=0.0 is not allowed: need 0 < top_p <= 1"),
    (dict(top_p=1.5), r"top_p=1.5 is not allowed: need 0 < top_p <= 1"),
    (dict(compact_rows=1), r"compact_rows=1 is not allowed: need 0 \(off\) or an integer >= 2"),
    (dict(top_k=-1), r"top_k=-1 is not allowed: need an integer >= 0"),
    (dict(temperature=-0.5), r"temperature=-0.5 is not allowed: need temperature >= 0"),
    (dict(max_new_tokens=0), r"max_new_tokens=0 is not allowed: need an integer >= 1"),
    (dict(max_new_tokens=60),
     r"prompt length 5 \+ max_new_tokens 60 = 65 exceeds the context max_seq_len=64"),
    (dict(eos_ids=(32,)), r"eos id 32 is not allowed: need 0 <= id < vocab_size=32"),
])
def test_bad_sampling_arguments_raise_one_line_errors(llama, change, message):
  cfg, params = llama
  prompts, mask = _prompts(0, lengths=(5, 2), width=5)
  kwargs = dict(num_samples=2, max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0) | change
  with pytest.raises(ValueError, match=message):
    sampling.generate(cfg, params, prompts, mask, jax.random.key(0), **kwargs)


def test_bad_prompts_raise_one_line_errors(llama):
  cfg, params = llama
  prompts, mask = _prompts(0, lengths=(5, 0, 3), width=5)
  with pytest.raises(ValueError, match=r"prompt row 1 is empty \(prompt_mask has no True\)"):
    sampling.generate(cfg, params, prompts, mask, jax.random.key(0), num_samples=1, max_new_tokens=2)
  with pytest.raises(ValueError, match=r"prompt_mask is not left-padded"):
    sampling.generate(cfg, params, prompts[2:], mask[2:, ::-1], jax.random.key(0), num_samples=1,
                      max_new_tokens=2)
