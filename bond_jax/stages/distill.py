"""The distillation stage: J-BOND (default), BOND, iterative BOND or RLOO on the frozen pi_ref and reward
model.

One step: prompts [B, P] -> the algorithm's rollout (policy / anchor / reference samples, their rewards) ->
its jitted update (algorithms.py) -> metrics. Every train.eval_every steps the policy's single sample is
compared with Best-of-N of pi_ref on each held-out prompt set (evaluate.py; chitchat: 'in_distribution',
then 'held_out_topics'); results, plots and a history go to <workdir>/bond/eval/. The loop (loop.py) does
the rest. A step's randomness is fold_in(seed, step - 1).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from bond_jax import algorithms, artifacts, checkpoint, evaluate as evaluate_lib, loop, reference_pools
from bond_jax import rewards as rewards_lib, rollout, sampling, scoring, sharding, update
from bond_jax import workdir as workdir_lib
from bond_jax.data import prompts as prompts_lib
from bond_jax.frozen import FrozenModels
from bond_jax.models import lora as lora_lib
from bond_jax.models import params as params_lib
from bond_jax.stages.context import Context

STAGE, KIND = "bond", "lm"  # <workdir>/bond/{checkpoints, metrics.jsonl, tensorboard, eval}
_POOL_SEED = 2**31 - 1  # fold_in index of the reference pool's draws (the evaluations use their step)
_ADAPTER_SEED = 3  # fold_in index of the LoRA adapters' initial A


def frozen_models(ctx: Context, prompt_records=()) -> FrozenModels:
  """pi_ref and the reward route of the run (given directories, or this workdir's earlier stages; a reward
  model with its own tokenizer or a reward function score text: rewards.py), with LoRA the identity of the
  base (pi_ref as loaded: its path and content hash), which the checkpoints record. With
  lora.base_dtype the base is stored in that dtype (the reference is then that rounding). `prompt_records`:
  the run's prompts, which the text route hands the reward as the records' values."""
  config, mesh = ctx.config, ctx.mesh
  lora = lora_lib.from_section(config.get("lora"))
  source = config.reference or ctx.workdir
  reference, cfg = artifacts.load(source, "lm", mesh)
  base = None
  if lora is not None:
    base = dict(path=os.path.abspath(source), hash=checkpoint.tree_digest(reference), lora=lora.to_dict())
    if lora.base_dtype:
      reference = jax.tree.map(lambda x: x.astype(lora.base_dtype), reference)
  eos_ids = prompts_lib.eos_ids(config, ctx.tokenizer)
  route = rewards_lib.route(config, ctx.tokenizer, ctx.workdir, mesh, prompt_records, eos_ids)
  return FrozenModels(policy_cfg=cfg, reference_params=reference, reward_cfg=route.cfg,
                      reward_params=route.params, eos_ids=eos_ids, pad_id=ctx.tokenizer.pad_id, mesh=mesh,
                      text_rewards=route.text, lora=lora, base_identity=base)


class _Evaluation:
  """The policy vs Best-of-N of pi_ref on fixed held-out batches, one per held-out set (the first is the
  primary one: its metrics are the result's top level, the others' go under their names, their scalars also
  as '<name>_<metric>'). pi_ref's pools are drawn once and kept in eval.pool_dir (`_pool`)."""

  def __init__(self, ctx: Context, frozen: FrozenModels, sets: dict[str, Any], store: reference_pools.Store):
    self.config, self.frozen, self.store = ctx.config, frozen, store
    self.out_dir = os.path.join(workdir_lib.stage_dir(ctx.workdir, STAGE), "eval")
    # the same host batch on every process -> one replicated global array
    self.batches = {
        name:
            jax.device_put(prompts_lib.eval_batch(ctx.config, records, ctx.tokenizer),
                           sharding.replicated(frozen.mesh)) for name, records in sets.items()
    }
    self.rng = jax.random.key(ctx.config.seed + 1)
    self.pools: dict[str, reference_pools.ReferencePool] = {}
    self.pool_dir = ctx.config.eval.get("pool_dir") or os.path.join(self.out_dir, "pools")
    self.history = self._read_history()

  def _read_history(self) -> list[dict[str, Any]]:
    path = os.path.join(self.out_dir, "history.jsonl")
    if not os.path.exists(path):
      return []
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def _evaluate_set(self, index: int, name: str, state: update.TrainState, step: int,
                    tracked_n: float | None) -> dict[str, Any]:
    c, frozen = self.config, self.frozen
    prompts, mask = self.batches[name]["tokens"], self.batches[name]["mask"]
    if name not in self.pools:
      self.pools[name] = self._pool(index, name, prompts, mask)
    rng = jax.random.fold_in(jax.random.fold_in(self.rng, step), index) if index else jax.random.fold_in(
        self.rng, step)
    return evaluate_lib.evaluate(frozen, frozen.model_params(state.params), prompts, mask, rng,
                                 self.pools[name], best_of=tuple(c.eval.best_of),
                                 policy_samples=c.eval.policy_samples,
                                 max_new_tokens=c.sampling.max_new_tokens, tracked_n=tracked_n,
                                 with_best_of_n_kl=c.eval.best_of_n_kl)

  def _pool(self, index: int, name: str, prompts: jax.Array,
            mask: jax.Array) -> reference_pools.ReferencePool:
    """pi_ref's pool of a set: read from eval.pool_dir when a pool of the same inputs is there (a resumed
    run, or another run of the same pi_ref and reward model: the study's arms), else drawn and written."""
    c = self.config
    rng = jax.random.fold_in(self.rng, _POOL_SEED - index)  # set 0 keeps the pool seed of a single-set run
    pool, path = self.store.get(self.pool_dir, name, prompts, mask, rng, num_samples=c.eval.quantile_samples,
                                max_new_tokens=c.sampling.max_new_tokens)
    if path:
      print(f"[{STAGE}] {name}: pi_ref's pool read from {path}", flush=True)
    return pool

  def __call__(self, state: update.TrainState, step: int, final: bool) -> dict[str, Any]:
    del final
    target = algorithms.get(self.config.bond.algorithm).target_best_of(self.config.bond, step)
    results = {name: self._evaluate_set(i, name, state, step, target) for i, name in enumerate(self.batches)}
    primary, *others = results
    result = dict(results[primary], eval_set=primary)
    for name in others:
      result[name] = results[name]
      result.update({f"{name}_{k}": v for k, v in results[name].items() if isinstance(v, float)})
    if target is not None:
      result["target_best_of"] = target
      result["kl_target_best_of"] = evaluate_lib.bon_kl_bound(target)
    if jax.process_index() == 0:
      self._record(step, result, {name: results[name] for name in others})
    return result

  def _record(self, step: int, result: dict[str, Any], others: dict[str, dict[str, Any]]) -> None:
    scalars = {k: v for k, v in result.items() if isinstance(v, float)}
    if not self.history or self.history[-1]["step"] < step:
      self.history.append({"step": step, **scalars})
      os.makedirs(self.out_dir, exist_ok=True)
      with open(os.path.join(self.out_dir, "history.jsonl"), "a") as f:
        f.write(json.dumps(self.history[-1]) + "\n")
    primary = {k: v for k, v in result.items() if k not in others}
    evaluate_lib.write(primary, self.out_dir, step, self.history, others)


