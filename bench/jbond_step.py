"""Where one J-BOND step spends its time, against the previous code measured in the same run.

    python -m bench.jbond_step [--presets=tiny,small] [--batch=16] [--prompt_len=32] [--new_tokens=24]
        [--against=40657ed] [--rounds=2]

Random weights (policy = anchor = reference at start; reward model = same backbone + random head), the
default distillation settings (temperature 1, J-BOND beta 0.5, Adam), on all local devices as one mesh.
Phases: policy sampling (1 sample per prompt), anchor sampling (2), reward scoring of the 3 responses, the
update; `step` is the whole step as the distillation stage runs it (rollout.jbond, then the update), timed
end to end. Where the tree has it, the update is that of the steps the stage does not log, which skip
pi_ref's forward (it only measures kl_policy_ref); the logged steps' update is printed below the table. Each is timed after a warm-up (compilation excluded), best of --repeats; `compiles` counts
the XLA compilations during the timed whole steps (0: nothing recompiles from step to step).

--against: a git revision checked out in a temporary worktree; this file runs there as a subprocess on
that tree's bond_jax (same phases, each called through that tree's API), alternating with this tree's for
--rounds rounds (best per phase over the rounds). The update's GFLOP/s and MFU count the same nominal
model FLOPs for both trees: forward + backward (3x forward) of the policy on its sample and the better
anchor sample, plus no-grad forwards of the anchor and the reference, over the full prompt + response rows
(this tree computes fewer: each prompt's forward is shared by its rows, the LM head runs on response
positions only); the peak is a jitted matmul measured in the same process.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def forward_flops(cfg, rows: int, length: int) -> float:
  """Matmul + attention FLOPs of one teacher-forced forward over rows x length tokens."""
  d, h, kv, hd, m = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_token = 2 * (cfg.num_layers * (d * hd * (h + 2 * kv) + h * hd * d + 3 * d * m) + d * cfg.vocab_size)
  attention = cfg.num_layers * 4 * h * hd * length / 2  # causal: half the square on average
  return rows * length * (per_token + attention)


def _logprob_fn(scoring, cfg, new_tokens: int):
  """scoring.sequence_logprob_fn as the distillation stage builds it in the tree being measured."""
  if "response_width" in inspect.signature(scoring.sequence_logprob_fn).parameters:
    return scoring.sequence_logprob_fn(cfg, 0, response_width=new_tokens)
  return scoring.sequence_logprob_fn(cfg, 0)


class _Compiles:
  """Counts XLA compilations while active."""

  def __init__(self):
    self.count, self.active = 0, False
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **kwargs):
    del duration, kwargs
    if self.active and event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


def measure(name: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
  """Every phase of one preset's J-BOND step in this process (on whichever bond_jax it imports)."""
  from bench.sampling import _best_time, matmul_peak
  from bond_jax import algorithms, rollout, sampling, scoring, sharding, update
  from bond_jax.frozen import FrozenModels
  from bond_jax.models import params as params_lib
  from bond_jax.models import presets
  from configs import dialogue
  compiles = _Compiles()
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
  out = {"params": cfg.num_params(), "peak": matmul_peak(jnp.float32)}
  with jax.set_mesh(mesh):
    optimizer = update.make_optimizer(
        update.OptimizerConfig.from_section(config.optimizer, config.train.steps))
    state = update.new_state(jax.tree.map(jnp.copy, policy), optimizer, mesh, policy)
    key = jax.random.key(3)
    sample = lambda params, n: jax.block_until_ready(
        sampling.generate(cfg, params, prompts, prompt_mask, key, num_samples=n, **opts))
    out["policy"] = _best_time(lambda: sample(state.params, 1), repeats)
    out["anchor"] = _best_time(lambda: sample(state.anchor_params, 2), repeats)
    pol = sampling.generate(cfg, state.params, prompts, prompt_mask, key, num_samples=3, **opts)
    out["score"] = _best_time(
        lambda: jax.block_until_ready(scoring.rewards(cfg, rm, prompts, prompt_mask, pol.tokens, pol.mask)),
        repeats)
    batch_tree, _ = rollout.jbond(frozen, state.params, state.anchor_params, prompts, prompt_mask, key,
                                  new_tokens)
    # the J-BOND update as the distillation stage builds it (algorithms.py): where the tree can, the step
    # of the steps it does not log, without pi_ref's forward (logged steps: `update_logged`)
    make_step = algorithms.get("jbond").make_step
    skips_ref = "measure_ref" in inspect.signature(make_step).parameters
    build = lambda **kw: make_step(
        config.bond, _logprob_fn(scoring, cfg, new_tokens), optimizer,
        dict(num_microbatches=config.optimizer.grad_accum_steps, mesh=mesh, state_sharding=sharding.
             shardings_of(state), ref_sharding=sharding.shardings_of(policy)), **kw)
    step = build(measure_ref=False) if skips_ref else build()
    holder = {"state": state}

    def run_update(step):
      holder["state"], metrics = step(holder["state"], policy, batch_tree)
      jax.block_until_ready(metrics)

    out["update"] = _best_time(lambda: run_update(step), repeats)
    if skips_ref:
      logged = build()
      out["update_logged"] = _best_time(lambda: run_update(logged), repeats)

    def whole_step():
      batch, stats = rollout.jbond(frozen, holder["state"].params, holder["state"].anchor_params, prompts,
                                   prompt_mask, key, new_tokens)
      holder["state"], metrics = step(holder["state"], policy, batch)
      jax.block_until_ready((metrics, stats))

    whole_step()  # warm-up: the rollout's programs are compiled by now, the step's too
    compiles.active = True
    out["step"] = _best_time(whole_step, repeats)
    compiles.active = False
    out["compiles"] = compiles.count
  length = prompt_len + new_tokens
  out["update_flops"] = (
      3 * forward_flops(cfg, 2 * batch, length)  # policy on y and y'_best, fwd + bwd
      + 2 * forward_flops(cfg, batch, length))  # anchor and reference on y, no grad
  return out


