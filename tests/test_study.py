"""`python -m bond_jax.study`: the paper's arms, a smoke of two arms end to end, bad input as one line."""

import json
import os
import subprocess
import sys

import pytest

from bond_jax import study
from configs import dialogue

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_paper_study_has_every_arm_of_the_three_figures():
  arms = study.arms_of("paper")
  names = [arm.name for arm in arms]
  assert len(names) == len(set(names)) == 18
  by_figure = {f: [a for a in arms if a.figure == f] for f in ("front", "bond", "anchor")}
  assert {a.overrides["bond.beta_rl"] for a in by_figure["front"] if "bond.beta_rl" in a.overrides
         } == {0.001, 0.01, 0.1, 1.0}
  assert {(a.overrides["bond.eta"], a.overrides["bond.gamma"]) for a in by_figure["front"]
          if "bond.eta" in a.overrides} == {(e, g) for e in (0.01, 0.02, 0.05) for g in (0.0, 1.0)}
  assert {(a.overrides["bond.n"], a.overrides["bond.beta"]) for a in by_figure["bond"]
         } == {(n, b) for n in (4, 8) for b in (0.0, 0.5, 1.0)}
  assert all(a.overrides["bond.k"] == 16 for a in by_figure["bond"])
  ema, hard = by_figure["anchor"]
  assert 1 / ema.overrides["bond.eta"] == hard.overrides["bond.anchor_period"]  # the same effective rate
  assert [a.name for a in study.arms_of("paper", "rloo_beta1, anchor_hard")] == ["rloo_beta1", "anchor_hard"]
  configs = {a.name: study.arm_config(dialogue.get_config(), "/base", a) for a in arms}
  assert study._same_configs(configs) == {"anchor_ema": "jbond_eta0.02_gamma1"}  # run once, read twice
  # Every arm samples the study's prompts a step, not the Quickstart's, unless told to keep the config's.
  assert {c.train.batch_size for c in configs.values()} == {study.PROMPTS_PER_STEP} != {48}
  assert study.arm_config(dialogue.get_config(), "/base", arms[0], 0).train.batch_size == 48


def _smoke_config():
  config = dialogue.get_config("smoke")
  config.train.update(steps=2, eval_every=1, checkpoint_every=2, log_every=1)
  config.eval.update(num_prompts=4, quantile_samples=8, policy_samples=2, best_of=(1, 2, 4))
  return config


def test_two_arms_run_end_to_end_then_resume_as_finished(smoke_stages, tmp_path, capsys):
  import shutil
  workdir = str(tmp_path / "base")
  shutil.copytree(smoke_stages, workdir)
  names = "jbond_eta0.05_gamma0,bond_n4_beta0.5"
  study_dir = study.run(_smoke_config(), workdir, "paper", names, parallel=2, prompts_per_step=0)
  table = open(os.path.join(study_dir, "results.md")).read()
  for name in names.split(","):
    row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    assert "pending" not in row and " 2 |" in row
    history = [
        json.loads(line) for line in open(os.path.join(study_dir, name, "bond", "eval", "history.jsonl"))
    ]
    assert [h["step"] for h in history] == [0, 1, 2]
  bond_row = json.load(open(os.path.join(study_dir, "results.json")))["bond_n4_beta0.5"]["history"][-1]
  assert {"kl_bon_to_policy", "kl_policy_to_bon", "quantile_ks", "kl_policy_ref_exact",
          "kl_stopping"} <= set(bond_row)
  per_position = f"{bond_row['kl_policy_ref_exact']:.3f} +- {bond_row['kl_policy_ref_exact_stderr']:.3f}"
  assert f"| {per_position} ({bond_row['kl_stopping']:.3f}) |" in table
  assert bond_row["tracked_n"] == 4.0
  assert {"front.png", "bond.png"} <= set(os.listdir(study_dir))
  capsys.readouterr()
  study.run(_smoke_config(), workdir, "paper", names, parallel=2,
            prompts_per_step=0)  # both finished: nothing runs
  assert "2 finished, running 0" in capsys.readouterr().out

  # A later arm reads pi_ref's pools (one per held-out set) instead of drawing them, and its evaluation
  # of the starting policy (pi_ref itself, the same key) is bitwise the one made with the drawn pools.
  # The BOND arm kept pi_ref's k samples of each of its 2 steps beside them (bond.pool_dir; a second BOND
  # arm reads them: tests/test_reference_pools.py reads a pool from another process).
  pools = sorted(
      p.split("-")[0] for p in os.listdir(os.path.join(study_dir, "reference_pools")) if p.endswith(".npz"))
  assert pools == ["held_out_topics", "in_distribution", "train", "train"]
  assert open(os.path.join(study_dir,
                           "bond_n4_beta0.5.log")).read().count("samples per prompt drawn into") == 2
  # Fig. 5's EMA arm has the config of a front arm: it is run once and linked.
  study.run(_smoke_config(), workdir, "paper", "jbond_eta0.02_gamma1,anchor_ema", prompts_per_step=0)
  assert "2 arms, 0 finished, 1 the same run as another, running 1" in capsys.readouterr().out
  assert open(os.path.join(study_dir, "jbond_eta0.02_gamma1.log")).read().count("pool read from") == 2
  first = [_history(study_dir, name)[0] for name in ("jbond_eta0.05_gamma0", "jbond_eta0.02_gamma1")]
  assert first[0] == first[1]
  assert os.path.islink(os.path.join(study_dir, "anchor_ema"))
  assert _history(study_dir, "anchor_ema") == _history(study_dir, "jbond_eta0.02_gamma1")


def _history(study_dir, name):
  with open(os.path.join(study_dir, name, "bond", "eval", "history.jsonl")) as f:
    return [json.loads(line) for line in f]


def _cli(*flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run(
      [sys.executable, "-m", "bond_jax.study", "--config=configs/dialogue.py:smoke", *flags], cwd=REPO,
      env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags,message", [
    (["--study=fig9"], "--study='fig9'; allowed: paper"),
    (["--arms=jbond_eta0.3_gamma0"], "--arms: unknown arm 'jbond_eta0.3_gamma0' of study 'paper'; allowed:"),
    (["--parallel=0"], "--parallel=0 must be >= 1"),
    (["--prompts_per_step=-1"], "--prompts_per_step=-1; allowed: 0 (the config's train.batch_size) or a"),
    ([], "has no finished sft stage"),
])
def test_bad_input_is_one_line_exit_2(flags, message, tmp_path, smoke_stages):
  workdir = smoke_stages if flags else str(tmp_path)  # an empty workdir has no finished stages
  before = sorted(os.listdir(workdir))
  result = _cli(f"--workdir={workdir}", *flags)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr
  assert sorted(os.listdir(workdir)) == before  # nothing written