def _ks_to(result: dict[str, Any], shown: list[str]) -> str:
  """' (BoN-2 ks, BoN-4 ks)': the KS distances to the shown Best-of-N laws, where recorded."""
  by_n = result.get("quantile_ks_best_of") or {}
  return " (" + ", ".join(f"BoN-{n} {by_n[n]:.3f}" for n in shown) + ")" if by_n else ""


def _rank_law(result: dict[str, Any]) -> str:
  """', rank law 0.296': the KL of the policy's rank law, the part the reward sees (evaluate.rank_law_kl; from
  the evaluation's samples, so noisy where they are few), where recorded."""
  return f", rank law {result['kl_rank_law']:.3f}" if "kl_rank_law" in result else ""


def eval_line(result: dict[str, Any]) -> str:
  """The console line of an evaluation: the policy against Best-of-2 / Best-of-4 of pi_ref."""
  bon = result["best_of_n"]
  shown = [n for n in sorted(bon, key=int) if n in ("2", "4")] or sorted(bon, key=int)[:2]
  rewards = ", ".join(f"BoN-{n} {bon[n]['reward']:.3f}" for n in shown)
  lengths = ", ".join(
      f"BoN-{n} {bon[n]['response_length']:.1f}" for n in shown if "response_length" in bon[n])
  line = (
      f"policy reward {result['policy_reward']:.3f} (ref {result['reference_reward']:.3f}, {rewards}) | "
      f"quantile {result['policy_quantile_mean']:.3f} +- {result['policy_quantile_stderr']:.3f} (N_eff "
      f"{result['policy_effective_n']:.2f}) | KL(pi||ref) {result['kl_policy_ref']:.3f} +- "
      f"{result['kl_policy_ref_stderr']:.3f} (BoN at N_eff {result['kl_bon_at_effective_n']:.3f}; per "
      f"position {result['kl_policy_ref_exact']:.3f} +- {result['kl_policy_ref_exact_stderr']:.3f}, on where to "
      f"stop {result['kl_stopping']:.3f}{_rank_law(result)}) | length "
      f"{result['policy_response_length']:.1f} (ref {result['reference_response_length']:.1f}, {lengths})")
  cut = ", ".join(
      f"BoN-{n} {bon[n]['truncated_fraction']:.0%}" for n in shown if "truncated_fraction" in bon[n])
  if "policy_truncated_fraction" in result:
    line += (f" | at the length cap {result['policy_truncated_fraction']:.0%} (ref "
             f"{result['reference_truncated_fraction']:.0%}, {cut})")
  line += f" | KS to BoN-{result['tracked_n']:.2f} {result['quantile_ks']:.3f}"
  line += _ks_to(result, shown)
  if "target_best_of" in result:
    line += f" | aims at BoN-{result['target_best_of']:.2f} (KL {result['kl_target_best_of']:.3f})"
  # the Best-of-N quantiles the held-out sets are read against: N / (N + 1), from the evaluation itself
  quantiles = ", ".join(f"BoN-{n} {bon[n]['quantile_mean']:.3f}" for n in shown)
  for name, other in result.items():
    if isinstance(other, dict) and "policy_quantile_mean" in other:
      line += (
          f"\n    {name.replace('_', ' ')}: quantile {other['policy_quantile_mean']:.3f} +- "
          f"{other['policy_quantile_stderr']:.3f} ({quantiles}), KL(pi||ref) "
          f"{other['kl_policy_ref']:.3f} (per position {other['kl_policy_ref_exact']:.3f}), KS "
          f"{other['quantile_ks']:.3f}{_ks_to(other, shown)}, reward "
          f"{other['policy_reward']:.3f}, "
          f"length {other['policy_response_length']:.1f}, at the cap {other['policy_truncated_fraction']:.0%}"
      )
  return line


