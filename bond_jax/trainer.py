"""The distribution-matching stage: J-BOND (default), BOND, iterative BOND or RLOO, resumable.

One step: prompts [B, P] -> rollout (policy / anchor / reference samples, rewards) -> jitted update ->
metrics; every eval_every steps the policy is compared with Best-of-N of pi_ref (evaluate.py); every
checkpoint_every steps, on SIGTERM and at the end, the whole state is saved with Orbax (policy, anchor,
optimizer, step, skipped-step counter; the step RNG is fold_in(seed, step), and the data iterator's
position goes into the checkpoint metadata), so a restarted run replays exactly what it would have done.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from bond_jax import checkpoint, evaluate, metrics as metrics_lib, objectives, prompts, reward_training, rollout
from bond_jax import sft, sharding, update
from bond_jax import workdir as workdir_lib
from bond_jax.data import pipeline

STAGE = "bond"  # <workdir>/bond/{checkpoints, metrics.jsonl, tensorboard, eval}
ALGORITHMS = ("jbond", "bond", "iterative_bond", "reinforce")
PROGRESS_KEYS = ("reward_mean", "kl_policy_ref", "kl_policy_anchor", "penalty_rate", "loss")


def validate(config) -> None:
  """Config errors, before any compute: one line naming the value and what is allowed."""
  bond = config.bond
  if bond.algorithm not in ALGORITHMS:
    raise ValueError(f"bond.algorithm={bond.algorithm!r}; allowed: {', '.join(ALGORITHMS)}")
  objectives.validate_hparams(beta=bond.beta, eta=bond.eta, gamma=bond.gamma, k=bond.k, beta_rl=bond.beta_rl,
                              anchor_period=bond.anchor_period)
  if bond.algorithm in ("bond", "iterative_bond"):
    objectives.validate_hparams(n=bond.n)
  s = config.sampling
  if (s.temperature, s.top_k, s.top_p) != (1.0, 0, 1.0):
    raise ValueError(f"sampling temperature={s.temperature}, top_k={s.top_k}, top_p={s.top_p}: BOND's "
                     "losses need samples from pi itself; allowed for training: 1.0, 0, 1.0")
  for name in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
               "max_bad_steps"):
    if int(config.train[name]) < 1:
      raise ValueError(f"train.{name}={config.train[name]} must be >= 1")
  if config.data.response_turns < 1:
    raise ValueError(f"data.response_turns={config.data.response_turns} must be >= 1 (dialogue turns per "
                     "response)")
  if config.eval.policy_samples < 1:
    raise ValueError(f"eval.policy_samples={config.eval.policy_samples} must be >= 1")
  if config.eval.num_prompts < 0:
    raise ValueError(f"eval.num_prompts={config.eval.num_prompts} must be >= 0 (0 turns evaluation off)")
  if any(n < 1 or n > config.eval.quantile_samples for n in config.eval.best_of):
    raise ValueError(f"eval.best_of={tuple(config.eval.best_of)}: each N must be in [1, "
                     f"eval.quantile_samples={config.eval.quantile_samples}]")


def _optimizer(config):
  o = config.optimizer
  return update.make_optimizer(update.OptimizerConfig(
      learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, schedule=o.schedule,
      decay_steps=max(config.train.steps - o.warmup_steps, 0), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
      max_grad_norm=o.clip_norm))


def _make_step(config, cfg, optimizer, pad_id, **shardings):
  """The jitted update; shardings: mesh, state_sharding, ref_sharding, batch_sharding (update.py)."""
  b = config.bond
  logprob_fn = rollout.transformer_logprob_fn(cfg, pad_id)
  common = dict(num_microbatches=config.optimizer.grad_accum_steps, **shardings)
  if b.algorithm == "jbond":
    return update.make_jbond_step(logprob_fn, optimizer, beta=b.beta, gamma=b.gamma, eta=b.eta, **common)
  if b.algorithm == "bond":
    return update.make_bond_step(logprob_fn, optimizer, n=b.n, beta=b.beta, **common)
  if b.algorithm == "iterative_bond":
    return update.make_bond_step(logprob_fn, optimizer, n=b.n, beta=b.beta, anchor_period=b.anchor_period,
                                 **common)
  return update.make_reinforce_step(logprob_fn, optimizer, beta_rl=b.beta_rl, **common)


def _rollout(config, cfg, rm_cfg, state, ref_params, rm_params, prompts, mask, rng, tok, mesh):
  b, opts = config.bond, dict(sampling_config=config.sampling, eos_ids=(tok.eos_id,), pad_id=tok.pad_id,
                              mesh=mesh)
  if b.algorithm == "jbond":
    return rollout.jbond_batch(cfg, rm_cfg, state.params, state.anchor_params, rm_params, prompts, mask, rng,
                               **opts)
  if b.algorithm in ("bond", "iterative_bond"):
    base = ref_params if b.algorithm == "bond" else state.anchor_params
    return rollout.bond_batch(cfg, rm_cfg, state.params, base, rm_params, prompts, mask, rng, n=b.n, k=b.k,
                              num_policy_samples=2, **opts)
  return rollout.reinforce_batch(cfg, rm_cfg, state.params, rm_params, prompts, mask, rng,
                                 num_policy_samples=2, **opts)


def _on_mesh(tree, mesh):
  """Arrays not yet on the mesh (e.g. optimizer counters made on one device) become replicated on it."""
  def put(x):
    if isinstance(x, jax.Array) and len(x.sharding.device_set) == mesh.size:
      return x
    return jax.device_put(x, sharding.replicated(mesh))
  return jax.tree.map(put, tree)


class _Preemption:
  """SIGTERM sets a flag; the loop checkpoints at the end of the current step and stops."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def stop_now(self) -> bool:
    """Whether to checkpoint and stop after this step. With several processes they decide together: one
    that got SIGTERM a moment before the others must not stop alone, leaving them waiting in the next
    step's collectives (a tiny all-gather per step; each stops if any process was signalled)."""
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _process_zero_first(name: str, fn):
  """fn() on process 0, then (after a barrier) on the others: files it writes into the shared workdir
  (config.json, the tokenizer, TFDS datasets) are made once and only read by the other processes.

  An error on process 0 still reaches the barrier; the others then meet it again in their own fn().
  """
  if jax.process_count() == 1:
    return fn()
  error = out = None
  if jax.process_index() == 0:
    try:
      out = fn()
    except Exception as e:  # re-raised below, after the barrier the others wait at
      error = e
  multihost_utils.sync_global_devices(f"bond_jax.trainer: {name}")
  if error is not None:
    raise error
  return out if jax.process_index() == 0 else fn()


