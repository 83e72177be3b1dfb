"""The command lines end to end (real subprocesses, tiny random models made here, nothing downloaded).

Every bad input is one line on stderr, `error: ...`, exit status 2, before any compute (nothing on stdout);
export's refusals leave the run byte-identical; a clean export's files are all 0644 under a 022 umask and
the console shows the project's own lines only.
"""

import concurrent.futures
import functools
import hashlib
import json
import os
import subprocess
import sys

import jax
import pytest

from bond_jax import checkpoint, hf, sharding
from bond_jax import workdir as workdir_lib
from bond_jax.data.tokenizer import train_bpe_tokenizer
from bond_jax.models import reward, transformer
from bond_jax.models.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {
    **{
        k: v for k, v in os.environ.items() if k != "XLA_FLAGS"
    }, "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": REPO
}
VOCAB, CONTEXT = 300, 32
SPECIAL = dict(bos_id=2, eos_id=1, pad_id=0)  # train_bpe_tokenizer's ids


def _cfg(vocab=VOCAB):
  return ModelConfig(family="llama", vocab_size=vocab, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                     head_dim=8, mlp_dim=32, max_seq_len=CONTEXT, tie_embeddings=False)


@functools.lru_cache
def _params(cfg, kind):
  init = transformer.init_boxed if kind == "lm" else reward.init_boxed
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  return sharding.init_sharded(lambda r: init(cfg, r), jax.random.key(0), mesh)[0]


def _workdir(path, cfg):
  """A run directory as training leaves it: the tokenizer and a distillation checkpoint (no SFT stage)."""
  tok = train_bpe_tokenizer(["hello there, how are you today?", "fine thanks, and you?"] * 20, VOCAB)
  os.makedirs(os.path.dirname(workdir_lib.tokenizer_path(path)))
  with open(workdir_lib.tokenizer_path(path), "wb") as f:
    f.write(tok.model_proto)
  params = _params(cfg, "lm")
  mngr = checkpoint.manager(workdir_lib.checkpoint_dir(path, "bond"))
  checkpoint.save(mngr, 3, {
      "params": params,
      "anchor_params": params
  }, dict(kind="lm", model=cfg.to_dict()), force=True)
  mngr.wait_until_finished()
  mngr.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """{name: path}: Hugging Face dirs (policy, reward models, gpt2), a workdir, and a non-export dir."""
  root = tmp_path_factory.mktemp("cli")
  paths = {name: str(root / name) for name in ("policy", "rm", "rm_small", "rm_ids", "gpt2", "busy")}
  paths["workdir"] = str(root / "runs" / "run")
  saved = os.umask(0o022)
  try:
    hf.export(_params(_cfg(), "lm"), _cfg(), paths["policy"], **SPECIAL)
    hf.export(_params(_cfg(), "reward"), _cfg(), paths["rm"], kind="reward", **SPECIAL)
    hf.export(_params(_cfg(280), "reward"), _cfg(280), paths["rm_small"], kind="reward", **SPECIAL)
    hf.export(_params(_cfg(), "reward"), _cfg(), paths["rm_ids"], kind="reward", **dict(SPECIAL, eos_id=3))
    _workdir(paths["workdir"], _cfg())
  finally:
    os.umask(saved)
  os.makedirs(paths["gpt2"])
  with open(os.path.join(paths["gpt2"], "config.json"), "w") as f:
    json.dump({"model_type": "gpt2", "n_layer": 2}, f)
  os.makedirs(paths["busy"])
  with open(os.path.join(paths["busy"], "notes.txt"), "w") as f:
    f.write("not an export")
  return paths


def _run(args):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=180)


