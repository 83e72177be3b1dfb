"""The one loop serves every stage the same way: SIGTERM checkpoints and exits 143, a SIGKILL resumes
bitwise, metrics.jsonl keeps one row per step across restarts, and the non-finite guard stops any stage
without saving (and without rotating the good checkpoints away)."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_damage as damage

from bond_jax import checkpoint, loop, metrics, pipeline, workdir as workdir_lib
from bond_jax.stages import distill, reward_model, sft
from configs import dialogue

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
    "--config=configs/dialogue.py:smoke", "--until=reward", "--config.sft.checkpoint_every=2",
    "--config.sft.log_every=1", "--config.reward_training.checkpoint_every=2",
    "--config.reward_training.log_every=1"
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A workdir with its guard, tokenizer and datasets (no stage run yet)."""
  workdir = str(tmp_path_factory.mktemp("prepared"))
  pipeline.setup(dialogue.get_config("smoke"), workdir, until="reward")
  return workdir


def _start(workdir, cache):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, "-m", "bond_jax.train", f"--workdir={workdir}", *FLAGS], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _steps(workdir, stage):
  directory = workdir_lib.checkpoint_dir(workdir, stage)
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _run_until_line(proc, prefix):
  for line in proc.stdout:
    if line.startswith(prefix):
      return
  raise AssertionError(f"{prefix!r} never printed (exit {proc.wait()})")


def test_sigterm_and_sigkill_in_the_sft_and_reward_stages_resume_bitwise(prepared, tmp_path):
  cache = str(tmp_path / "jax_cache")
  straight = str(tmp_path / "straight")
  shutil.copytree(prepared, straight)
  out, _ = _start(straight, cache).communicate(timeout=600)
  assert "[reward] step 8/8" in out, out[-3000:]

  interrupted = str(tmp_path / "interrupted")
  shutil.copytree(prepared, interrupted)
  proc = _start(interrupted, cache)
  _run_until_line(proc, "[sft] step 3/")  # past the first checkpoint (step 2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == loop.EXIT_PREEMPTED, out[-3000:]
  saved = int(out.split("[sft] SIGTERM: checkpoint saved at step ")[1].split(";")[0])
  assert max(_steps(interrupted, "sft")) == saved < 12 and not _steps(interrupted, "reward")

  proc = _start(interrupted, cache)  # finishes SFT, then dies mid-reward with no chance to save
  _run_until_line(proc, "[reward] step 5/")
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert max(_steps(interrupted, "reward")) < 8

  proc = _start(interrupted, cache)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert "[sft] finished already" in out and "[reward] resumed from" in out
  for stage in ("sft", "reward"):
    a, meta_a, step_a = checkpoint.restore_arrays(workdir_lib.checkpoint_dir(straight, stage))
    b, meta_b, step_b = checkpoint.restore_arrays(workdir_lib.checkpoint_dir(interrupted, stage))
    assert step_a == step_b and meta_a["data_iterator"] == meta_b["data_iterator"]
    assert meta_a["final_metrics"] == meta_b["final_metrics"]
    jax.tree.map(np.testing.assert_array_equal, a, b)
    rows = metrics.read_metrics(workdir_lib.metrics_path(interrupted, stage))
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps)) == list(range(1, step_a + 1)), (stage, train_steps)


