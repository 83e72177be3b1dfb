"""`python -m bond_jax.study --config=configs/dialogue.py --workdir=runs/dialogue --study=paper`: the paper's
comparisons on one workdir's reference policy and reward model, arm by arm.

Every arm is a distillation run of its own (the one pipeline and loop, bond_jax/pipeline.py) in
<workdir>/study/<study>/<arm>/, with `reference` and `reward_model` set to the workdir (its SFT and reward
stages must have finished) and the arm's overrides on top of --config: the same prompts, seeds, schedule
and evaluation for every arm. Rerunning the command skips finished arms and resumes unfinished ones from
their checkpoints; --parallel runs several arms at once (one process each). When the arms are done,
bond_jax/study_report.py writes results.md, results.json and the plots beside them.

Studies (STUDIES):
  paper   Fig. 7: J-BOND at eta in {0.01, 0.02, 0.05} x gamma in {0, 1} against RLOO at beta_rl in
          {0.001, 0.01, 0.1, 1}, each evaluated every train.eval_every steps (reward vs KL curves);
          Fig. 2: BOND with N in {4, 8} (Monte-Carlo quantiles from k = 16 reference samples) at
          beta in {0, 0.5, 1}, with KL(pi_BoN || pi) and KL(pi || pi_BoN) estimates;
          Fig. 5: J-BOND with the EMA anchor (eta 0.02, gamma 1) against hard anchor updates every 50
          steps (the same effective rate, 1 / eta). The EMA arm is the front's jbond_eta0.02_gamma1: an
          arm whose config equals an earlier arm's is run once and linked.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import time
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from bond_jax import cli, loop, pipeline, study_report, validation
from bond_jax import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Arm:
  """name: the arm's directory; figure: which comparison it belongs to (study_report groups by it);
  overrides: {'bond.eta': 0.02, ...} applied to the study's config."""
  name: str
  figure: str
  overrides: dict[str, Any]


def _paper_arms() -> list[Arm]:
  arms = [
      Arm(f"jbond_eta{eta:g}_gamma{gamma:g}", "front", {
          "bond.algorithm": "jbond",
          "bond.eta": eta,
          "bond.gamma": gamma
      }) for eta in (0.01, 0.02, 0.05) for gamma in (0.0, 1.0)
  ]
  arms += [
      Arm(f"rloo_beta{beta_rl:g}", "front", {
          "bond.algorithm": "reinforce",
          "bond.beta_rl": beta_rl
      }) for beta_rl in (0.001, 0.01, 0.1, 1.0)
  ]
  arms += [
      Arm(f"bond_n{n}_beta{beta:g}", "bond", {
          "bond.algorithm": "bond",
          "bond.n": n,
          "bond.k": 16,
          "bond.beta": beta,
          "eval.best_of_n_kl": True
      }) for n in (4, 8) for beta in (0.0, 0.5, 1.0)
  ]
  arms += [
      Arm("anchor_ema", "anchor", {
          "bond.algorithm": "jbond",
          "bond.eta": 0.02,
          "bond.gamma": 1.0
      }),
      Arm("anchor_hard", "anchor", {
          "bond.algorithm": "jbond_hard",
          "bond.anchor_period": 50,
          "bond.gamma": 1.0
      }),
  ]
  return arms


STUDIES = {"paper": _paper_arms}
# Every arm's prompts a step, unless --prompts_per_step says otherwise. 16, not the Quickstart's 48: the
# paper study's 18 arms took 51 min on a 2-core CPU at 16 (docs/results.md); at 48 each arm samples 3x
# more (an estimated 2.5 h). The comparisons hold every arm to the same prompts either way.
PROMPTS_PER_STEP = 16


def arms_of(study: str, names: str = "") -> list[Arm]:
  """The arms of `study`, or the comma-separated `names` among them (one-line errors naming the value)."""
  if study not in STUDIES:
    raise ValueError(f"--study={study!r}; allowed: {', '.join(STUDIES)}")
  arms = STUDIES[study]()
  if not names:
    return arms
  by_name = {arm.name: arm for arm in arms}
  wanted = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in wanted if n not in by_name]
  if unknown:
    raise ValueError(f"--arms: unknown arm {unknown[0]!r} of study {study!r}; allowed: {', '.join(by_name)}")
  return [by_name[n] for n in wanted]