def _child(tree: str, args, preset: str) -> dict:
  """measure() in a subprocess on `tree`'s bond_jax (this file, run by path)."""
  command = [
      sys.executable,
      os.path.abspath(__file__), "--child", f"--presets={preset}", f"--batch={args.batch}",
      f"--prompt_len={args.prompt_len}", f"--new_tokens={args.new_tokens}", f"--repeats={args.repeats}"
  ]
  env = dict(os.environ, PYTHONPATH=tree)
  done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    sys.exit(f"error: the bench on {tree} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _row(preset: str, code: str, r: dict) -> str:
  phases = r["policy"] + r["anchor"] + r["score"] + r["update"]
  cell = lambda t: f"{t * 1e3:.0f} ms ({100 * t / phases:.0f}%)"
  rate = r["update_flops"] / r["update"]
  return (f"| {preset} | {code} | {r['params'] / 1e6:.1f}M | {cell(r['policy'])} | {cell(r['anchor'])} | "
          f"{cell(r['score'])} | {cell(r['update'])} | {r['step'] * 1e3:.0f} ms | {rate / 1e9:.1f} | "
          f"{100 * rate / r['peak']:.0f}% | {r['compiles']} |")


def _worktree(revision: str, directory: str) -> str:
  path = os.path.join(directory, "previous")
  subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", path, revision], check=True,
                 capture_output=True)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="tiny,small")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=24)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--against", default="40657ed", help="git revision to compare with ('' = none)")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.presets, args.batch, args.prompt_len, args.new_tokens, args.repeats)))
    return
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}")
  print(f"B={args.batch} prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens; 1 policy + 2 "
        f"anchor samples per prompt; previous code: {args.against or 'not measured'}\n")
  print("| preset | code | params | policy sampling | anchor sampling | reward scoring | update | step | "
        "update GFLOP/s | update MFU | compiles |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    previous = _worktree(args.against, tmp) if args.against else None
    try:
      for preset in args.presets.split(","):
        best: dict[str, dict] = {}
        steps: dict[str, list[float]] = {}
        for round_ in range(args.rounds):
          trees = [("this", REPO)] + ([("previous", previous)] if previous else [])
          for code, tree in trees[::1 if round_ % 2 == 0 else -1]:  # alternate who runs first
            r = _child(tree, args, preset)
            steps.setdefault(code, []).append(r["step"])
            best[code] = r if code not in best else {
                k:
                    min(v, best[code][k]) if k in ("policy", "anchor", "score", "update", "update_logged",
                                                   "step") else max(v, best[code][k]) if k in (
                                                       "peak", "compiles") else v for k, v in r.items()
            }
        for code in best:
          print(_row(preset, code, best[code]), flush=True)
        if previous:
          ratio = lambda k: best["previous"][k] / best["this"][k]
          print(
              f"| {preset} | previous / this | | {ratio('policy'):.2f}x | {ratio('anchor'):.2f}x | "
              f"{ratio('score'):.2f}x | {ratio('update'):.2f}x | {ratio('step'):.2f}x | | | |", flush=True)
          rounds = " ".join(f"{a / b:.2f}" for a, b in zip(steps["previous"], steps["this"]))
          print(f"\nwhole step, previous / this, each round (best of --repeats): {rounds}", flush=True)
        if "update_logged" in best["this"]:
          print(
              f"this tree's logged steps (1 in train.log_every) also run pi_ref for kl_policy_ref: update "
              f"{best['this']['update_logged'] * 1e3:.0f} ms", flush=True)
    finally:
      if previous:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", previous], check=False)


if __name__ == "__main__":
  main()
