"""Sampling throughput: bond_jax's generate vs transformers' and vLLM's, on the same weights (CPU).

    python -m bench.sampling [--presets=tiny,small] [--dtypes=float32,bfloat16] [--scenarios=short,long,eos]
                             [--peers=transformers,vllm] [--repeats=3] [--cpu_devices=D]

Per preset: random weights, exported with hf.export and loaded by transformers (torch) and by vLLM's CPU
build (bench/vllm_peer.py, a subprocess in its own venv: `bash bench/setup_vllm.sh` makes bench/.venv-vllm;
token-id prompts, no tokenizer), in each row's dtype on all sides (bfloat16: torch and vLLM run the model
in bf16, we compute in bf16 with f32 accumulation). Rows (--scenarios): short = B prompts of P tokens x N
samples of exactly T new tokens; long = --long_batch prompts of --long_prompt_len tokens x
--long_num_samples samples (a long prompt shared by many samples: where a shared prompt cache counts);
eos = the short shapes with the lowest vocab/32 ids ending a response (variable lengths: where stopping
finished rows counts). All sample at temperature 1 without truncation. Tokens/s counts new tokens
(EOS included) over the whole call, prefill included; each number is the best of --repeats runs after one
warm-up (compilation excluded). The sides are timed in alternation (transformers, ours, vLLM, ...): this
VM's speed changes by ~1.5x over minutes (BENCHMARKS.md), so timing one after the other would compare
different machines. The ratios are best over best; "paired" lists each round's ratio of adjacent runs
(EOS rows: scaled by the last calls' token counts), and their median is the figure that a phase switch
moves least. Without the vLLM venv one line says so and its columns read n/a.
EOS rows run ours with --compact_rows=K (default 8: each cache chunk after the first decodes only the
live rows, gathered into a multiple of R / K; sampling.generate's compact_rows) and report it against the
same call with finished rows riding along ("compact vs plain", timed in the same alternation).
Short rows also report forking (one prefill per prompt, shared prompt cache) vs repeating each prompt N
times, and a floor: the decode steps' weight products alone (q/k/v, o, gate/up, down per layer and the LM
head, on B * N rows, chained over T - 1 steps in one jitted loop, timed in the same alternation).
"products share" is the floor over our time, and "ceiling" is transformers' time over the floor: the ratio
that would be reached if attention, sampling and everything else in a step were free, at this backend's
product speed. "of matmul peak" is our decode FLOP/s over a jnp matmul measured here in the same dtype.
--cpu_devices=D splits the host CPU into D JAX devices (`jax_num_cpu_devices`) and runs ours, and the
floor, with the B * N rows split over a data mesh of all of them; the peers are unchanged. XLA CPU runs
each op of a device on a shared thread pool, so small decode ops (a tiny step has ~150) parallelise
poorly inside one device; D = cores runs D independent streams of them instead (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from typing import NamedTuple

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


VLLM_PYTHON = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".venv-vllm", "bin", "python")


class Scenario(NamedTuple):
  """One kind of row: B prompts of P tokens x N samples of up to T tokens; eos: a response ends at any of
  the lowest vocab/32 ids from 1 on (variable lengths, ~T/2 on random weights at T = 64) instead of
  running to exactly T."""
  name: str
  batch: int
  num_samples: int
  prompt_len: int
  new_tokens: int
  eos: bool

  def eos_ids(self, vocab_size: int) -> tuple[int, ...]:
    return tuple(range(1, 1 + vocab_size // 32)) if self.eos else ()


class VllmPeer:
  """vLLM (bench/vllm_peer.py) in the peer venv, as a subprocess serving one exported model."""

  def __init__(self, model_dir: str, dtype: str):
    # every core for its compute, as the other sides get (by default it keeps one for its engine loop);
    # its log goes to a file beside the model, shown when it fails
    self.log_path = os.path.join(os.path.dirname(model_dir), f"vllm_{dtype}.log")
    self.log = open(self.log_path, "w")
    self.proc = subprocess.Popen(
        [VLLM_PYTHON, os.path.join(os.path.dirname(__file__), "vllm_peer.py"), model_dir, dtype],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
        env=dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0"))
    self._read()

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith("@@ "):
        return json.loads(line[3:])
    self.log.flush()
    tail = open(self.log_path).read()[-3000:]
    raise RuntimeError(f"the vLLM peer exited (code {self.proc.wait()}); its log ends:\n{tail}")

  def generate(self, prompts: np.ndarray, scenario: Scenario, eos_ids: tuple[int, ...]) -> int:
    request = dict(prompts=prompts.tolist(), n=scenario.num_samples, max_tokens=scenario.new_tokens,
                   stop_ids=list(eos_ids))
    self.proc.stdin.write(json.dumps(request) + "\n")
    self.proc.stdin.flush()
    return self._read()["tokens"]

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=120)
    self.log.close()


def _new_tokens(generated: np.ndarray, eos_ids) -> int:
  """Tokens of right-padded responses [R, T] up to and including each one's first EOS."""
  if not eos_ids:
    return generated.size
  ended = np.isin(generated, eos_ids)
  return int(np.where(ended.any(-1), ended.argmax(-1) + 1, generated.shape[-1]).sum())


