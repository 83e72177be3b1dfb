"""The pipeline: one owner of the stage order, the whole config checked before anything is written or
computed, and stages that never import one another."""

import ast
import hashlib
import os
import pathlib
import time

import pytest

from bond_jax import pipeline
from configs import dialogue

REPO = pathlib.Path(__file__).resolve().parents[1]
STAGE_MODULES = {"bond_jax.stages.sft", "bond_jax.stages.reward_model", "bond_jax.stages.distill"}


def _imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def test_no_stage_imports_another_stage_and_only_the_pipeline_imports_stages():
  for path in (REPO / "bond_jax" / "stages").glob("*.py"):
    own = f"bond_jax.stages.{path.stem}"
    assert not (_imports(path) & (STAGE_MODULES - {own})), f"{path.name} imports another stage"
  importers = {
      str(p.relative_to(REPO)) for p in (REPO / "bond_jax").rglob("*.py")
      if p.parent.name != "stages" and _imports(p) & STAGE_MODULES
  }
  assert importers == {"bond_jax/pipeline.py"}


def test_planned_stages_skip_what_the_config_gives_and_stop_at_until():
  config = dialogue.get_config("smoke")
  names = lambda until: [name for name, _, _ in pipeline.planned_stages(config, until)]
  assert names("bond") == ["sft", "reward", "bond"] and names("sft") == ["sft"]
  assert names("reward") == ["sft", "reward"]
  config.reference = "/some/sft"
  assert names("bond") == ["reward", "bond"]
  config.reward_model = "/some/rm"
  assert names("bond") == ["bond"] and names("reward") == []


def _tree_hashes(root: pathlib.Path) -> dict[str, str]:
  return {
      str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
      if p.is_file()
  }


BAD_CONFIGS = [
    ("bond.algorithm", "ppo",
     r"bond.algorithm='ppo'; allowed: jbond, jbond_hard, bond, iterative_bond, reinforce"),
    ("bond.eta", 1.5, r"bond.eta=1.5"),
    ("bond.beta", -0.1, r"bond.beta=-0.1"),
    ("bond.gamma", -1.0, r"bond.gamma=-1.0"),
    ("bond.kl_estimator", "exact",
     r"bond.kl_estimator='exact' is unknown: allowed are sampled, per_position"),
    ("sampling.temperature", 0.7, r"BOND's losses need samples from pi itself"),
    ("sampling.max_new_tokens", 0, r"sampling.max_new_tokens=0 must be an integer >= 1"),
    ("sampling.max_new_tokens", 400,
     r"data.prompt_buckets up to 64 \+ sampling.max_new_tokens=400 = 464 exceeds "
     r"the model's context max_seq_len=256"),
    ("train.batch_size", 12, r"train.batch_size=12 must be divisible by grad_accum_steps \* data \* fsdp = "
     r"1 \* 8 = 8"),
    ("optimizer.grad_accum_steps", 2, r"train.batch_size=8 must be divisible by grad_accum_steps \* data \* "
     r"fsdp = 2 \* 8 = 16"),
    ("optimizer.learning_rate", -1e-4, r"optimizer.learning_rate=-0.0001 must be > 0"),
    ("optimizer.schedule", "step", r"optimizer.schedule='step'; allowed: constant, cosine, linear"),
    ("sft.learning_rate", 0.0, r"sft.learning_rate=0.0 must be > 0"),
    ("sft.warmup_steps", -1, r"sft.warmup_steps=-1 must be an integer >= 0"),
    ("reward_training.b2", 1.0, r"reward_training.b2=1.0 must lie in \[0, 1\)"),
    ("optimizer.eps", 0.0, r"optimizer.eps=0.0 must be > 0 and finite"),
    ("reward_training.steps", 0, r"reward_training.steps=0 must be an integer >= 1"),
    ("reward_training.model", "bert", r"reward_training.model='bert'; allowed: transformer, bag_of_words"),
    ("train.max_bad_steps", 0, r"train.max_bad_steps=0 must be an integer >= 1"),
    ("mesh.data", 3, r"mesh: mesh .* does not fit 8 devices: 8 is not divisible by 3"),
    ("mesh.tensor", 8, r"mesh=.*num_kv_heads=2 is not divisible|mesh=.*dimension"),
    ("model.preset", "huge", r"model.preset='huge'; allowed: micro, tiny"),
    ("data.response_turns", 0, r"data.response_turns=0 must be an integer >= 1"),
    ("data.prompt_turns", -1, r"data.prompt_turns=-1 must be an integer >= 0"),
    ("data.task", "poetry", r"data.task='poetry'; allowed: chitchat, summarization"),
    ("data.prompt_buckets", (64, 32), r"data.prompt_buckets=\(64, 32\) must be increasing"),
    ("eval.policy_samples", 0, r"eval.policy_samples=0 must be an integer >= 1"),
    ("eval.best_of", (1, 64), r"eval.best_of=\(1, 64\): each N must be in \[1, eval.quantile_samples=16\]"),
    ("reference", "/no/such/sft", r"reference='/no/such/sft' is not a directory"),
    ("reward_model", "/no/such/rm", r"reward_model='/no/such/rm' is not a directory"),
    ("data.tokenizer", "/no/such.model", r"data.tokenizer='/no/such.model' is not a file"),
    ("bond.pool_dir", __file__, r"bond.pool_dir='.*test_stage_order.py' is a file; allowed: a directory "
     r"\(made if missing\) or ''"),
    ("eval.pool_dir", __file__, r"eval.pool_dir='.*test_stage_order.py' is a file; allowed: a directory"),
]


