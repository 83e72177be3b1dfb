"""Sampling throughput: bond_jax.sampling.generate vs transformers' generate on the same weights (CPU).

    python -m bench.sampling [--presets=tiny,small] [--dtypes=float32,bfloat16] [--repeats=3]
                             [--cpu_devices=D]

Per preset: random weights, exported with hf.export and loaded by transformers (torch), in each row's
dtype on both sides (bfloat16: torch runs the model in bf16, we compute in bf16 with f32 accumulation). Both
sample B prompts x N samples (transformers: num_return_sequences=N) of exactly T new tokens (no EOS) at
temperature 1 without truncation. Tokens/s counts new tokens (B * N * T) over the whole call, prefill
included; each number is the best of --repeats runs after one warm-up (compilation excluded). The two
are timed in alternation (theirs, ours, theirs, ours, ...): this VM's speed changes by ~1.5x over
minutes (BENCHMARKS.md), so timing one after the other would compare different machines. The table's
ratio is best over best; "paired" lists each round's ratio of adjacent runs, and their median is the
figure that a phase switch moves least.
Also reported: forking (one prefill per prompt, shared prompt cache) vs repeating each prompt N times,
our decode FLOP/s as a fraction of a jnp matmul peak measured here in the same dtype, and a floor: the
decode steps' weight products alone (q/k/v, o, gate/up, down per layer and the LM head, on B * N rows,
chained over T - 1 steps in one jitted loop, timed in the same alternation). "products share" is the floor
over our time, and "ceiling" is transformers' time over the floor: the ratio that would be reached if
attention, sampling and everything else in a step were free, at this backend's product speed.
--cpu_devices=D splits the host CPU into D JAX devices (`jax_num_cpu_devices`) and runs ours, and the
floor, with the B * N rows split over a data mesh of all of them; transformers is unchanged. XLA CPU runs
each op of a device on a shared thread pool, so small decode ops (a tiny step has ~150) parallelise
poorly inside one device; D = cores runs D independent streams of them instead (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bond_jax import hf, sampling, sharding
from bond_jax.models import decode, presets, transformer
from bond_jax.models import layers as model_layers


def _best_time(fn, repeats: int) -> float:
  fn()  # warm-up: compiles
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def _alternating_times(fns, repeats: int) -> list[list[float]]:
  """Seconds of each fn in fns, called in turn `repeats` rounds after one warm-up call each."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, out in zip(fns, times):
      start = time.perf_counter()
      fn()
      out.append(time.perf_counter() - start)
  return times