def warn_ties(tie_rate: float, step: int, warned: list[int]) -> None:
  """One warning per run (`warned` holds the step it was given at) when most of a prompt's rewards tie:
  BOND's quantiles then carry little signal."""
  if tie_rate > rewards_lib.TIED_WARNING and not warned and jax.process_index() == 0:
    warned.append(step)
    print(
        f"[{STAGE}] warning: {tie_rate:.0%} of the reward pairs of a prompt tie at step {step}: BOND needs "
        "continuous rewards (a reward of a few values, e.g. 0/1, ranks samples poorly); see reward_tie_rate",
        flush=True)


@jax.jit
def _step_stats(response_lengths: jax.Array, batch: Any) -> dict[str, jax.Array]:
  """What a step logs beside the update's metrics (on device): mean and total response length [B, M],
  the rewards' tie rate."""
  lengths = response_lengths.astype(jnp.float32)
  return {
      "response_length": jnp.mean(lengths),
      "tokens": jnp.sum(lengths),
      "reward_tie_rate": rewards_lib.batch_tie_rate(batch)
  }


def build(ctx: Context) -> loop.Stage:
  """The distillation stage: the policy starts at pi_ref (and so does the anchor, where there is one)."""
  config, mesh = ctx.config, ctx.mesh
  algorithm = algorithms.get(config.bond.algorithm)
  train_prompts, eval_sets = ctx.prompts
  frozen = frozen_models(ctx, rewards_lib.records_of(train_prompts, *eval_sets.values()))
  optimizer = update.make_optimizer(update.OptimizerConfig.from_section(config.optimizer, config.train.steps))
  policy, options = _initial_policy(config, frozen)
  state = update.new_state(policy, optimizer, mesh, policy if algorithm.uses_anchor else None)
  options.update(num_microbatches=config.optimizer.grad_accum_steps, mesh=mesh,
                 state_sharding=sharding.shardings_of(state),
                 ref_sharding=sharding.shardings_of(frozen.reference_params))
  # rollout rows are join's [prompt | max_new_tokens response slots]: each prompt's forward serves its rows
  logprob_fn = scoring.sequence_logprob_fn(frozen.policy_cfg, frozen.pad_id,
                                           response_width=config.sampling.max_new_tokens)
  kl_fn = scoring.sequence_kl_fn(frozen.policy_cfg, frozen.pad_id,
                                 response_width=config.sampling.max_new_tokens)  # bond.kl_estimator
  schedule = loop.Schedule.from_section(config.train)
  # pi_ref's forward only measures kl_policy_ref for J-BOND: run it on the steps the loop logs, not on the
  # others (a fourth of the update's forwards; the evaluation measures KL(pi || pi_ref) with its SE anyway)
  steps = {True: algorithm.make_step(config.bond, logprob_fn, optimizer, options, True, kl_fn)}
  steps[False] = (algorithm.make_step(config.bond, logprob_fn, optimizer, options, False, kl_fn)
                  if algorithm.measures_ref_only else steps[True])
  base_rng = jax.random.key(config.seed)
  warned: list[int] = []
  store = reference_pools.Store(frozen)
  keeps_reference = (algorithm.draws_reference and bool(config.bond.get("pool_dir")) and
                     reference_pools.can_keep(frozen))

  def prepare(host_batch, state, step):
    # checked here, on the host: the rollout then reads nothing back from the device before the update
    sampling.check_prompts(frozen.policy_cfg, host_batch["tokens"], host_batch["mask"],
                           config.sampling.max_new_tokens)
    placed = sharding.global_batch(host_batch, mesh)  # the global batch, on every process
    rng, extra = jax.random.fold_in(base_rng, step - 1), {}
    if keeps_reference:  # pi_ref's k samples of this step, read or drawn (then this step waits for them)
      extra["reference"], path = store.get(config.bond.pool_dir, "train", placed["tokens"], placed["mask"],
                                           rollout.bond_keys(rng)[1], num_samples=config.bond.k,
                                           max_new_tokens=config.sampling.max_new_tokens)
      if schedule.logged(step):  # the loop logs this step too
        print(
            f"[{STAGE}] step {step}: pi_ref's {config.bond.k} samples per prompt {'read from' if path else 'drawn into'} "
            f"{config.bond.pool_dir} (so far read {store.read}, drawn {store.drawn}, with the evaluation's)",
            flush=True)
    batch, stats = algorithm.rollout(config.bond, frozen, state, placed["tokens"], placed["mask"], rng,
                                     config.sampling.max_new_tokens, **extra)
    # device scalars, fetched with the metrics; the update batch carries which step runs it
    return (batch, schedule.logged(step)), _step_stats(stats.response_lengths, batch)

  evaluation = (_Evaluation(ctx, frozen, eval_sets, store) if config.eval.num_prompts and eval_sets else None)
  run_step = lambda state, item: steps[item[1]](state, frozen.reference_params, item[0])
  return loop.Stage(name=STAGE, kind=KIND, mesh=mesh, model=frozen.policy_cfg, schedule=schedule, state=state,
                    step=run_step, batches=prompts_lib.prompt_dataset(config, train_prompts, ctx.tokenizer),
                    prepare=prepare, evaluate=evaluation, eval_line=eval_line, evaluate_first=True,
                    progress_keys=algorithms.PROGRESS_KEYS + ("response_length",), base=frozen.base_identity,
                    observe=lambda step, metrics: warn_ties(metrics["reward_tie_rate"], step, warned))


