"""Where one J-BOND step spends its time: policy sampling, anchor sampling, reward scoring, the update.

    python -m bench.jbond_step [--presets=tiny,small] [--batch=16] [--prompt_len=32] [--new_tokens=24]

Random weights (policy = anchor = reference at start; reward model = same backbone + random head), the
default distillation settings (temperature 1, J-BOND beta 0.5, Adam), on all local devices as one mesh. Each
phase is timed separately after a warm-up (compilation excluded), best of --repeats. The update's model
FLOPs: forward + backward (3x forward) of the policy on its sample and the better anchor sample, plus
no-grad forwards of the anchor and the reference on the policy sample; shown as a fraction of a jitted
matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.sampling import _best_time, matmul_peak
from bond_jax import algorithms, rollout, sampling, scoring, sharding, update
from bond_jax.frozen import FrozenModels
from bond_jax.models import params as params_lib
from bond_jax.models import presets
from configs import dialogue


def forward_flops(cfg, rows: int, length: int) -> float:
  """Matmul + attention FLOPs of one teacher-forced forward over rows x length tokens."""
  d, h, kv, hd, m = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_token = 2 * (cfg.num_layers * (d * hd * (h + 2 * kv) + h * hd * d + 3 * d * m) + d * cfg.vocab_size)
  attention = cfg.num_layers * 4 * h * hd * length / 2  # causal: half the square on average
  return rows * length * (per_token + attention)


def run_preset(name: str, batch: int, prompt_len: int, new_tokens: int, repeats: int):
  cfg = presets.get(name, max_seq_len=max(256, prompt_len + new_tokens))
  mesh = sharding.make_mesh({"fsdp": -1})
  policy = params_lib.init_sharded(cfg, "lm", jax.random.key(0), mesh)
  rm = params_lib.init_sharded(cfg, "reward", jax.random.key(1), mesh)
  rm = dict(rm, head=jax.device_put(jax.random.normal(jax.random.key(2), rm["head"].shape),
                                    rm["head"].sharding))
  config = dialogue.get_config()
  config.sampling.max_new_tokens = new_tokens
  rng = np.random.default_rng(0)
  prompts = rng.integers(4, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  prompts, prompt_mask = sharding.shard_batch((prompts, np.ones_like(prompts, bool)), mesh)
  opts = dict(max_new_tokens=new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_ids=(), pad_id=0, mesh=mesh)
  frozen = FrozenModels(policy_cfg=cfg, reference_params=policy, reward_cfg=cfg, reward_params=rm, eos_ids=(),
                        pad_id=0, mesh=mesh)
  with jax.set_mesh(mesh):
    optimizer = update.make_optimizer(
        update.OptimizerConfig.from_section(config.optimizer, config.train.steps))
    state = update.new_state(jax.tree.map(jnp.copy, policy), optimizer, mesh, policy)
    key = jax.random.key(3)
    t_policy = _best_time(
        lambda: jax.block_until_ready(
            sampling.generate(cfg, state.params, prompts, prompt_mask, key, num_samples=1, **opts)), repeats)
    t_anchor = _best_time(
        lambda: jax.block_until_ready(
            sampling.generate(cfg, state.anchor_params, prompts, prompt_mask, key, num_samples=2, **opts)),
        repeats)
    pol = sampling.generate(cfg, state.params, prompts, prompt_mask, key, num_samples=3, **opts)
    t_score = _best_time(
        lambda: jax.block_until_ready(scoring.rewards(cfg, rm, prompts, prompt_mask, pol.tokens, pol.mask)),
        repeats)
    batch_tree, _ = rollout.jbond(frozen, state.params, state.anchor_params, prompts, prompt_mask, key,
                                  new_tokens)
    # the J-BOND update as the distillation stage builds it (algorithms.py), on scoring's chunked log-probs
    step = algorithms.get("jbond").make_step(
        config.bond, scoring.sequence_logprob_fn(cfg, 0), optimizer,
        dict(num_microbatches=config.optimizer.grad_accum_steps, mesh=mesh,
             state_sharding=sharding.shardings_of(state), ref_sharding=sharding.shardings_of(policy)))
    holder = {"state": state}

    def run_update():
      holder["state"], metrics = step(holder["state"], policy, batch_tree)
      jax.block_until_ready(metrics)

    t_update = _best_time(run_update, repeats)
  length = prompt_len + new_tokens
  update_flops = (
      3 * forward_flops(cfg, 2 * batch, length)  # policy on y and y'_best, fwd + bwd
      + 2 * forward_flops(cfg, batch, length))  # anchor and reference on y, no grad
  return {
      "preset": name,
      "params": cfg.num_params(),
      "policy": t_policy,
      "anchor": t_anchor,
      "score": t_score,
      "update": t_update,
      "update_flops": update_flops
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="tiny,small")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=24)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  peak = matmul_peak(jnp.float32)
  print(
      f"devices: {jax.device_count()} x {jax.devices()[0].platform}; f32 matmul peak {peak / 1e9:.0f} GFLOP/s"
  )
  print(
      f"B={args.batch} prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens; 1 policy + 2 anchor "
      "samples per prompt\n")
  print(
      "| preset | params | policy sampling | anchor sampling | reward scoring | update | step | update GFLOP/s | "
      "update MFU |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in args.presets.split(","):
    r = run_preset(name, args.batch, args.prompt_len, args.new_tokens, args.repeats)
    total = r["policy"] + r["anchor"] + r["score"] + r["update"]
    cell = lambda t: f"{t * 1e3:.0f} ms ({100 * t / total:.0f}%)"
    rate = r["update_flops"] / r["update"]
    print(
        f"| {name} | {r['params'] / 1e6:.1f}M | {cell(r['policy'])} | {cell(r['anchor'])} | {cell(r['score'])} | "
        f"{cell(r['update'])} | {total * 1e3:.0f} ms | {rate / 1e9:.1f} | {100 * rate / peak:.0f}% |",
        flush=True)


if __name__ == "__main__":
  main()
