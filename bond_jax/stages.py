"""The training loop shared by the SFT and reward-model stages: sharded state, jitted step, resume, logs.

State (a dict pytree, checkpointed whole): params, opt_state, step (int32 []), rng (typed key; the seed
stream of the stage, carried so a stage with stochastic steps resumes bit-exactly; SFT and the
Bradley-Terry step are deterministic and leave it unchanged).
Checkpoint meta: kind ('lm' | 'reward'), stage, model (ModelConfig dict), data_iterator (Grain state
JSON), steps (the target), final_metrics (present once the stage finished: a later run returns them
without training).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags
from jax.sharding import Mesh

from bond_jax import checkpoint, cli as cli_lib, sharding, update, workdir as wd
from bond_jax.data import pipeline
from bond_jax.models.config import ModelConfig

State = dict[str, Any]
LossFn = Callable[[Any, dict], tuple[jax.Array, dict]]  # (params, batch) -> (loss, metrics)


def make_optimizer(stage_config, steps: int) -> optax.GradientTransformation:
  """Adam(W), linear warm-up then cosine decay to 10% over the stage's steps, global-norm clip 1."""
  warmup = min(stage_config.warmup_steps, steps)
  return update.make_optimizer(update.OptimizerConfig(
      learning_rate=stage_config.learning_rate, warmup_steps=warmup, schedule="cosine",
      decay_steps=max(steps - warmup, 1), end_lr_fraction=0.1,
      weight_decay=stage_config.get("weight_decay", 0.0), max_grad_norm=1.0))


def init_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array, mesh: Mesh) -> State:
  """The state around sharded `params`; tx.init runs under the mesh so every leaf is a global array."""
  replicated = sharding.replicated(mesh)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(optimizer.init)(params)
  return dict(params=params, opt_state=opt_state, step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
              rng=jax.device_put(rng, replicated))


def state_shardings(state: State) -> Any:
  return jax.tree.map(lambda x: x.sharding, state)