def run_preset(name: str, dtypes, scenarios, peers, repeats: int, threads: int, compact_rows: int):
  import torch
  import transformers
  torch.set_num_threads(threads)
  cfg = presets.get(name)
  mesh = sharding.make_mesh({"data": -1})
  params, _ = sharding.init_sharded(lambda r: transformer.init_boxed(cfg, r), jax.random.key(0), mesh)
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = os.path.join(tmp, "m")
    hf.export(params, cfg, model_dir, bos_id=2, eos_id=1, pad_id=0)
    for dtype in dtypes:
      model = None
      if "transformers" in peers:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch,
                                                                                           dtype)).eval()
      peer = VllmPeer(model_dir, dtype) if "vllm" in peers else None
      try:
        for scenario in scenarios:  # each row as soon as it is measured
          yield _time_row(cfg, params, model, peer, dtype, name, scenario, repeats, compact_rows)
      finally:
        if peer is not None:
          peer.close()


def _time_row(cfg, params, model, peer, dtype, name, scenario: Scenario, repeats, compact_rows: int):
  """One table row: transformers, vLLM and ours in `dtype`, timed in alternation (short rows: also ours
  with repeated prompts, and the weight-products floor)."""
  import torch
  cfg_d = cfg.replace(compute_dtype=dtype)
  mesh = sampling._mesh_of(params, None)
  peak = matmul_peak(jnp.float32 if dtype == "float32" else jnp.bfloat16, mesh)
  b, n, p_len, t = scenario.batch, scenario.num_samples, scenario.prompt_len, scenario.new_tokens
  eos_ids = scenario.eos_ids(cfg.vocab_size)
  prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (b, p_len)).astype(np.int32)
  mask = np.ones_like(prompts, bool)
  torch.manual_seed(0)
  counts = {}

  def theirs():
    with torch.no_grad():
      out = model.generate(torch.tensor(prompts, dtype=torch.long), do_sample=True, temperature=1.0, top_k=0,
                           top_p=1.0, max_new_tokens=t, min_new_tokens=0 if eos_ids else t,
                           num_return_sequences=n, eos_token_id=list(eos_ids) or None, pad_token_id=0)
    counts["theirs"] = _new_tokens(out[:, p_len:].numpy(), eos_ids)

  def vllm():
    counts["vllm"] = peer.generate(prompts, scenario, eos_ids)

  compact = compact_rows if scenario.eos else 0  # without EOS every row runs to T: nothing to compact

  def ours(p=prompts, m=mask, samples=n, compact=compact):
    out = sampling.generate(cfg_d, params, p, m, jax.random.key(1), num_samples=samples, max_new_tokens=t,
                            temperature=1.0, eos_ids=eos_ids, pad_id=0, compact_rows=compact)
    counts["ours"] = int(jnp.sum(out.lengths))

  fns = {"ours": ours} if model is None else {"theirs": theirs, "ours": ours}
  if peer is not None:
    fns["vllm"] = vllm
  if scenario.name == "short":  # forking vs repeating the prompts, and the products floor
    rep_p, rep_m = np.repeat(prompts, n, 0), np.repeat(mask, n, 0)
    fns["repeat"] = lambda: ours(rep_p, rep_m, 1)
    fns["floor"] = weight_products_floor(cfg_d, params, b * n, t - 1, mesh)
  if compact:  # the same samples with finished rows riding along (compact_rows=0)
    fns["plain"] = lambda: ours(compact=0)
  times = dict(zip(fns, _alternating_times(list(fns.values()), repeats)))
  best = {k: min(v) for k, v in times.items()}
  rate = lambda side: counts[side] / best[side]
  tokens = lambda side, other: counts[side] / counts[other]  # EOS rows: the last calls' token counts
  has = lambda side: side in best
  row = dict(
      preset=name, dtype=dtype, scenario=scenario, theirs=rate("theirs") if has("theirs") else None,
      ours=rate("ours"), ratio=rate("ours") / rate("theirs") if has("theirs") else None,
      vllm=rate("vllm") if peer else None,
      paired=[a / b * tokens("ours", "theirs") for a, b in zip(times.get("theirs", []), times["ours"])],
      peak=peak, flops=decode_flops(cfg, b, n, p_len, t) * counts["ours"] / (b * n * t) / best["ours"])
  if peer is not None:
    row["vllm_ratio"] = rate("ours") / rate("vllm")
    row["vllm_paired"] = [a / b * tokens("ours", "vllm") for a, b in zip(times["vllm"], times["ours"])]
  if "floor" in best:
    row.update(fork_gain=best["repeat"] / best["ours"], products_share=best["floor"] / best["ours"],
               ceiling=best["theirs"] / best["floor"] if has("theirs") else None)
  if "plain" in best:
    row["compact_gain"] = best["plain"] / best["ours"]
  return row