def _poisoned(stage: loop.Stage, **schedule) -> loop.Stage:
  """The stage with NaN params: every update is non-finite, so the guard must skip them all."""
  params = jax.tree.map(lambda x: x * jnp.nan, stage.state.params)
  return dataclasses.replace(stage, state=stage.state.replace(params=params),
                             schedule=dataclasses.replace(stage.schedule, **schedule))


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
  """The prepared workdir with its SFT and reward stages done (what the distillation stage reads)."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  shutil.copytree(prepared, workdir, dirs_exist_ok=True)
  config = dialogue.get_config("smoke")
  config.eval.num_prompts = 0
  pipeline.run(config, workdir, until="reward")
  return workdir, config


@pytest.mark.parametrize("module", [sft, reward_model, distill], ids=["sft", "reward", "bond"])
def test_the_non_finite_guard_stops_every_stage_without_saving(module, trained, tmp_path):
  workdir, config = trained
  target = str(tmp_path / "run")
  shutil.copytree(workdir, target, ignore=shutil.ignore_patterns(module.STAGE))
  ctx = pipeline.setup(config, target)
  with jax.set_mesh(ctx.mesh):
    stage = _poisoned(module.build(ctx), max_bad_steps=2, checkpoint_every=1)
  with pytest.raises(FloatingPointError, match=rf"\[{module.STAGE}\] 2 steps in a row had a non-finite"):
    loop.run(stage, target)
  assert _steps(target, module.STAGE) == []


def test_only_skipped_steps_since_a_checkpoint_never_rotate_it_away(trained, tmp_path):
  workdir, config = trained
  target = str(tmp_path / "run")
  shutil.copytree(workdir, target, ignore=shutil.ignore_patterns("sft"))
  config = dialogue.get_config("smoke")
  config.eval.num_prompts = 0
  ctx = pipeline.setup(config, target, until="sft")
  with jax.set_mesh(ctx.mesh):
    stage = sft.build(ctx)
  stage = dataclasses.replace(
      stage, schedule=dataclasses.replace(stage.schedule, checkpoint_every=1, keep_checkpoints=2,
                                          max_bad_steps=3))
  loop.run(stage, target, stop_at_step=2)
  assert _steps(target, "sft") == [1, 2]
  # Resume with NaN params: restore replaces them by step 2's good ones, so poison after restoring.
  good = stage.step
  nan_step = lambda state, batch: good(
      state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params)), batch)
  with pytest.raises(FloatingPointError, match=r"\[sft\] 3 steps in a row"):
    loop.run(dataclasses.replace(stage, step=nan_step), target)
  assert _steps(target, "sft") == [1, 2]  # steps 3-5 were all skipped: nothing saved, nothing rotated


DAMAGES = {  # what is done to the newest checkpoint -> what its one-line report says
    "flipped_bytes": (damage.flip_bytes, "checksum mismatch"),
    "truncated_file": (damage.truncate, "is damaged"),
    "no_METADATA": (damage.remove_metadata, "_METADATA"),
    "empty_state_dir": (damage.empty, "is damaged"),
}


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(prepared, tmp_path):
  """The newest SFT checkpoint damaged four ways: each run says so in one line naming the step, sets it
  aside and resumes from the one before, ending bitwise where a run resumed from that one by hand ends."""
  cache, base = str(tmp_path / "jax_cache"), str(tmp_path / "base")
  shutil.copytree(prepared, base)
  flags = ["--until=sft", "--config.sft.checkpoint_every=2", "--config.sft.keep_checkpoints=3"]
  run = lambda workdir, steps: subprocess.run([
      sys.executable, "-m", "bond_jax.train", "--config=configs/dialogue.py:smoke", f"--workdir={workdir}",
      *flags, f"--config.sft.steps={steps}"
  ], cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=
                                                                     cache, PYTHONPATH=REPO))
  first = run(base, 6)
  assert first.returncode == 0 and _steps(base, "sft") == [2, 4, 6
                                                          ], first.stdout[-2000:] + first.stderr[-2000:]
  by_hand = str(tmp_path / "by_hand")
  shutil.copytree(base, by_hand)
  shutil.rmtree(os.path.join(workdir_lib.checkpoint_dir(by_hand, "sft"), "6"))
  assert run(by_hand, 10).returncode == 0
  expected, _, _ = checkpoint.restore_arrays(workdir_lib.checkpoint_dir(by_hand, "sft"))
  for name, (spoil, said) in DAMAGES.items():
    damaged = str(tmp_path / name)
    shutil.copytree(base, damaged)
    spoil(os.path.join(workdir_lib.checkpoint_dir(damaged, "sft"), "6", "state"))
    proc = run(damaged, 10)
    assert proc.returncode == 0, (name, proc.stderr[-2000:])
    reports = [line for line in (proc.stdout + proc.stderr).splitlines() if " is damaged " in line]
    assert len(reports) == 1 and "step 6" in reports[0] and said in reports[0], (name, reports)
    assert "Traceback" not in proc.stderr and "[sft] resumed from" in proc.stdout
    kept = os.listdir(workdir_lib.checkpoint_dir(damaged, "sft"))
    assert "6.corrupt" in kept and _steps(damaged, "sft") == [6, 8, 10]  # set aside, never deleted
    got, _, step = checkpoint.restore_arrays(workdir_lib.checkpoint_dir(damaged, "sft"))
    assert step == 10, name
    jax.tree.map(np.testing.assert_array_equal, got, expected)
