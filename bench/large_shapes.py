"""1B-class shapes on one accelerator: decode tokens/s against the HBM-bandwidth bound, and the J-BOND
update's MFU (bench/gpu.sh runs it first).

    python -m bench.large_shapes [--presets=llama_1b,gemma_2b] [--batch=64] [--prompt_len=128]
        [--new_tokens=128] [--update_batch=16] [--repeats=2] [--overrides=num_layers=1,vocab_size=1024]

Random weights in the presets' dtypes (bfloat16 compute). Decode: sampling.generate of --batch prompts x 1
sample, exactly --new_tokens tokens (no EOS), temperature 1; tokens/s counts new tokens over the whole
call (prefill included). Its bound: every decode step reads all the weights (compute dtype) and the KV
cache written so far once from HBM, so rows / (bytes per step / HBM bandwidth) tokens/s is the most a
bandwidth-bound decoder reaches; the fraction shown is measured / bound. Update: the J-BOND step
(update.make_jbond_step on scoring.sequence_logprob_fn, Adam) on a batch of --update_batch prompts with
1 policy + 2 anchor rows each; MFU counts the model FLOPs that step computes (the policy's forward and
backward (3x) of each prompt once and its 2 responses, the anchor's and the reference's forwards of the
policy rows, the LM head on response positions only, attention included, rematerialisation excluded)
over the step time and the device's dense bf16 peak. Peaks and bandwidths are the vendors' figures for
the cards named below (another card: pass --peak_tflops and --hbm_gbps); on CPU the peak is a jitted
bf16 matmul measured here and the bandwidth is unknown (n/a).
--overrides shrinks a preset for a smoke run (tests/test_bench.py: 1 layer, small vocabulary, CPU).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.sampling import _best_time, matmul_peak
from bond_jax import sampling, scoring, sharding, update
from bond_jax.models import params as params_lib
from bond_jax.models import presets

# device_kind substring -> (dense bf16 TFLOP/s, HBM GB/s), vendor figures (SXM parts)
CARDS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0), "L4": (121.0, 300.0)}


def body_flops(cfg) -> float:
  """Matmul FLOPs per token of the layers (no LM head)."""
  d, h, kv, hd, m = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  return 2.0 * cfg.num_layers * (d * hd * (h + 2 * kv) + h * hd * d + 3 * d * m)


def update_flops(cfg, batch: int, prompt_len: int, new_tokens: int) -> float:
  """Model FLOPs of one J-BOND update as scoring computes it (see the module docstring)."""
  head = 2.0 * cfg.d_model * cfg.vocab_size
  attention = lambda queries, keys: 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * queries * keys
  length = prompt_len + new_tokens
  policy = (batch * prompt_len * body_flops(cfg) + 2 * batch * new_tokens * (body_flops(cfg) + head) +
            attention(batch * prompt_len, prompt_len / 2) + attention(2 * batch * new_tokens, length))
  no_grad = batch * length * body_flops(cfg) + batch * new_tokens * head + attention(
      batch * length, length / 2)
  return 3 * policy + 2 * no_grad


def decode_bytes(cfg, rows: int, prompt_len: int, new_tokens: int) -> float:
  """HBM bytes one average decode step reads: every matmul weight and the KV cache so far."""
  itemsize = jnp.dtype(cfg.dtype).itemsize
  weights = (body_flops(cfg) / 2 + cfg.d_model * cfg.vocab_size) * itemsize
  cache_slots = prompt_len + new_tokens / 2
  cache = rows * cache_slots * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize
  return weights + cache


def card(args) -> tuple[str, float, float | None]:
  """(device name, dense bf16 FLOP/s, HBM bytes/s or None)."""
  device = jax.devices()[0]
  name = getattr(device, "device_kind", device.platform)
  known = next((v for k, v in CARDS.items() if k in name), None)
  peak = args.peak_tflops * 1e12 if args.peak_tflops else known[0] * 1e12 if known else None
  hbm = args.hbm_gbps * 1e9 if args.hbm_gbps else known[1] * 1e9 if known else None
  if peak is None:  # CPU or an unknown card: a bf16 matmul measured here
    peak = matmul_peak(jnp.bfloat16)
  return name, peak, hbm


def _jbond_batch(cfg, batch: int, prompt_len: int, new_tokens: int, rng) -> update.JBondBatch:
  """Random joined rows [prompt | response] of 1 policy + 2 anchor samples per prompt."""
  prompts = rng.integers(4, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  responses = rng.integers(4, cfg.vocab_size, (batch, 3, new_tokens)).astype(np.int32)
  rows = scoring.join(prompts, np.ones_like(prompts, bool), responses, np.ones_like(responses, bool))
  rewards = jnp.asarray(rng.standard_normal((batch, 3)), jnp.float32)
  return update.JBondBatch(policy_tokens=rows.tokens[:, 0], policy_mask=rows.response_mask[:, 0],
                           policy_rewards=rewards[:, 0], anchor_tokens=rows.tokens[:, 1:],
                           anchor_mask=rows.response_mask[:, 1:], anchor_rewards=rewards[:, 1:])


def run_preset(name: str, args, peak: float, hbm: float | None) -> str:
  overrides = dict(kv.split("=") for kv in args.overrides.split(",") if kv)
  overrides = {k: int(v) for k, v in overrides.items()}
  cfg = presets.get(name, max_seq_len=args.prompt_len + args.new_tokens, **overrides)
  mesh = sharding.make_mesh({"fsdp": -1})
  rng = np.random.default_rng(0)
  params = params_lib.init_sharded(cfg, "lm", jax.random.key(0), mesh)
  prompts = rng.integers(4, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
  prompts, mask = sharding.shard_batch((prompts, np.ones_like(prompts, bool)), mesh)
  with jax.set_mesh(mesh):
    decode_s = _best_time(
        lambda: jax.block_until_ready(
            sampling.generate(cfg, params, prompts, mask, jax.random.key(1), num_samples=1, max_new_tokens=
                              args.new_tokens, mesh=mesh)), args.repeats)
    optimizer = update.make_optimizer(update.OptimizerConfig(learning_rate=1e-5))
    state = update.new_state(jax.tree.map(jnp.copy, params), optimizer, mesh, params)
    step = update.make_jbond_step(scoring.sequence_logprob_fn(cfg, 0, response_width=args.new_tokens),
                                  optimizer, mesh=mesh, state_sharding=sharding.shardings_of(state),
                                  ref_sharding=sharding.shardings_of(params))
    batch = _jbond_batch(cfg, args.update_batch, args.prompt_len, args.new_tokens, rng)
    holder = {"state": state}

    def run_update():
      holder["state"], metrics = step(holder["state"], params, batch)
      jax.block_until_ready(metrics)

    update_s = _best_time(run_update, args.repeats)
  tokens_s = args.batch * args.new_tokens / decode_s
  bound = "n/a"
  if hbm is not None:
    bound_s = args.batch / (decode_bytes(cfg, args.batch, args.prompt_len, args.new_tokens) / hbm)
    bound = f"{bound_s:,.0f} ({100 * tokens_s / bound_s:.0f}%)"
  flops = update_flops(cfg, args.update_batch, args.prompt_len, args.new_tokens)
  return (
      f"| {name} | {cfg.num_params() / 1e9:.2f}B | {cfg.compute_dtype} | {args.batch} | {tokens_s:,.0f} | "
      f"{bound} | {args.update_batch} x 3 | {update_s * 1e3:.0f} ms | {flops / update_s / 1e12:.2f} | "
      f"{100 * flops / update_s / peak:.1f}% |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="llama_1b,gemma_2b")
  parser.add_argument("--batch", type=int, default=64, help="decode rows (prompts x 1 sample)")
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--update_batch", type=int, default=16, help="prompts of the J-BOND update")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--overrides", default="", help="preset fields, e.g. num_layers=1,vocab_size=1024")
  parser.add_argument("--peak_tflops", type=float, default=0.0)
  parser.add_argument("--hbm_gbps", type=float, default=0.0)
  args = parser.parse_args()
  name, peak, hbm = card(args)
  print(f"device: {jax.device_count()} x {name}; dense bf16 peak {peak / 1e12:.1f} TFLOP/s; HBM "
        f"{'n/a' if hbm is None else f'{hbm / 1e9:,.0f} GB/s'}"
        f"{'; overrides ' + args.overrides if args.overrides else ''}")
  print(f"decode: {args.prompt_len}-token prompts, {args.new_tokens} new tokens; update: rows of "
        f"{args.prompt_len} + {args.new_tokens} tokens\n")
  print("| preset | params | compute | decode rows | decode tok/s | HBM bound tok/s | update rows | update | "
        "update TFLOP/s | update MFU |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for preset in args.presets.split(","):
    print(run_preset(preset, args, peak, hbm), flush=True)


if __name__ == "__main__":
  main()
