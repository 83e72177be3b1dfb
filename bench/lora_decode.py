"""LoRA in the sampler: merged once per call vs the low-rank product at every step (tiny, 1 device)."""
import time, jax, numpy as np
from bond_jax import sampling, sharding
from bond_jax.models import lora, params as params_lib, presets

cfg = presets.get("tiny")
mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
base = params_lib.init_sharded(cfg, "lm", jax.random.key(0), mesh)
lc = lora.LoraConfig(rank=16, alpha=16.0)
ad = params_lib.init_adapters(cfg, lc, jax.random.key(1), mesh)
ad = jax.tree.map(lambda x: x + 0.01, ad)
att = lora.attach(base, ad, lc)
prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (16, 64)).astype(np.int32)
mask = np.ones_like(prompts, bool)


def run(params, merge, n):
  return sampling.generate(cfg, params, prompts, mask, jax.random.key(n), num_samples=2, max_new_tokens=48,
                           merge_adapters=merge).tokens.block_until_ready()


modes = {"base (no adapters)": (base, True), "merge per call": (att, True), "low-rank per step": (att, False)}
for name, (p, m) in modes.items():
  run(p, m, 0)
times = {k: [] for k in modes}
for r in range(7):
  for name, (p, m) in modes.items():
    t = time.perf_counter()
    run(p, m, r + 1)
    times[name].append(time.perf_counter() - t)
for name in modes:
  print(f"{name:<22} median {np.median(times[name])*1e3:.0f} ms  min {min(times[name])*1e3:.0f} ms")
ratios = np.array(times["low-rank per step"]) / np.array(times["merge per call"])
print("per-step / merge: median paired ratio", np.median(ratios).round(3))