def _prepare_workdir(config, workdir: str):
  """The guarded config, tokenizer and datasets of the workdir (built when absent): (tokenizer, (train
  prompts, held-out prompts))."""
  workdir_lib.check_config(config, workdir)
  tok = workdir_lib.prepare_tokenizer(config, workdir)
  if not config.reference:  # the SFT stage's data (the reward stage's is the prompts' preference data)
    workdir_lib.dialogue_builder(config, workdir)
  return tok, prompts.prompt_sources(config, workdir)


def run(config, workdir: str) -> dict[str, Any]:
  """Train; returns the last evaluation. Resumes from <workdir>/bond/checkpoints when a checkpoint is there."""
  validate(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.train.batch_size % rows:
    raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by data * fsdp = {rows} "
                     "(prompts are split over those mesh axes)")
  tok, (train_prompts, eval_prompts) = _process_zero_first("prepare workdir",
                                                          lambda: _prepare_workdir(config, workdir))
  if not config.reference:  # make pi_ref here (skipped when the workdir already holds a finished one)
    sft.run(config, workdir)
  if not config.reward_model:
    reward_training.run(config, workdir)
  ref_dir, rm_dir = config.reference or workdir, config.reward_model or workdir
  ref_params, cfg = workdir_lib.load_stage_params(ref_dir, "lm", mesh)
  rm_params, rm_cfg = workdir_lib.load_stage_params(rm_dir, "reward", mesh)

  with jax.set_mesh(mesh):
    optimizer = _optimizer(config)
    uses_anchor = config.bond.algorithm in ("jbond", "iterative_bond")
    policy = jax.tree.map(jnp.copy, ref_params)
    state = _on_mesh(update.init_train_state(policy, optimizer, ref_params if uses_anchor else None), mesh)
  step_fn = None  # built at the first batch, whose shapes give the batch shardings

  dataset = prompts.prompt_dataset(config, train_prompts, tok)
  ckpt_dir = workdir_lib.checkpoint_dir(workdir, STAGE)
  mngr = checkpoint.manager(ckpt_dir, max_to_keep=config.train.keep_checkpoints)
  iterator = iter(dataset)
  start = 0
  if mngr.latest_step() is not None:
    state, meta, start = checkpoint.restore(mngr, state)
    iterator = pipeline.restore_iterator(dataset, meta["data_state"])
    print(f"resumed from {ckpt_dir} at step {start}", flush=True)

  eval_batch = None
  if config.eval.num_prompts:  # the same host batch on every process -> one replicated global array
    eval_batch = jax.device_put(prompts.eval_batch(config, eval_prompts, tok), sharding.replicated(mesh))
  run_dir = workdir_lib.stage_dir(workdir, STAGE)
  # Steps after the checkpoint (a run killed without saving) are logged again: drop their old lines.
  workdir_lib.truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), start if start else -1)
  writer = metrics_lib.MetricsWriter(run_dir, config.train.steps, start)
  history = _read_history(run_dir)
  base_rng = jax.random.key(config.seed)
  preemption = _Preemption()
  bad_in_a_row = 0
  last_eval: dict[str, Any] = {}
  reference_cache: dict[str, evaluate.ReferencePool] = {}

  def save(step, force=False):
    meta = {"data_state": pipeline.iterator_state_json(iterator), "kind": "bond",
            "model": workdir_lib.as_dict(cfg), "config": json.loads(config.to_json())}
    checkpoint.save(mngr, step, state, meta, force=force)

  try:
    with jax.set_mesh(mesh):
      if start == 0 and eval_batch is not None:
        last_eval = _evaluate(config, cfg, rm_cfg, ref_params, ref_params, rm_params, eval_batch, tok, mesh,
                              run_dir, 0, history, writer, reference_cache)
      for step in range(start, config.train.steps):
        prompt_batch = sharding.global_batch(next(iterator), mesh)  # the global batch, on every process
        batch = _rollout(config, cfg, rm_cfg, state, ref_params, rm_params, prompt_batch["tokens"],
                         prompt_batch["mask"], jax.random.fold_in(base_rng, step), tok, mesh)
        lengths = batch.pop("response_lengths")
        if step_fn is None:
          step_fn = _make_step(config, cfg, optimizer, tok.pad_id, mesh=mesh,
                               state_sharding=jax.tree.map(lambda x: x.sharding, state),
                               ref_sharding=jax.tree.map(lambda x: x.sharding, ref_params),
                               batch_sharding=jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), batch))
        state, m = step_fn(state, ref_params, batch)
        done = step + 1
        m = jax.device_get(m)
        m["response_length"] = float(jnp.mean(lengths))
        bad_in_a_row = bad_in_a_row + 1 if m["step_skipped"] else 0
        if bad_in_a_row >= config.train.max_bad_steps:
          raise FloatingPointError(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (last at "
                                   f"step {done}); stopping without saving them. Lower the learning rate or "
                                   "check the reward model")
        if done % config.train.log_every == 0 or done == config.train.steps:
          writer.write(done, m)
          writer.progress(done, m, PROGRESS_KEYS)
        if eval_batch is not None and (done % config.train.eval_every == 0 or done == config.train.steps):
          last_eval = _evaluate(config, cfg, rm_cfg, state.params, ref_params, rm_params, eval_batch, tok, mesh,
                                run_dir, done, history, writer, reference_cache)
        if preemption.stop_now():
          save(done, force=True)
          mngr.wait_until_finished()
          print(f"SIGTERM: checkpoint saved at step {done}; stopping", flush=True)
          raise SystemExit(143)
        if done % config.train.checkpoint_every == 0 or done == config.train.steps:
          save(done, force=done == config.train.steps)
    mngr.wait_until_finished()
  finally:
    preemption.restore()
    writer.close()
    mngr.close()
  return last_eval


def _read_history(run_dir: str) -> list[dict[str, Any]]:
  path = os.path.join(run_dir, "eval", "history.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _evaluate(config, cfg, rm_cfg, policy_params, ref_params, rm_params, eval_batch, tok, mesh, run_dir, step,
              history, writer, reference_cache):
  """One evaluation; reference_cache (a dict) keeps the reference pool, drawn once per run."""
  opts = dict(max_new_tokens=config.sampling.max_new_tokens, eos_ids=(tok.eos_id,), pad_id=tok.pad_id,
              mesh=mesh)
  eval_rng = jax.random.key(config.seed + 1)
  if "pool" not in reference_cache:
    reference_cache["pool"] = evaluate.reference_pool(
        cfg, rm_cfg, ref_params, rm_params, eval_batch["tokens"], eval_batch["mask"],
        jax.random.fold_in(eval_rng, 2**31 - 1), num_samples=config.eval.quantile_samples, **opts)
  result = evaluate.evaluate(cfg, rm_cfg, policy_params, ref_params, rm_params, eval_batch["tokens"],
                             eval_batch["mask"], jax.random.fold_in(eval_rng, step), reference_cache["pool"],
                             best_of=tuple(config.eval.best_of),
                             policy_samples=config.eval.policy_samples, **opts)
  target = target_best_of(config, step)
  if target is not None:
    result["target_best_of"] = target
    result["kl_target_best_of"] = evaluate.bon_kl_bound(target)
  if jax.process_index() != 0:
    return result
  scalars = {k: v for k, v in result.items() if isinstance(v, float)}
  if not history or history[-1]["step"] < step:
    history.append({"step": step, **scalars})
    os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
    with open(os.path.join(run_dir, "eval", "history.jsonl"), "a") as f:
      f.write(json.dumps(history[-1]) + "\n")
  evaluate.write(result, os.path.join(run_dir, "eval"), step, history)
  writer.write(step, scalars, prefix="eval")
  bon = result["best_of_n"]
  shown = [n for n in sorted(bon, key=int) if n in ("2", "4")] or sorted(bon, key=int)[:2]
  bon_rewards = ", ".join(f"BoN-{n} {bon[n]['reward']:.3f}" for n in shown)
  bon_lengths = ", ".join(f"BoN-{n} {bon[n]['response_length']:.1f}" for n in shown if "response_length" in bon[n])
  print(f"eval step {step}: policy reward {result['policy_reward']:.3f} (ref {result['reference_reward']:.3f}, "
        f"{bon_rewards}) | quantile {result['policy_quantile_mean']:.3f} +- "
        f"{result['policy_quantile_stderr']:.3f} (N_eff {result['policy_effective_n']:.2f}) | KL(pi||ref) "
        f"{result['kl_policy_ref']:.3f} +- {result['kl_policy_ref_stderr']:.3f} (BoN at N_eff "
        f"{result['kl_bon_at_effective_n']:.3f}) | length {result['policy_response_length']:.1f} (ref "
        f"{result['reference_response_length']:.1f}, {bon_lengths})"
        + (f" | aims at BoN-{target:.2f} (KL {result['kl_target_best_of']:.3f})" if target is not None else ""),
        flush=True)
  return result


def target_best_of(config, step: int) -> float | None:
  """The Best-of-N of pi_ref the algorithm aims at after `step` steps (None for REINFORCE, which has none):
  BOND: N; iterative BOND: n^(M + 1) after M hard anchor updates; J-BOND: ~2^(eta * step) (docs/math.md,
  J-BOND: the EMA anchor makes each step distil Best-of-2 of an anchor that is itself ahead of pi_ref)."""
  b = config.bond
  if b.algorithm == "bond":
    return float(b.n)
  if b.algorithm == "iterative_bond":
    return float(objectives.iterative_best_of(b.n, step // b.anchor_period + 1))
  if b.algorithm == "jbond":
    return float(2.0 ** (b.eta * step))
  return None