def _format(row) -> str:
  sc = row["scenario"]
  kind = f"{sc.name}: {sc.batch}x{sc.num_samples}, P={sc.prompt_len}{', EOS' if sc.eos else ''}"
  optional = lambda key, fmt: fmt(row[key]) if row.get(key) is not None else "n/a"
  return (
      f"| {row['preset']} | {row['dtype']} | {kind} | {optional('theirs', '{:,.0f}'.format)} | "
      f"{optional('vllm', '{:,.0f}'.format)} | {row['ours']:,.0f} | {optional('ratio', '{:.2f}x'.format)} | "
      f"{optional('vllm_ratio', '{:.2f}x'.format)} | "
      f"{np.median(row['paired']) if row['paired'] else float('nan'):.2f}x | {optional('fork_gain', '{:.2f}x'.format)} | "
      f"{optional('compact_gain', '{:.2f}x'.format)} | "
      f"{row['flops'] / 1e9:.1f} | {row['flops'] / row['peak']:.0%} of {row['peak'] / 1e9:.0f} | "
      f"{optional('products_share', '{:.0%}'.format)} | {optional('ceiling', '{:.2f}x'.format)} | "
      f"{' '.join(f'{r:.2f}' for r in row['paired'])} | "
      f"{' '.join(f'{r:.2f}' for r in row.get('vllm_paired', []))} |")


def _scenarios(args) -> list[Scenario]:
  known = {
      "short":
          Scenario("short", args.batch, args.num_samples, args.prompt_len, args.new_tokens, False),
      "long":
          Scenario("long", args.long_batch, args.long_num_samples, args.long_prompt_len, args.new_tokens,
                   False),
      "eos":
          Scenario("eos", args.batch, args.num_samples, args.prompt_len, args.new_tokens, True),
  }
  bad = [s for s in args.scenarios.split(",") if s not in known]
  if bad:
    raise SystemExit(f"error: --scenarios={args.scenarios} is not allowed: {bad[0]!r}; allowed: "
                     f"{', '.join(known)}")
  return [known[s] for s in args.scenarios.split(",")]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--presets", default="tiny,small")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--scenarios", default="short,long,eos", help="short | long | eos rows")
  parser.add_argument("--peers", default="transformers,vllm", help="transformers and/or vllm (if installed)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--num_samples", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--long_batch", type=int, default=4)
  parser.add_argument("--long_num_samples", type=int, default=16)
  parser.add_argument("--long_prompt_len", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--compact_rows", type=int, default=8,
                      help="eos rows: ours with sampling.generate(compact_rows=K), timed against K = 0 too")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  parser.add_argument(
      "--cpu_devices", type=int, default=None,
      help="JAX CPU devices to split the host into (default: as the environment sets it, "
      "1 unless XLA_FLAGS says otherwise); ours runs its rows over all devices")
  args = parser.parse_args()
  try:
    sampling.check_compact_rows(args.compact_rows, "--compact_rows")
  except ValueError as e:
    parser.error(str(e))
  scenarios = _scenarios(args)
  rows = {sc.batch * sc.num_samples for sc in scenarios}
  devices = args.cpu_devices if args.cpu_devices is not None else jax.device_count()
  if args.cpu_devices is not None:
    if args.cpu_devices < 1 or any(r % args.cpu_devices for r in rows):
      parser.error(f"--cpu_devices={args.cpu_devices} is not allowed: need >= 1 and dividing B * N = "
                   f"{', '.join(map(str, sorted(rows)))}")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before the first jax.devices()
  elif any(r % devices for r in rows):
    parser.error(
        f"{devices} JAX devices (from the environment, e.g. XLA_FLAGS) do not divide "
        f"B * N = {', '.join(map(str, sorted(rows)))}: pass --cpu_devices or other --batch / --num_samples")
  peers = args.peers.split(",")
  if "vllm" in peers and not os.path.exists(VLLM_PYTHON):
    print(f"vLLM peer: not installed ({VLLM_PYTHON} is missing; `bash bench/setup_vllm.sh` makes it); its "
          "columns read n/a")
    peers.remove("vllm")
  print(f"{args.new_tokens} new tokens, temperature 1, ours on {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, torch threads {args.threads}; peers: {', '.join(peers)}")
  header = (
      "| preset | compute | rows | transformers tok/s | vLLM tok/s | bond_jax tok/s | vs transformers | "
      "vs vLLM | paired median | fork vs repeat | compact vs plain | decode GFLOP/s | of matmul peak | products share | "
      "ceiling | paired ratios | vLLM paired ratios |")
  print(header)
  print("|---" * (header.count("|") - 1) + "|")
  for name in args.presets.split(","):
    for row in run_preset(name, args.dtypes.split(","), scenarios, peers, args.repeats, args.threads,
                          args.compact_rows):
      print(_format(row), flush=True)


if __name__ == "__main__":
  main()
