"""The one training loop, for every stage (SFT, reward model, distillation).

A stage hands the loop a `Stage`: its state, its jitted update step, its batches, how a host batch
becomes an update batch (a plain placement for SFT, a rollout for J-BOND) and its evaluation. The loop
owns everything else, the same for every stage:
- resume from the newest GOOD checkpoint of <workdir>/<stage>/checkpoints (a damaged one is reported,
  moved aside and skipped: checkpoint.restore_latest_good), with the data iterator at the same position;
- the non-finite guard: update.build_update_step drops a non-finite update and reports step_skipped;
  `max_bad_steps` skipped steps in a row stop the run with FloatingPointError, saving nothing, and no
  checkpoint is written while every step since the last one was skipped (rotation never pushes out the
  last good checkpoint);
- SIGTERM (preemption): checkpoint at the end of the current step, then exit 143;
- metrics.jsonl + TensorBoard rows (interval means) and the progress line (steps/s, tokens/s, ETA);
- evaluations every eval_every steps and at the end; the final metrics go into the last checkpoint's
  metadata, so a finished stage is skipped by later runs (`finished`).
A restarted run replays exactly what it would have done: the state is restored bitwise, the iterator
resumes at its saved position, and a stage derives any randomness from the step number alone.

Checkpoint metadata (one schema for every stage): kind ('lm' | 'reward': what `state.params` is), stage,
model (ModelConfig.to_dict()), steps (the target), data_iterator (Grain state JSON), final_metrics (None
until the stage finished; then its scalar evaluation results).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from bond_jax import checkpoint, metrics as metrics_lib, sharding, update, workdir as workdir_lib
from bond_jax.data import pipeline
from bond_jax.models.config import ModelConfig

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect of a job that stopped on SIGTERM


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How long a stage trains and how often it logs, evaluates and saves (all >= 1; validation.py)."""
  steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  keep_checkpoints: int = 2
  max_bad_steps: int = 5

  def logged(self, step: int) -> bool:
    """Whether the loop logs after `step` (1-based): the first, every log_every-th and the last step (a
    resumed run also logs its first step)."""
    return step == 1 or step % self.log_every == 0 or step == self.steps

  @classmethod
  def from_section(cls, section: Any) -> "Schedule":
    """From a config section with these keys (config.sft, config.reward_training, config.train)."""
    return cls(**{f.name: int(section[f.name]) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Stage:
  """What a stage hands the loop.

  name: the stage's directory in the workdir ('sft', 'reward', 'bond').
  kind: what state.params is ('lm' or 'reward'), recorded in the checkpoint metadata.
  mesh: the device mesh every step runs under (jax.set_mesh: the model's sharding constraints apply).
  state: the fresh update.TrainState on the mesh (also the restore target).
  step: the jitted update, (state, batch) -> (state, metrics with 'step_skipped'); update.build_update_step.
  batches: the stage's host batches (a restorable Grain dataset).
  prepare: (host batch, state, step) -> (update batch on the mesh, {metric: float or device scalar}); the
    metrics may hold 'tokens' (real tokens processed, for the rate; not logged). Device scalars are
    fetched with the step's metrics, after the step is dispatched: nothing waits between the two. `step` is the 1-based step being run: a
    stage derives its randomness from it, so a resumed run draws the same.
  evaluate: (state, step, final) -> results (floats are logged; final=True at the last step may cost
    more), or None for no evaluation.
  eval_line: results -> the console line of an evaluation (default: the scalars).
  evaluate_first: evaluate at step 0 before training (a fresh run only).
  progress_keys: the metrics the progress line shows (default: all).
  base: with LoRA, the identity of the frozen base the state's adapters sit on ({'path', 'hash', 'lora'}),
    stored in every checkpoint's metadata; a resume onto another base is refused before the restore.
  observe: (step, the step's metrics as floats) -> None, called after each step (e.g. a warning).
  """
  name: str
  kind: str
  mesh: jax.sharding.Mesh
  model: ModelConfig
  schedule: Schedule
  state: update.TrainState
  step: Callable[[update.TrainState, Any], tuple[update.TrainState, dict]]
  batches: grain.IterDataset
  prepare: Callable[[Any, update.TrainState, int], tuple[Any, dict[str, float]]]
  evaluate: Callable[[update.TrainState, int, bool], dict[str, Any]] | None = None
  eval_line: Callable[[dict[str, Any]], str] | None = None
  evaluate_first: bool = False
  progress_keys: Sequence[str] = ()
  base: dict[str, Any] | None = None
  observe: Callable[[int, dict[str, float]], None] | None = None


def finished(workdir: str, stage: str, steps: int) -> dict[str, Any] | None:
  """The final metrics of a stage that already ran `steps` (or more) steps, else None."""
  directory = workdir_lib.checkpoint_dir(workdir, stage)
  try:
    meta, step = checkpoint.read_meta(directory)
  except (ValueError, FileNotFoundError, OSError):
    return None
  if step >= steps and meta.get("final_metrics") is not None:
    return dict(meta["final_metrics"])
  return None


class Preemption:
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


def _scalars(results: Mapping[str, Any]) -> dict[str, float]:
  return {
      k: float(v) for k, v in results.items()
      if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
  }


def _say(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)


def _check_base(mngr, base: dict[str, Any] | None) -> None:
  """One-line ValueError when the newest checkpoint's adapters were trained on another base (or with other
  LoRA settings, or without LoRA) than this run's: restoring them onto it would train a different model."""
  steps = mngr.all_steps()
  if not steps:
    return
  meta, step = checkpoint.read_meta(str(mngr.directory), max(steps))
  old = meta.get("base")
  if old == (None if base is None else json.loads(json.dumps(base))):  # as JSON stores it (tuples: lists)
    return
  what = lambda b: "no LoRA base (full params)" if b is None else f"base {b['path']} (hash {b['hash']}, " \
      f"lora rank {b['lora']['rank']})"
  raise ValueError(f"checkpoint {mngr.directory}/{step} holds adapters for {what(old)}, but this run's is "
                   f"{what(base)}: resume with the same reference model and lora settings, or use a new "
                   "workdir")


class _Run:
  """One call of `run`: the loop's state between steps (kept out of `run` so each part reads alone)."""

  def __init__(self, stage: Stage, workdir: str):
    self.stage, self.workdir = stage, workdir
    self.schedule = stage.schedule
    self.mngr = checkpoint.manager(workdir_lib.checkpoint_dir(workdir, stage.name),
                                   max_to_keep=self.schedule.keep_checkpoints)
    self.state, self.iterator, self.start = stage.state, iter(stage.batches), 0
    _check_base(self.mngr, stage.base)
    restored = checkpoint.restore_latest_good(self.mngr, stage.state)
    if restored is not None:
      self.state, meta, self.start = restored
      self.iterator = pipeline.restore_iterator(stage.batches, meta["data_iterator"])
      # every process says where it resumed (each restores its own shards)
      print(f"[{stage.name}] resumed from {self.mngr.directory} at step {self.start}", flush=True)
    self.writer = metrics_lib.MetricsWriter(workdir_lib.stage_dir(workdir, stage.name), self.start)
    self.progress = metrics_lib.Progress(stage.name, self.schedule.steps)
    self.pending: list[dict[str, float]] = []
    self.bad_in_a_row = self.applied_since_save = 0
    self.final: dict[str, Any] | None = None
    self.last_eval: dict[str, Any] = {}  # the latest evaluation's results

  def save(self, step: int, force: bool) -> None:
    meta = dict(kind=self.stage.kind, stage=self.stage.name, model=self.stage.model.to_dict(),
                steps=self.schedule.steps, final_metrics=self.final,
                data_iterator=pipeline.iterator_state_json(self.iterator))
    if self.stage.base is not None:
      meta["base"] = self.stage.base
    checkpoint.save(self.mngr, step, self.state, meta, force=force)
    self.applied_since_save = 0

  def evaluate(self, step: int) -> None:
    began = time.perf_counter()
    final = step == self.schedule.steps
    results = self.stage.evaluate(self.state, step, final)
    self.progress.exclude(time.perf_counter() - began)
    self.writer.write(step, _scalars(results), kind="eval")
    line = self.stage.eval_line(results) if self.stage.eval_line else " ".join(
        f"{k} {v:.4g}" for k, v in sorted(_scalars(results).items()))
    _say(f"[{self.stage.name}] eval step {step}: {line}")
    self.last_eval = results
    if final:
      self.final = dict(step=step, **_scalars(results))

  def log(self, step: int) -> None:
    # a metric some steps do not measure (J-BOND's kl_policy_ref) is the mean of the steps that do
    keys = dict.fromkeys(k for m in self.pending for k in m)
    means = {k: float(np.mean([m[k] for m in self.pending if k in m])) for k in keys}
    self.pending = []
    text, tokens_per_s = self.progress.line(step, means, self.stage.progress_keys)
    _say(text)
    self.writer.write(step, dict(means, tokens_per_s=tokens_per_s))

  def train_step(self, step: int) -> dict[str, float]:
    batch, stats = self.stage.prepare(next(self.iterator), self.state, step)
    self.state, metrics = self.stage.step(self.state, batch)
    metrics, stats = sharding.to_host((metrics, stats))  # one fetch, after the step is dispatched
    metrics = {k: float(v) for k, v in metrics.items()}
    tokens = float(stats.pop("tokens", 0.0))
    metrics.update({k: float(v) for k, v in stats.items()})
    if self.stage.observe is not None:
      self.stage.observe(step, metrics)
    self.progress.step_done(step, tokens)
    if metrics["step_skipped"]:
      self.bad_in_a_row += 1
    else:
      self.bad_in_a_row, self.applied_since_save = 0, self.applied_since_save + 1
    if self.bad_in_a_row >= self.schedule.max_bad_steps:
      raise FloatingPointError(
          f"[{self.stage.name}] {self.bad_in_a_row} steps in a row had a non-finite loss or gradient "
          f"(last at step {step}); stopping without saving them. Lower the learning rate or check the inputs")
    return metrics

  def close(self) -> None:
    self.writer.close()
    self.mngr.close()


def run(stage: Stage, workdir: str, *, stop_at_step: int | None = None) -> dict[str, Any] | None:
  """Train `stage` to schedule.steps, resuming from its newest good checkpoint.

  stop_at_step: leave after that step (checkpointed), as a preemption would (tests; time boxes).
  Returns the final metrics ({'step', **the final evaluation's scalars}; what `finished` returns later), or
  None when stopped early.
  """
  with jax.set_mesh(stage.mesh):
    return _train(stage, workdir, stop_at_step)


def _train(stage: Stage, workdir: str, stop_at_step: int | None) -> dict[str, Any] | None:
  r, schedule = _Run(stage, workdir), stage.schedule
  last = schedule.steps if stop_at_step is None else min(schedule.steps, stop_at_step)
  preemption = Preemption()
  try:
    if r.start == 0 and stage.evaluate_first and stage.evaluate is not None:
      r.evaluate(0)
    for step in range(r.start + 1, last + 1):
      r.pending.append(r.train_step(step))
      if step == r.start + 1 or schedule.logged(step) or step == last:
        r.log(step)
      if stage.evaluate is not None and (step % schedule.eval_every == 0 or step == schedule.steps):
        r.evaluate(step)
      if step == schedule.steps and r.final is None:
        r.final = dict(step=step)
      stopping = preemption.stop_now()
      if r.applied_since_save and (stopping or step == last or step % schedule.checkpoint_every == 0):
        r.save(step, force=stopping or step == last)
      if stopping:  # the newest checkpoint: this step's, or an earlier one when every step since was skipped
        r.mngr.wait_until_finished()
        # every process says it (each was signalled; a scheduler reads each one's log)
        print(f"[{stage.name}] SIGTERM: checkpoint saved at step {r.mngr.latest_step()}; stopping",
              flush=True)
        raise SystemExit(EXIT_PREEMPTED)
    if r.start >= schedule.steps:  # a checkpoint at or past a lowered target, without final metrics
      if stage.evaluate is not None:
        r.evaluate(r.start)
      r.final = dict(step=r.start, **_scalars(r.last_eval))
    r.mngr.wait_until_finished()
  finally:
    preemption.restore()
    r.close()
  return r.final if last >= schedule.steps else None