def check_base(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The workdir holds finished SFT and reward stages made by this config (one line otherwise)."""
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir!r} is not a directory; run python -m bond_jax.train --until=reward "
                     "there first")
  workdir_lib.check_config(config, workdir)
  for stage, section in (("sft", "sft"), ("reward", "reward_training")):
    if pipeline.stage_finished(config, workdir, stage) is None:
      raise ValueError(f"--workdir={workdir!r} has no finished {stage} stage ({section}.steps="
                       f"{config[section].steps}); run python -m bond_jax.train --config=... "
                       f"--workdir={workdir} --until=reward first")


def arm_config(config: ml_collections.ConfigDict, workdir: str, arm: Arm,
               prompts_per_step: int = PROMPTS_PER_STEP) -> ml_collections.ConfigDict:
  """The study's config with the workdir's pi_ref, reward model and tokenizer, prompts_per_step as
  train.batch_size (0: the config's own), and the arm's overrides."""
  out = ml_collections.ConfigDict(config.to_dict())
  if prompts_per_step:
    out.train.batch_size = prompts_per_step
  out.reference = out.reward_model = os.path.abspath(workdir)
  out.data.tokenizer = os.path.abspath(workdir_lib.tokenizer_path(workdir))
  for key, value in arm.overrides.items():
    section, name = key.split(".")
    out[section][name] = value
  return out


def arm_dir(workdir: str, study: str, arm: Arm) -> str:
  return os.path.join(workdir, "study", study, arm.name)


def _run_arm(config: ml_collections.ConfigDict, directory: str) -> dict[str, Any]:
  """One arm in a fresh process, its console in <arm>.log beside its directory."""
  os.makedirs(directory, exist_ok=True)
  if not flags.FLAGS.is_parsed():  # a spawned worker parses no command line
    flags.FLAGS.mark_as_parsed()
  with open(f"{directory}.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    cli.quiet_console()
    return pipeline.run(config, directory)["bond"]


def _pending(configs: dict[str, ml_collections.ConfigDict], dirs: dict[str, str]) -> list[str]:
  return [name for name in configs if loop.finished(dirs[name], "bond", configs[name].train.steps) is None]


def run(config: ml_collections.ConfigDict, workdir: str, study: str, names: str = "", parallel: int = 1,
        prompts_per_step: int = PROMPTS_PER_STEP) -> str:
  """Validate everything first (the base workdir and every arm's config), then run the pending arms;
  returns the study directory (with the report). prompts_per_step > 0 sets every arm's train.batch_size
  (0: the config's own)."""
  check_base(config, workdir)
  arms = arms_of(study, names)
  if prompts_per_step < 0:
    raise ValueError(f"--prompts_per_step={prompts_per_step}; allowed: 0 (the config's train.batch_size) "
                     "or a positive number of prompts")
  configs = {arm.name: arm_config(config, workdir, arm, prompts_per_step) for arm in arms}
  pools = os.path.join(workdir, "study", study, "reference_pools")
  for arm_cfg in configs.values():  # pi_ref's pools, drawn once for all arms: the evaluation's, and the
    # k samples of each training step that the BOND arms (same prompts and keys per step) all draw
    arm_cfg.eval.pool_dir = arm_cfg.eval.get("pool_dir") or pools
    arm_cfg.bond.pool_dir = arm_cfg.bond.get("pool_dir") or pools
  for name, arm_cfg in configs.items():
    try:
      validation.validate(arm_cfg, "bond")
    except ValueError as error:
      raise ValueError(f"arm {name}: {error}") from None
  dirs = {arm.name: arm_dir(workdir, study, arm) for arm in arms}
  aliases = _same_configs(configs)
  pending = [name for name in _pending(configs, dirs) if name not in aliases]
  same = f", {len(aliases)} the same run as another" if aliases else ""
  print(
      f"[study] {study}: {len(arms)} arms, {len(arms) - len(pending) - len(aliases)} finished{same}, "
      f"running {len(pending)} ({parallel} at a time); logs in {os.path.join(workdir, 'study', study)}/"
      "<arm>.log", flush=True)
  failed = _run_pending(pending, configs, dirs, parallel)
  for name, same in aliases.items():  # e.g. Fig. 5's EMA arm is one of Fig. 7's: run once, read twice
    if same not in failed:
      _link(dirs[same], dirs[name])
      print(f"[study] {name}: the same run as {same}", flush=True)
  study_dir = os.path.join(workdir, "study", study)
  paths = study_report.write(study_dir, arms)
  print(f"[study] report: {', '.join(paths)}", flush=True)
  if failed:
    raise RuntimeError(f"arms failed: {', '.join(failed)} (see their .log files); rerun to resume them")
  return study_dir


def _same_configs(configs: dict[str, ml_collections.ConfigDict]) -> dict[str, str]:
  """{arm: the earlier arm whose config is the same} for arms that would repeat a run."""
  first, aliases = {}, {}
  for name, arm_cfg in configs.items():
    key = json.dumps(arm_cfg.to_dict(), sort_keys=True, default=repr)
    if key in first:
      aliases[name] = first[key]
    first.setdefault(key, name)
  return aliases


def _link(target: str, alias: str) -> None:
  """alias (and alias.log) point at target's directory and log (relative links: the study dir can move)."""
  for suffix in ("", ".log"):
    if not os.path.lexists(alias + suffix) and os.path.exists(target + suffix):
      os.symlink(os.path.basename(target) + suffix, alias + suffix)


def _run_pending(pending: list[str], configs, dirs, parallel: int) -> list[str]:
  """Run the pending arms `parallel` at a time; prints each as it ends with the study's ETA."""
  start, failed = time.time(), []
  context = multiprocessing.get_context("spawn")  # a fresh JAX runtime per arm
  with concurrent.futures.ProcessPoolExecutor(max_workers=parallel, mp_context=context) as pool:
    futures = {pool.submit(_run_arm, configs[name], dirs[name]): name for name in pending}
    for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
      name = futures[future]
      elapsed = time.time() - start
      eta = elapsed / done * (len(pending) - done)
      try:
        result = future.result()
        summary = (f"quantile {result['policy_quantile_mean']:.3f}, KL {result['kl_policy_ref']:.3f}"
                   if "policy_quantile_mean" in result else "done")
      except Exception as error:  # one arm's failure must not stop the others; reported at the end
        failed.append(name)
        summary = f"FAILED: {cli.describe(error)}"
      print(
          f"[study] {done}/{len(pending)} {name}: {summary} | {elapsed / 60:.1f} min, ETA "
          f"{eta / 60:.1f} min", flush=True)
  return failed


def _define_flags() -> None:
  """The command line's flags, defined only when this module is the program: tests import it beside the
  other CLIs (whose --config / --workdir would clash), and spawned arm workers parse no flags."""
  config_flags.DEFINE_config_file(
      "config", None, "The config the workdir was made with, e.g. "
      "configs/dialogue.py; --config.x=y overrides apply to every arm.", lock_config=True)
  flags.DEFINE_string("workdir", None, "A workdir with finished SFT and reward stages.")
  flags.DEFINE_string("study", "paper", f"Which study: {', '.join(STUDIES)}.")
  flags.DEFINE_string("arms", "", "Comma-separated arm names (default: all of the study's arms).")
  flags.DEFINE_integer("parallel", max(1, (os.cpu_count() or 1) // 2), "Arms run at once.")
  flags.DEFINE_integer(
      "prompts_per_step", PROMPTS_PER_STEP, "Every arm's train.batch_size (0: the config's own). "
      f"{PROMPTS_PER_STEP}: the paper study took 51 min on a 2-core CPU.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if f.parallel < 1:
    raise ValueError(f"--parallel={f.parallel} must be >= 1")
  run(f.config, f.workdir, f.study, f.arms, f.parallel, f.prompts_per_step)


if __name__ == "__main__":
  _define_flags()
  cli.entry(main)