def _initial_policy(config, frozen: FrozenModels) -> tuple[Any, dict[str, Any]]:
  """What the state trains at step 0 (the anchor starts equal to it) and the step's extra options: a copy
  of pi_ref, or with LoRA fresh adapters (B = 0, so policy = anchor = pi_ref exactly) and the view that
  attaches them to the frozen base."""
  if frozen.lora is None:
    with jax.set_mesh(frozen.mesh):
      return jax.tree.map(jnp.copy, frozen.reference_params), {}
  rng = jax.random.fold_in(jax.random.key(config.seed), _ADAPTER_SEED)
  adapters = params_lib.init_adapters(frozen.policy_cfg, frozen.lora, rng, frozen.mesh)
  lora = frozen.lora
  return adapters, dict(params_view=lambda base, trainable: lora_lib.attach(base, trainable, lora))


def report(result: dict[str, Any]) -> str:
  """The closing line of the stage (its final evaluation, or its last step without one)."""
  if "policy_quantile_mean" not in result:
    return f"[{STAGE}] finished at step {result.get('step')}"
  line = (f"[{STAGE}] step {result.get('step', '')}: policy quantile {result['policy_quantile_mean']:.3f} +- "
          f"{result['policy_quantile_stderr']:.3f}, KL(pi||ref) {result['kl_policy_ref']:.3f}, reward "
          f"{result['policy_reward']:.3f}")
  if "quantile_ks" in result:
    line += f", KS to BoN-{result['tracked_n']:.2f} {result['quantile_ks']:.3f}"
  if result.get("quantile_ks_best_of"):
    n, ks = min(result["quantile_ks_best_of"].items(), key=lambda item: item[1])
    line += f" (nearest Best-of-N law: BoN-{n}, KS {ks:.3f})"
  if "held_out_topics_policy_quantile_mean" in result:
    line += (
        f"; held-out topics: quantile {result['held_out_topics_policy_quantile_mean']:.3f} +- "
        f"{result['held_out_topics_policy_quantile_stderr']:.3f}, KL {result['held_out_topics_kl_policy_ref']:.3f}"
    )
  return line
