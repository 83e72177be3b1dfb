"""The one owner of the stage order: validate, prepare the workdir once, then SFT -> reward model -> BOND.

    run(config, workdir, until="bond")
1. validation.validate: the WHOLE config (and the paths it names) before anything is written or computed;
2. the workdir's guard (workdir.check_config) against what made it, then its preparation, once: the
   config.json guard, the tokenizer, the distillation prompts (read and checked: what fits the prompt
   buckets) and the chitchat datasets (process 0 first when there are several);
3. the stages in order, each skipped when its checkpoint says it finished: SFT (unless config.reference
   names pi_ref), the reward model (unless config.reward_model names one), the distillation stage.
   `until` stops after a stage ('sft', 'reward' or 'bond').
No stage imports another: each gets the prepared Context and hands a loop.Stage to the one loop.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Callable

import jax
import ml_collections
from jax.experimental import multihost_utils

from bond_jax import loop, sharding, validation, workdir as workdir_lib
from bond_jax.data import prepare, prompts as prompts_lib
from bond_jax.stages import distill, reward_model, sft
from bond_jax.stages.context import Context

# (stage name, its module, its config section)
STAGES = (("sft", sft, "sft"), ("reward", reward_model, "reward_training"), ("bond", distill, "train"))


def planned_stages(config: ml_collections.ConfigDict, until: str) -> list[tuple[str, Any, str]]:
  """The stages a run of `config` runs, in order, up to and including `until`."""
  given = {
      "sft": bool(config.reference),
      "reward": bool(config.reward_model or config.get("reward_fn")),
      "bond": False
  }
  names = [name for name, _, _ in STAGES]
  return [s for s in STAGES[:names.index(until) + 1] if not given[s[0]]]


def _process_zero_first(name: str, fn: Callable[[], Any]) -> Any:
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
  multihost_utils.sync_global_devices(f"bond_jax.pipeline: {name}")
  if error is not None:
    raise error
  return out if jax.process_index() == 0 else fn()


def _writable(workdir: str) -> None:
  """The workdir exists as a writable directory (made if absent); one line naming it otherwise."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r} is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise ValueError(f"workdir {workdir!r} cannot be created: {error.strerror or error}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f"workdir {workdir!r} is not writable")


@contextlib.contextmanager
def _undone_if_refused(workdir: str):
  """A ValueError raised in the block (e.g. prompts refused once the tokenizer exists) leaves the workdir as
  the block found it: the directory, the guard and the tokenizer it made are removed, so a corrected rerun
  starts clean."""
  added = [
      path for path in (workdir, os.path.join(workdir, "config.json"), workdir_lib.tokenizer_dir(workdir))
      if not os.path.exists(path)
  ]
  try:
    yield
  except ValueError:
    for path in added:
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
    raise


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, until: str, mesh) -> Context:
  """Record the guard, build (or open) the tokenizer, read and check the distillation prompts with it (a
  prompt bucket too narrow for every prompt is refused here, before SFT), then the datasets the planned
  stages read."""
  names = {name for name, _, _ in planned_stages(config, until)}
  workdir_lib.record_config(config, workdir)
  tokenizer = prepare.tokenizer(config, workdir)
  prompts = prompts_lib.prompt_sources(config, tokenizer) if "bond" in names else None
  chitchat = config.data.task == "chitchat"
  return Context(
      config=config, workdir=workdir, mesh=mesh, tokenizer=tokenizer, prompts=prompts,
      dialogues=prepare.dialogue_builder(config, workdir) if "sft" in names else None,
      preferences=prepare.preference_builder(config, workdir) if chitchat and "reward" in names else None)


def setup(config: ml_collections.ConfigDict, workdir: str, until: str = "bond") -> Context:
  """Steps 1 and 2: validate everything, check the guard and the workdir, prepare the workdir once."""
  validation.validate(config, until)
  workdir_lib.check_config(config, workdir)
  with _undone_if_refused(workdir):
    _writable(workdir)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    return _process_zero_first("prepare workdir", lambda: prepare_workdir(config, workdir, until, mesh))


def stage_finished(config: ml_collections.ConfigDict, workdir: str, name: str) -> dict[str, Any] | None:
  """The final metrics of stage `name` in workdir if it finished under this config, else None."""
  if name == "reward":
    return reward_model.finished(config, workdir)
  return loop.finished(workdir, name, config[dict((n, s) for n, _, s in STAGES)[name]].steps)


def run(config: ml_collections.ConfigDict, workdir: str, until: str = "bond") -> dict[str, dict[str, Any]]:
  """Run the planned stages; returns {stage name: its final metrics (the last evaluation for 'bond')}."""
  ctx = setup(config, workdir, until)
  results = {}
  for name, module, section in planned_stages(config, until):
    done = stage_finished(config, workdir, name)
    if done is not None:
      if jax.process_index() == 0:
        print(f"[{name}] finished already (step {done['step']})", flush=True)
    elif name == "reward" and workdir_lib.is_bag_of_words(config):  # fitted in one call, not a loop
      done = _process_zero_first("bag-of-words reward", lambda: reward_model.fit_bag_of_words(ctx))
    else:
      with jax.set_mesh(ctx.mesh):
        done = loop.run(module.build(ctx), workdir)
    results[name] = done
    if jax.process_index() == 0:
      print(module.report(done), flush=True)
  return results