def batch_shardings(mesh: Mesh, ndims: dict[str, int]) -> dict[str, Any]:
  """Rows of every batch array split over ('data', 'fsdp')."""
  return {k: sharding.batch_sharding(mesh, n) for k, n in ndims.items()}


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, shardings: Any, mesh: Mesh,
                    ndims: dict[str, int]):
  """jit(step(state, batch) -> (state, metrics)); state donated, params kept on their logical layout."""

  def step(state: State, batch: dict) -> tuple[State, dict]:
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return dict(params=params, opt_state=opt_state, step=state["step"] + 1, rng=state["rng"]), metrics

  return jax.jit(step, in_shardings=(shardings, batch_shardings(mesh, ndims)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def finished_metrics(workdir: str, stage: str, steps: int) -> dict[str, Any] | None:
  """The final metrics of a stage that already ran `steps` (or more) steps, else None."""
  directory = wd.checkpoint_dir(workdir, stage)
  if not os.path.isdir(directory):
    return None
  try:
    meta, step = checkpoint.read_meta(directory)
  except (ValueError, FileNotFoundError):
    return None
  if step >= steps and meta.get("final_metrics") is not None:
    return dict(meta["final_metrics"])
  return None


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 60}m{seconds % 60:02d}s"


@dataclasses.dataclass
class Progress:
  """Console progress: step, interval means of the metrics, real tokens/s, ETA (compile excluded)."""
  stage: str
  total: int
  _t0: float | None = None
  _s0: int = 0
  _tokens: int = 0

  def step_done(self, step: int, tokens: int) -> None:
    """Call after each step with its real-token count."""
    if self._t0 is None:  # the first step of this process includes compilation: time from its end
      self._t0, self._s0 = time.perf_counter(), step
    else:
      self._tokens += tokens

  def exclude(self, seconds: float) -> None:
    """Leave `seconds` (an evaluation) out of the training throughput."""
    if self._t0 is not None:
      self._t0 += seconds

  def line(self, step: int, metrics: dict[str, float]) -> tuple[str, float]:
    elapsed = time.perf_counter() - self._t0 if self._t0 else 0.0
    done = step - self._s0
    rate = self._tokens / elapsed if elapsed > 0 else 0.0
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    shown = " ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
    eta_text = _format_seconds(eta) if np.isfinite(eta) else "?"
    return f"[{self.stage}] step {step}/{self.total} {shown} tok/s {rate:,.0f} eta {eta_text}", rate


def train(*, workdir: str, stage: str, kind: str, model_cfg: ModelConfig, state: State, mesh: Mesh,
          dataset: grain.IterDataset, loss_fn: LossFn, optimizer: optax.GradientTransformation,
          ndims: dict[str, int], evaluate: Callable[[Any, bool], dict[str, float]], steps: int,
          log_every: int, eval_every: int, checkpoint_every: int, stop_at_step: int | None = None,
          keep_checkpoints: int = 2) -> tuple[State, dict[str, Any] | None]:
  """Train `state` to `steps`, resuming from the stage's latest checkpoint.

  tokens of a batch = batch['mask'].sum() (for tokens/s). evaluate(params, final) -> metrics runs every
  `eval_every` steps and at the end (final=True: the stage's reported numbers, may cost more).
  stop_at_step: leave after that step (checkpointed), as a preemption would (tests; time boxes).
  Returns (state, final metrics or None when stopped early).
  """
  for name, value in (("steps", steps), ("log_every", log_every), ("eval_every", eval_every),
                      ("checkpoint_every", checkpoint_every)):
    if value < 1:
      raise ValueError(f"{stage}.{name}={value} must be >= 1")
  shardings = state_shardings(state)
  train_step = make_train_step(loss_fn, optimizer, shardings, mesh, ndims)
  mngr = checkpoint.manager(wd.checkpoint_dir(workdir, stage), max_to_keep=keep_checkpoints)
  metrics_file = wd.metrics_path(workdir, stage)
  iterator: Iterator = iter(dataset)
  if mngr.latest_step() is not None:
    state, meta, start = checkpoint.restore(mngr, state)
    iterator = pipeline.restore_iterator(dataset, meta["data_iterator"])
    wd.truncate_metrics(metrics_file, start)
    logging.info("[%s] resumed from step %d of %s", stage, start, mngr.directory)
    print(f"[{stage}] resumed at step {start}", flush=True)
  start = int(jax.device_get(state["step"]))

  def meta(final: dict | None = None) -> dict:
    return dict(kind=kind, stage=stage, model=wd.as_dict(model_cfg), steps=steps, final_metrics=final,
                data_iterator=pipeline.iterator_state_json(iterator))

  progress = Progress(stage, steps)
  pending: list[dict] = []
  last = min(steps, stop_at_step) if stop_at_step is not None else steps
  final = None
  for step in range(start + 1, last + 1):
    batch = next(iterator)
    state, metrics = train_step(state, sharding.shard_batch(batch, mesh))
    pending.append(metrics)
    progress.step_done(step, int(batch["mask"].sum()))
    if step == start + 1 or step % log_every == 0 or step == last:
      means = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
      pending = []
      text, rate = progress.line(step, means)
      print(text, flush=True)
      wd.append_metrics(metrics_file, dict(step=step, tokens_per_s=rate, **means))
    if step == steps or step % eval_every == 0:
      eval_start = time.perf_counter()
      evaluated = evaluate(state["params"], step == steps)
      progress.exclude(time.perf_counter() - eval_start)
      shown = " ".join(f"{k} {v:.4g}" for k, v in sorted(evaluated.items()) if isinstance(v, float))
      print(f"[{stage}] eval step {step}: {shown}", flush=True)
      wd.append_metrics(metrics_file, dict(step=step, **evaluated))
      if step == steps:
        final = dict(step=step, **evaluated)
    if step == last or step % checkpoint_every == 0:
      checkpoint.save(mngr, step, state, meta(final), force=step == last)
  if start >= steps:
    # The checkpoint is at or past the (lowered) target but was stopped before its final evaluation.
    final = dict(step=start, **evaluate(state["params"], True))
  mngr.wait_until_finished()
  mngr.close()
  return state, final


def cli(run_fn: Callable[..., dict], report_fn: Callable[[dict], str]) -> None:
  """absl main of a stage: --config (a config file, e.g. configs/dialogue.py) and --workdir."""
  config = config_flags.DEFINE_config_file("config", "configs/dialogue.py", "Experiment config file.")
  workdir = flags.DEFINE_string("workdir", "runs/dialogue", "Run directory shared by all stages.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file at INFO
    try:
      print(report_fn(run_fn(config.value, workdir.value)), flush=True)
    except ValueError as error:  # configuration and input errors: one line, no traceback
      print(f"error: {error}", file=sys.stderr)
      sys.exit(2)

  app.run(main, flags_parser=cli_lib.parse_flags)
