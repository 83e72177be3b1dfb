"""`python -m bond_jax.train` end to end on the smoke preset: the distillation stage resumes bitwise after
SIGTERM and SIGKILL, the NaN guard stops it, and a trained run exports to transformers."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

from bond_jax import algorithms, artifacts, checkpoint, export, hf, metrics, pipeline, sharding
from bond_jax import workdir as workdir_lib
from bond_jax.data import local, prepare
from bond_jax.models import params as params_lib
from bond_jax.stages import distill
from configs import dialogue

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def _config(**train):
  config = dialogue.get_config("smoke")
  config.eval.num_prompts = 0  # the resume test compares training only
  config.train.update(steps=STEPS, checkpoint_every=2, **train)
  return config


@pytest.fixture(scope="module")
def stages(smoke_stages):
  """A workdir whose SFT and reward stages are done (shared by every test here: read, or copy first)."""
  return smoke_stages


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _copy(stages, tmp_path, name):
  target = str(tmp_path / name)
  shutil.copytree(stages, target)
  return target


def _env(compile_cache):
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
              JAX_COMPILATION_CACHE_DIR=compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=REPO)


def _command(workdir, *extra, steps=STEPS):
  return [
      sys.executable, "-m", "bond_jax.train", "--config=configs/dialogue.py:smoke", f"--workdir={workdir}",
      "--config.eval.num_prompts=0", f"--config.train.steps={steps}", "--config.train.checkpoint_every=2",
      "--config.train.log_every=1", *extra
  ]


def _start(workdir, compile_cache, *extra, steps=STEPS):
  return subprocess.Popen(_command(workdir, *extra, steps=steps), cwd=REPO, env=_env(compile_cache),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _steps(workdir):
  directory = workdir_lib.checkpoint_dir(workdir, distill.STAGE)
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _wait_for_checkpoint(proc, workdir, at_least, timeout=400):
  start = time.time()
  while time.time() - start < timeout:
    if any(s >= at_least for s in _steps(workdir)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"the run exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
    time.sleep(0.02)
  proc.kill()
  raise AssertionError(f"no checkpoint >= {at_least} within {timeout}s")


def _final_state(workdir, steps=STEPS):
  state, meta, step = checkpoint.restore_arrays(workdir_lib.checkpoint_dir(workdir, distill.STAGE))
  assert step == steps
  return state, meta


def test_resume_after_sigterm_and_sigkill_is_bitwise_identical(stages, compile_cache, tmp_path):
  straight = _copy(stages, tmp_path, "straight")
  proc = _start(straight, compile_cache)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert f"step {STEPS}/{STEPS}" in out and "ETA" in out

  interrupted = _copy(stages, tmp_path, "interrupted")
  proc = _start(interrupted, compile_cache)
  _wait_for_checkpoint(proc, interrupted, 2)
  proc.send_signal(signal.SIGTERM)  # preemption: save at the end of the current step, exit 143
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 143, out[-3000:]
  saved = int(out.split("SIGTERM: checkpoint saved at step ")[1].split(";")[0])
  assert saved in _steps(interrupted) and saved < STEPS

  proc = _start(interrupted, compile_cache)
  for line in proc.stdout:  # kill mid-run, two steps after the resume point
    if line.startswith(f"[bond] step {saved + 2}/"):
      proc.send_signal(signal.SIGKILL)  # no chance to save anything
      break
  proc.communicate(timeout=60)
  assert max(_steps(interrupted)) < STEPS, "the run finished before it could be killed"

  proc = _start(interrupted, compile_cache)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert "resumed from" in out

  (a, meta_a), (b, meta_b) = _final_state(straight), _final_state(interrupted)
  assert meta_a["data_iterator"] == meta_b["data_iterator"]
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(a["step"]) == STEPS and int(a["skipped_steps"]) == 0


def test_nan_rewards_are_skipped_and_stop_the_run_without_saving(stages, tmp_path):
  params, cfg = artifacts.load(stages, "reward", sharding.make_mesh({}, jax.devices()[:1]))
  params = dict(params, head=params["head"] * np.nan)
  broken = str(tmp_path / "broken_rm")
  hf.export(params, cfg, broken, kind="reward", pad_id=0)
  workdir = str(tmp_path / "nan")  # a new run from given models (the guarded workdir config differs)
  config = _config(max_bad_steps=2)
  config.reference, config.reward_model = stages, broken
  config.data.tokenizer = workdir_lib.tokenizer_path(stages)
  with pytest.raises(
      FloatingPointError, match=r"\[bond\] 2 steps in a row had a non-finite loss or gradient "
      r"\(last at step 2\); stopping without saving them"):
    pipeline.run(config, workdir)
  assert _steps(workdir) == []


def test_unknown_config_key_is_a_one_line_cli_error():
  proc = subprocess.run([
      sys.executable, "-m", "bond_jax.train", "--config=configs/dialogue.py:smoke", "--config.bond.etaa=0.1",
      "--workdir=/nonexistent"
  ], cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode != 0
  assert "etaa" in proc.stderr and "Traceback" not in proc.stderr


def test_trained_run_exports_and_generates_in_transformers(stages, tmp_path):
  """Trained with the per-position KL to the anchor (bond.kl_estimator; the sampled one is every other
  run's), on the 8-device mesh: its steps apply and log the per-position KL, and the run exports."""
  workdir = _copy(stages, tmp_path, "export")
  config = _config()
  config.train.update(steps=3, log_every=1)
  config.bond.kl_estimator = "per_position"
  pipeline.run(config, workdir)
  rows = [
      r for r in metrics.read_metrics(workdir_lib.metrics_path(workdir, distill.STAGE))
      if r["kind"] == "train"
  ]
  assert [row["step"] for row in rows] == [1, 2, 3] and not any(row["step_skipped"] for row in rows)
  # policy = anchor until the first update with a learning rate above 0 (warm-up starts at 0)
  assert rows[0]["kl_per_position"] == pytest.approx(0.0, abs=1e-5)
  assert 0.0 < rows[2]["kl_per_position"] < 1.0
  out = str(tmp_path / "hf_policy")
  export.export_run(workdir, out)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = tok("Topic: What is your favorite food?\nA:", return_tensors="pt")["input_ids"]
  ours_tok = prepare.tokenizer(config, workdir)
  assert ids[0].tolist() == [ours_tok.bos_id] + ours_tok.encode("Topic: What is your favorite food?\nA:")
  with torch.no_grad():
    generated = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    theirs = model(ids).logits[0].numpy()
  assert generated.shape == (1, ids.shape[1] + 8) and isinstance(tok.decode(generated[0]), str)
  params, cfg = export.load_run_params(workdir, "policy")
  from bond_jax.models import transformer
  ours = np.asarray(transformer.forward(cfg, params, ids.numpy(), np.ones(ids.shape, bool)))[0]
  assert np.abs(ours - theirs).max() <= 1e-4
  with pytest.raises(ValueError, match="not empty; pass --overwrite"):
    export.export_run(workdir, out)


def test_summarization_config_trains_from_hugging_face_models(stages, tmp_path):
  """configs/summarization.py: prompts from a TFDS dataset with XSum's features (here built offline from
  local JSON lines), reference and reward model given as Hugging Face directories."""
  import json

  from bond_jax.data import chitchat, summarization
  from configs import summarization as summarization_config

  conversations, _ = chitchat.load_conversations(max_conversations=60)
  paths = {}
  for split, part in (("train", conversations[:40]), ("validation", conversations[40:])):
    paths[split] = str(tmp_path / f"{split}.jsonl")
    with open(paths[split], "w") as f:
      for c in part:
        f.write(
            json.dumps({
                "document": " ".join(c.turns[:6]),
                "summary": c.topic or "chat",
                "id": c.conversation_id
            }) + "\n")
  local.prepare(summarization.JsonlSummarization, str(tmp_path / "tfds"),
                summarization.JsonlSummarizationConfig(name="fake", split_paths=paths))
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  tok_path = workdir_lib.tokenizer_path(stages)
  for kind, name in (("lm", "ref_hf"), ("reward", "rm_hf")):
    params, cfg = artifacts.load(stages, kind, mesh)
    hf.export(params, cfg, str(tmp_path / name), kind=kind, pad_id=0)

  config = summarization_config.get_config("tiny")
  config.reference, config.reward_model = str(tmp_path / "ref_hf"), str(tmp_path / "rm_hf")
  config.data.update(dataset="jsonl_summarization/fake:1.0.0", data_dir=str(tmp_path / "tfds"),
                     tokenizer=tok_path, max_document_chars=300, prompt_buckets=(128,))
  config.sampling.max_new_tokens = 8
  config.train.update(steps=2, batch_size=8, eval_every=2, checkpoint_every=2)
  config.eval.update(num_prompts=8, quantile_samples=4, policy_samples=2, best_of=(1, 2, 4))
  result = pipeline.run(config, str(tmp_path / "xsum_run"))["bond"]
  assert 0.0 <= result["policy_quantile_mean"] <= 1.0 and np.isfinite(result["kl_policy_ref"])
  assert _steps(str(tmp_path / "xsum_run")) == [2]

  config.data.dataset = "no_such_dataset:1.0.0"
  with pytest.raises(ValueError, match=r"data.dataset='no_such_dataset:1.0.0' split 'train' is not prepared"):
    pipeline.run(config, str(tmp_path / "missing"))


def test_the_best_of_n_each_algorithm_aims_at():
  bond = dialogue.get_config().bond
  aims = lambda name, step: algorithms.get(name).target_best_of(bond, step)
  bond.update(eta=0.01)
  assert [aims("jbond", s) for s in (0, 100, 300)] == [1.0, 2.0, 8.0]
  bond.update(n=2, anchor_period=100)
  assert [aims("iterative_bond", s) for s in (0, 99, 100, 250)] == [2.0, 2.0, 4.0, 8.0]
  assert [aims("jbond_hard", s) for s in (0, 99, 100, 250)] == [2.0, 2.0, 4.0, 8.0]
  bond.update(n=4)
  assert aims("bond", 50) == 4.0
  assert aims("reinforce", 50) is None


def _hashes(root):
  import hashlib
  return {
      os.path.relpath(os.path.join(d, f), root):
          hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for d, _, names in os.walk(root)
      for f in names
  }


@pytest.fixture(scope="module")
def tiny_hf_models(tmp_path_factory):
  """A tiny random policy (vocab 512) and a reward model with ANOTHER vocabulary (256), as HF dirs."""
  from bond_jax.models import params as params_lib, presets
  root = tmp_path_factory.mktemp("hf_models")
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  for name, kind, vocab in (("policy", "lm", 512), ("rm256", "reward", 256)):
    cfg = presets.get("micro", vocab_size=vocab)
    hf.export(params_lib.init_sharded(cfg, kind, jax.random.key(0), mesh), cfg, str(root / name), kind=kind,
              pad_id=0)
  return root


@pytest.mark.parametrize("flags,message", [
    (["--config.bond.eta=2"], "bond.eta=2.0 is out of range"),
    (["--config.optimizer.learning_rate=-1e-4"], "optimizer.learning_rate=-0.0001 must be > 0"),
    (["--config.sft.warmup_steps=-3"], "sft.warmup_steps=-3 must be an integer >= 0"),
    (["--config.model.preset=huge"], "model.preset='huge'; allowed:"),
    (["--config.sampling.max_new_tokens=500"], "exceeds the model's context max_seq_len=512"),
    (["--config.reference=/wrong/path"], "reference='/wrong/path' is not a directory"),
    (["--config.reward_model={hf}/rm256", "--config.reference={hf}/policy"
     ], "has vocab_size=256 but the policy has 512"),
    (["--config.reward_model={hf}/policy", "--config.reference={hf}/policy"], "expected a reward model"),
    (["--config=configs/nope.py"], "--config file configs/nope.py"),
    (["--config=configs/dialogue.py:nope"], "unknown preset 'nope'"),
    (["--workdir={file}/run"], "cannot be created"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_is_one_line_exit_2_within_seconds_and_touches_nothing(flags, message, tiny_hf_models,
                                                                         tmp_path):
  """Each bad input of the default config: one line on stderr, exit 2, before any compute, and an existing
  workdir's files stay byte-identical (a bad first run must not poison it)."""
  workdir = tmp_path / "existing"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("a user's file")
  blocker = tmp_path / "file"
  blocker.write_text("x")
  flags = [f.format(hf=tiny_hf_models, file=blocker) for f in flags]
  if not any(f.startswith("--config=") for f in flags):
    flags = ["--config=configs/dialogue.py", *flags]
  if not any(f.startswith("--workdir=") for f in flags):
    flags.append(f"--workdir={workdir}")
  before = _hashes(workdir)
  start = time.time()
  proc = subprocess.run([sys.executable, "-m", "bond_jax.train", *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
  took = time.time() - start
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
  # The bound is the subprocess's start (importing jax, flax and Orbax: ~3 s alone, 5 s beside another
  # pytest worker in a fresh clone); any compute (tokenizer, datasets, the first compile) takes far longer.
  assert _hashes(workdir) == before and took < 10, took


@pytest.mark.skipif(
    shutil.which("chattr") is None, reason="needs chattr (e2fsprogs) to make a directory immutable")
@pytest.mark.parametrize("where,message", [("workdir", "is not writable"), ("parent", "cannot be created")])
def test_an_immutable_workdir_or_parent_is_one_line_exit_2(where, message, tmp_path):
  """chattr +i stops even root from writing: the workdir itself, or the directory it would be made in."""
  locked = tmp_path / "locked"
  locked.mkdir()
  workdir = locked if where == "workdir" else locked / "run"
  subprocess.run(["chattr", "+i", str(locked)], check=True)
  try:
    proc = subprocess.run(
        [sys.executable, "-m", "bond_jax.train", "--config=configs/dialogue.py", f"--workdir={workdir}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
  finally:
    subprocess.run(["chattr", "-i", str(locked)], check=True)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
  assert os.listdir(locked) == []


LORA_STEPS = 6


def test_lora_resume_after_sigkill_is_bitwise_and_a_changed_base_is_one_line_exit_2(
    stages, tiny_hf_models, compile_cache, tmp_path):
  """LoRA J-BOND on a Hugging Face base: killed mid-run and resumed, it ends bitwise where an uninterrupted
  run ends; when the base directory then holds another model, a resume is refused in one line."""
  base = tmp_path / "base"
  shutil.copytree(tiny_hf_models / "policy", base)
  flags = (f"--config.reference={base}", f"--config.reward_model={stages}", "--config.lora.rank=4",
           f"--config.data.tokenizer={workdir_lib.tokenizer_path(stages)}")
  runs = {}
  for name in ("straight", "interrupted"):
    runs[name] = _copy(stages, tmp_path, name)
    os.remove(os.path.join(runs[name], "config.json"))  # its data and tokenizer, under other models
  proc = _start(runs["straight"], compile_cache, *flags, steps=LORA_STEPS)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  proc = _start(runs["interrupted"], compile_cache, *flags, steps=LORA_STEPS)
  _wait_for_checkpoint(proc, runs["interrupted"], 2)
  proc.send_signal(signal.SIGKILL)  # mid-run, once a checkpoint is complete: no chance to save anything
  proc.communicate(timeout=60)
  assert max(_steps(runs["interrupted"])) < LORA_STEPS
  proc = _start(runs["interrupted"], compile_cache, *flags, steps=LORA_STEPS)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0 and "resumed from" in out, out[-3000:]
  (a, meta), (b, _) = (_final_state(runs[n], LORA_STEPS) for n in ("straight", "interrupted"))
  assert meta["base"]["path"] == str(base) and len(meta["base"]["hash"]) == 32
  assert "layer_0" in a["params"] and "embedding" not in a["params"]  # adapters only
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # the run's exports: base + adapters merged, and the adapters as a PEFT directory on the base
  export.export_run(runs["straight"], str(tmp_path / "merged"))
  export.export_adapters(runs["straight"], str(tmp_path / "peft"))
  tokens = torch.tensor([[5, 17, 33, 2, 9, 41, 7]])
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
  on_base = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(base).float().eval(), str(tmp_path / "peft")).eval()
  with torch.no_grad():
    theirs, ours = on_base(input_ids=tokens).logits, merged(input_ids=tokens).logits
  assert float((theirs - ours).abs().max()) <= 1e-5

  shutil.rmtree(base)  # the same path, another model: a resume would train adapters of another base
  cfg = hf.load_config(str(tiny_hf_models / "policy"))[0]
  hf.export(params_lib.init_sharded(cfg, "lm", jax.random.key(1), sharding.make_mesh({},
                                                                                     jax.devices()[:1])), cfg,
            str(base), pad_id=0)
  proc = subprocess.run(_command(runs["straight"], *flags, steps=LORA_STEPS + 2), cwd=REPO,
                        env=_env(compile_cache), capture_output=True, text=True, timeout=300)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith("error: checkpoint") and f"base {base} (hash {meta['base']['hash']}" in lines[0]
  assert max(_steps(runs["straight"])) == LORA_STEPS
  with pytest.raises(ValueError, match="now holds another model"):  # and its export too
    export.export_run(runs["straight"], str(tmp_path / "merged_again"))