def _run_all(argvs):
  """The processes at once (each only imports and checks its flags): [CompletedProcess]."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
    return list(pool.map(_run, argvs))


def _assert_one_line_errors(module, cases):
  """cases: [(flags, text the error line must contain)]; each exits 2 with exactly that one line."""
  results = _run_all([["-m", module, *flags] for flags, _ in cases])
  for (flags, expected), proc in zip(cases, results):
    lines = proc.stderr.strip().splitlines()
    where = f"{module} {' '.join(flags)}: rc={proc.returncode} stderr={proc.stderr!r}"
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), where
    assert expected in lines[0], where
    assert proc.stdout == "", where  # nothing ran


def _tree_hash(path):
  digest = hashlib.sha256()
  for directory, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    digest.update(os.path.relpath(directory, path).encode())
    for name in sorted(files):
      with open(os.path.join(directory, name), "rb") as f:
        digest.update(name.encode() + hashlib.sha256(f.read()).digest())
  return digest.hexdigest()


def test_sample_bad_inputs(models):
  policy, ids = f"--model={models['policy']}", "--prompt_ids=5,6,7"
  _assert_one_line_errors("bond_jax.sample", [
      ([f"--model={models['gpt2']}", ids], "model_type 'gpt2' is not supported; allowed: llama, gemma"),
      ([f"--model={models['policy']}_missing", ids], "_missing does not exist"),
      ([f"--model={models['workdir']}", ids], "is a bond_jax workdir, not a model directory; export it"),
      ([policy, f"--reward_model={models['workdir']}", ids], "export it first: python -m bond_jax.export"),
      ([policy, "--prompt_ids=" + ",".join(["5"] * 30), "--max_new_tokens=8"
       ], "the prompt (30 tokens) plus --max_new_tokens=8 is 38 tokens, longer than the context"),
      ([policy, ids, "-n", "0"], "num_samples=0 is not allowed"),
      ([policy, ids, "--temperature=-1"], "temperature=-1.0 is not allowed"),
      ([policy, ids, "--top_p=1.5"], "top_p=1.5 is not allowed"),
      ([policy, ids, "--top_k=-1"], "top_k=-1 is not allowed"),
      ([policy, ids, "--compact_rows=1"], "compact_rows=1 is not allowed: need 0 (off) or an integer >= 2"),
      ([policy, "--prompt_ids=5,six"], "--prompt_ids='5,six' is not comma-separated integers"),
      ([policy, f"--prompt_ids=5,{VOCAB}"], f"prompt token id {VOCAB} is outside the vocabulary of --model"),
      ([policy, f"--reward_model={models['policy']}", ids
       ], "is a causal LM (has no score.weight); expected a reward model"),
      ([f"--model={models['rm']}", ids], "is a reward model (has a score.weight); expected a causal"),
      ([policy, f"--reward_model={models['rm_small']}", ids], "--reward_model has a smaller vocabulary"),
      ([policy, f"--reward_model={models['rm_ids']}", ids
       ], "--reward_model's eos_token_id is 3 but --model's is 1"),
      ([policy, "--prompt=hello"], "has no tokenizer.model; pass --prompt_ids"),
  ])


def test_export_refusals_leave_the_run_untouched(models):
  workdir, runs = models["workdir"], os.path.dirname(models["workdir"])
  before = _tree_hash(runs), _tree_hash(models["busy"])
  _assert_one_line_errors("bond_jax.export", [
      ([f"--workdir={workdir}", f"--out={workdir}", "--overwrite"], "is the run directory --workdir="),
      ([f"--workdir={workdir}", f"--out={workdir}/bond", "--overwrite"], "lies inside the run directory"),
      ([f"--workdir={workdir}", f"--out={runs}", "--overwrite"], "contains the run directory"),
      ([f"--workdir={workdir}", f"--out={models['busy']}", "--overwrite"
       ], "--overwrite replaces only an earlier export"),
      ([f"--workdir={workdir}_missing", f"--out={runs}_out"], "_missing does not exist"),
      ([f"--workdir={workdir}", f"--out={runs}_out", "--which=reference"], "has no reference checkpoint"),
      ([f"--workdir={models['policy']}", f"--out={runs}_out"], "has no policy checkpoint"),
  ])
  assert (_tree_hash(runs), _tree_hash(models["busy"])) == before
  assert not os.path.exists(f"{runs}_out")


def test_clean_export_is_0644_and_samples_quietly(models, tmp_path):
  out = str(tmp_path / "hf_policy")
  saved = os.umask(0o022)  # the child inherits it (a preexec_fn would fork a multithreaded JAX process)
  try:
    proc = _run(["-m", "bond_jax.export", f"--workdir={models['workdir']}", f"--out={out}"])
  finally:
    os.umask(saved)
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # no Orbax INFO / read-only lines
  assert proc.stdout.splitlines() == [f"exported policy of {models['workdir']} to {out}"]
  modes = {name: oct(os.stat(os.path.join(out, name)).st_mode & 0o777) for name in os.listdir(out)}
  assert "model.safetensors" in modes and "tokenizer.model" in modes
  assert set(modes.values()) == {"0o644"}, modes
  proc = _run([
      "-m", "bond_jax.sample", f"--model={out}", f"--reward_model={models['rm']}", "--prompt=hello", "-n",
      "2", "--max_new_tokens=4"
  ])
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr
  assert [line[:3] for line in proc.stdout.splitlines()] == ["#1 ", "#2 "]


def test_plan_bad_inputs():
  _assert_one_line_errors("bond_jax.plan", [
      (["--config=configs/missing.py"], "--config file configs/missing.py: no such file or directory"),
      (["--config=configs/missing.py", "--config.train.steps=3"], "configs/missing.py: no such file"),
      (["--config=configs/"], "--config file configs/: is a directory"),
      (["--config=configs/dialogue.py:nope"], "unknown preset 'nope' for configs/dialogue.py; allowed:"),
      (["--config=configs/dialogue.py:gemma_7b", "--mesh=fsdp=x"], "size 'x' is not an integer"),
      (["--config=configs/dialogue.py:gemma_7b", "--accelerator=tpu9"], "accelerator 'tpu9' is not known"),
  ])


_ENTRY = """
import sys
from absl import logging
from bond_jax import cli

def main(argv):
  what = sys.argv[-1]
  if what == "user":
    raise cli.UserError("bad input")
  if what == "path":
    open("/nonexistent/file.txt")
  if what == "bug":
    raise RuntimeError("a bug")
  from bond_jax.data import chitchat, local  # a project TFDS builder, built here (reads a packaged file)
  local.prepare(chitchat.ChitchatDialogue, what,
                chitchat.ChitchatDialogueConfig(name="cli_n20", max_conversations=20))
  logging.info("an INFO line")
  logging.warning("a real warning")

cli.entry(main)
"""


def test_entry_errors_and_quiet_console(tmp_path):
  data = str(tmp_path / "data")
  user, path, bug, quiet = _run_all([["-c", _ENTRY, what] for what in ("user", "path", "bug", data)])
  assert (user.returncode, user.stderr) == (2, "error: bad input\n")
  assert (path.returncode, path.stderr) == (2, "error: /nonexistent/file.txt: no such file or directory\n")
  assert bug.returncode == 1 and "Traceback" in bug.stderr and "RuntimeError: a bug" in bug.stderr
  assert quiet.returncode == 0, quiet.stderr
  # TFDS' "Downloading and preparing dataset Unknown size ..." becomes the honest line; its "Using custom
  # data configuration" warning and the INFO line are gone; the real warning stays
  assert quiet.stdout.splitlines() == [
      f"building dataset chitchat_dialogue/cli_n20 locally in {data}/"
      "chitchat_dialogue/cli_n20/1.0.0"
  ]
  assert [line.split("] ", 1)[-1] for line in quiet.stderr.splitlines()] == ["a real warning"]