@pytest.mark.parametrize("key,value,message", BAD_CONFIGS)
def test_every_bad_config_is_one_error_before_anything_is_written(key, value, message, tmp_path):
  config = dialogue.get_config("smoke")
  *sections, name = key.split(".")
  node = config
  for section in sections:
    node = node[section]
  node[name] = value
  workdir = tmp_path / "run"
  start = time.time()
  with pytest.raises(ValueError, match=message):
    pipeline.run(config, str(workdir))
  assert time.time() - start < 5
  assert not workdir.exists()  # no config.json guard written, nothing to poison a corrected rerun


def test_bond_with_fewer_reference_samples_than_n_is_one_error(tmp_path):
  config = dialogue.get_config("smoke")
  config.bond.update(algorithm="bond", n=4, k=2)
  with pytest.raises(ValueError, match=r"bond.k=2 reference samples cannot supply a Best-of-4"):
    pipeline.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_prompt_buckets_too_narrow_for_every_prompt_are_refused_before_sft_and_leave_nothing(tmp_path):
  """Only the tokenizer can tell whether a prompt fits: the check runs once it exists, before SFT, and
  what preparing wrote (the guard, the tokenizer) is removed, so the corrected rerun is accepted."""
  config = dialogue.get_config("smoke")
  config.data.prompt_buckets = (8,)
  workdir = tmp_path / "run"
  with pytest.raises(
      ValueError, match=r"no training prompt of the chitchat data fits "
      r"data.prompt_buckets=\(8,\) \(\d+ longer than 8 tokens\): widen data.prompt_buckets"):
    pipeline.run(config, str(workdir))
  assert not workdir.exists()
  workdir.mkdir()
  (workdir / "notes.txt").write_text("kept")
  before = _tree_hashes(workdir)
  with pytest.raises(ValueError, match="no training prompt"):
    pipeline.run(config, str(workdir))
  assert _tree_hashes(workdir) == before
  config.data.prompt_buckets = (32, 64)
  assert pipeline.setup(config, str(workdir)).prompts[0]  # the corrected config is not refused


def test_a_corrected_rerun_is_accepted_after_a_bad_path(tmp_path):
  """A bad first run must not poison the workdir: its guard is written only once everything checks."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("kept")
  before = _tree_hashes(workdir)
  config = dialogue.get_config("smoke")
  config.reference = str(tmp_path / "wrong")
  with pytest.raises(ValueError, match="is not a directory"):
    pipeline.run(config, str(workdir))
  assert _tree_hashes(workdir) == before
  config.reference = ""
  pipeline.setup(config, str(workdir), until="sft")  # the corrected config is not refused
  assert (workdir / "config.json").exists()


def test_an_unwritable_workdir_is_one_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match=r"workdir .*file/run.* cannot be created"):
    pipeline.run(dialogue.get_config("smoke"), str(blocker / "run"))
  with pytest.raises(ValueError, match=r"workdir .*file.* is not a directory"):
    pipeline.run(dialogue.get_config("smoke"), str(blocker))
  if os.geteuid() != 0:  # root writes anywhere
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="is not writable"):
      pipeline.run(dialogue.get_config("smoke"), str(locked))