def matmul_peak(dtype, mesh=None, size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a jitted [size, size] @ [size, size] product (float32 accumulation for bf16), on the default
  device, or with its rows split over mesh's batch axes like our sampler's."""
  a = np.random.default_rng(0).standard_normal((size, size)).astype(dtype)
  a = jnp.asarray(a) if mesh is None else sharding.shard_batch(a, mesh)
  b = jnp.asarray(np.random.default_rng(1).standard_normal((size, size)), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  seconds = _best_time(lambda: f(a, b).block_until_ready(), repeats)
  return 2 * size**3 / seconds


def decode_flops(cfg, batch: int, num_samples: int, prompt_len: int, new_tokens: int) -> float:
  """Matmul + attention FLOPs of the decode steps (the first token comes from the prefill)."""
  d, h, kv, hd, m = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_token = 2 * (cfg.num_layers * (d * hd * (h + 2 * kv) + h * hd * d + 3 * d * m) + d * cfg.vocab_size)
  total = 0.0
  for step in range(1, new_tokens):
    context = prompt_len + step
    total += per_token + cfg.num_layers * 4 * h * hd * context
  return total * batch * num_samples


def weight_products_floor(cfg, params, rows: int, steps: int, mesh):
  """A fn running the decode steps' weight products alone: `steps` chained steps on [rows, D], in the
  compute dtype of cfg, the rows split over mesh's batch axes as `generate` splits them. The weights are
  the sampler's own decode matrices (fused q/k/v and gate/up, the [D, V] head), so the floor differs from
  a decode step only by what a step does besides these products.
  """
  weights = decode.decode_weights(cfg, params, fuse=True)
  layers = weights.layers
  if cfg.scan_layers:
    layers = [jax.tree.map(lambda w, i=i: w[i], layers) for i in range(cfg.num_layers)]
  head = weights.head
  attn_width = cfg.num_heads * cfg.head_dim

  @jax.jit
  def run(layers, head, x):

    def step(_, x):
      for p in layers:
        heads = model_layers.dense(x,
                                   p["attn"]["qkv"])[:, :attn_width].reshape(-1, cfg.num_heads, cfg.head_dim)
        x = x + model_layers.dense(heads, p["attn"]["o"], "rhk,hkd->rd")
        x = x + decode.mlp(cfg, p["mlp"], x)
      logits = decode.lm_logits(head, x)
      return x + (1e-3 * logits[:, :cfg.d_model]).astype(x.dtype)  # keeps the head's product live

    return jax.lax.fori_loop(0, steps, step, x)

  x = sharding.shard_batch(np.full((rows, cfg.d_model), 0.01, jnp.dtype(cfg.dtype)), mesh)
  return lambda: run(layers, head, x).block_until_ready()


def run_preset(name: str, dtypes, batch: int, num_samples: int, prompt_len: int, new_tokens: int,
               repeats: int, threads: int):
  import torch
  import transformers
  torch.set_num_threads(threads)
  cfg = presets.get(name)
  mesh = sharding.make_mesh({"data": -1})
  params, _ = sharding.init_sharded(lambda r: transformer.init_boxed(cfg, r), jax.random.key(0), mesh)
  prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  mask = np.ones_like(prompts, bool)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    hf.export(params, cfg, os.path.join(tmp, "m"), bos_id=2, eos_id=1, pad_id=0)
    models = {
        dtype:
            transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "m"),
                                                              dtype=getattr(torch, dtype)).eval()
        for dtype in dtypes
    }

    def theirs(dtype):
      model = models[dtype]
      with torch.no_grad():
        out = model.generate(torch.tensor(prompts, dtype=torch.long), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             num_return_sequences=num_samples, eos_token_id=None, pad_token_id=0)
      assert out.shape == (batch * num_samples, prompt_len + new_tokens)

    torch.manual_seed(0)
    tokens = batch * num_samples * new_tokens
    for dtype in dtypes:
      rows.append(
          _time_dtype(cfg, params, prompts, mask, dtype, functools.partial(theirs, dtype), name, batch,
                      num_samples, prompt_len, new_tokens, repeats, tokens))
  return rows


def _time_dtype(cfg, params, prompts, mask, dtype, theirs, name, batch, num_samples, prompt_len, new_tokens,
                repeats, tokens):
  """One table row: ours in `dtype` (forked and with repeated prompts) timed in alternation with theirs."""
  cfg_d = cfg.replace(compute_dtype=dtype)
  mesh = sampling._mesh_of(params, None)
  peak = matmul_peak(jnp.float32 if dtype == "float32" else jnp.bfloat16, mesh)

  def ours(p=prompts, m=mask, n=num_samples):
    out = sampling.generate(cfg_d, params, p, m, jax.random.key(1), num_samples=n, max_new_tokens=new_tokens,
                            temperature=1.0)
    out.tokens.block_until_ready()

  rep_p, rep_m = np.repeat(prompts, num_samples, 0), np.repeat(mask, num_samples, 0)
  floor = weight_products_floor(cfg_d, params, batch * num_samples, new_tokens - 1, mesh)
  times_theirs, times_ours, times_repeat, times_floor = _alternating_times(
      [theirs, ours, lambda: ours(rep_p, rep_m, 1), floor], repeats)
  t_theirs, t_ours, t_repeat, t_floor = (
      min(t) for t in (times_theirs, times_ours, times_repeat, times_floor))
  flops = decode_flops(cfg, batch, num_samples, prompt_len, new_tokens)
  return dict(preset=name, dtype=dtype, theirs=tokens / t_theirs, ours=tokens / t_ours,
              ratio=t_theirs / t_ours, paired=[a / b for a, b in zip(times_theirs, times_ours)],
              fork_gain=t_repeat / t_ours, flops=flops / t_ours, peak=peak, products_share=t_floor / t_ours,
              ceiling=t_theirs / t_floor)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--presets", default="tiny,small")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--num_samples", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  parser.add_argument(
      "--cpu_devices", type=int, default=None,
      help="JAX CPU devices to split the host into (default: as the environment sets it, "
      "1 unless XLA_FLAGS says otherwise); ours runs its rows over all devices")
  args = parser.parse_args()
  rows = args.batch * args.num_samples
  if args.cpu_devices is not None:
    if args.cpu_devices < 1 or rows % args.cpu_devices:
      parser.error(f"--cpu_devices={args.cpu_devices} is not allowed: need >= 1 and dividing B * N = {rows}")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before the first jax.devices()
  elif rows % jax.device_count():
    parser.error(f"{jax.device_count()} JAX devices (from the environment, e.g. XLA_FLAGS) do not divide "
                 f"B * N = {rows}: pass --cpu_devices or other --batch / --num_samples")
  print(f"B={args.batch} prompts x N={args.num_samples}, {args.prompt_len}-token prompts, "
        f"{args.new_tokens} new tokens, temperature 1, ours on {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, torch threads {args.threads}")
  header = (
      "| preset | compute | transformers tok/s | bond_jax tok/s | ratio | paired median | fork vs repeat | "
      "decode GFLOP/s | of matmul peak | products share | ceiling | paired ratios |")
  print(header)
  print("|---" * (header.count("|") - 1) + "|")
  for name in args.presets.split(","):
    for row in run_preset(name, args.dtypes.split(","), args.batch, args.num_samples, args.prompt_len,
                          args.new_tokens, args.repeats, args.threads):
      print(
          f"| {row['preset']} | {row['dtype']} | {row['theirs']:,.0f} | {row['ours']:,.0f} | "
          f"{row['ratio']:.2f}x | {np.median(row['paired']):.2f}x | {row['fork_gain']:.2f}x | "
          f"{row['flops'] / 1e9:.1f} | "
          f"{row['flops'] / row['peak']:.0%} of {row['peak'] / 1e9:.0f} | "
          f"{row['products_share']:.0%} | {row['ceiling']:.2f}x | "
          f"{' '.join(f'{r:.2f}' for r in row['paired'])} |", flush=True)


if __name__ == "__main__":
  main()
