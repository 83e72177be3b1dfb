"""configs/hf.py end to end: a tiny random Qwen3 policy with a tokenizer.json BPE and a chat template, a tiny
random Llama reward model with ANOTHER vocabulary and tokenizer (SentencePiece, its own template), and a
JSONL file of chat prompts. `python -m bond_jax.train` runs J-BOND, resumes bitwise after SIGKILL, and the
exported policy loads and generates in transformers; the same with a Python reward function. Bad input is
one line before any compute."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
import torch
import transformers

import hf_dirs
from bond_jax import checkpoint, export, pipeline, rewards as rewards_lib, sharding, validation
from bond_jax import workdir as workdir_lib
from bond_jax.data import chitchat, hf_tokenizer, prompt_files
from bond_jax.stages import distill
from configs import hf as hf_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
REWARD_MODULE = """
def says_hello(prompts, responses):
  assert len(prompts) == len(responses) and all(isinstance(p, list) for p in prompts)
  return [float("hello" in r.lower()) for r in responses]  # 0 / 1: mostly tied

def wrong_shape(prompts, responses):
  return [[1.0, 2.0]] * len(responses)

def not_finite(prompts, responses):
  return [float("nan")] * len(responses)
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """One compilation cache for every run here: the policy's sampling and update compile once."""
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """Policy, reward model (and a copy without its tokenizer), prompt files and a reward-function module."""
  root = tmp_path_factory.mktemp("hf_run")
  conversations, _ = chitchat.load_conversations(max_conversations=400)
  lines = [t for c in conversations[:300] for t in (c.topic, *c.turns) if t]
  # a base model's eos (<|endoftext|>): the chat template's <|im_end|> must end responses as well
  qwen_tok = hf_dirs.qwen_tokenizer_dir(root / "qwen_tok", lines, vocab_size=400, eos="<|endoftext|>")
  sp_tok = hf_dirs.sentencepiece_tokenizer_dir(root / "sp_tok", lines, vocab_size=600)
  out_plain = hf_dirs.sentencepiece_tokenizer_dir(root / "plain_tok", lines, vocab_size=400, template=None)
  policy_vocab = hf_tokenizer.load(qwen_tok).vocab_size
  out = {"root": root, "policy": hf_dirs.qwen3_policy(root / "policy", qwen_tok, policy_vocab)}
  out["rm"] = hf_dirs.llama_reward_model(root / "rm", sp_tok, 600, pad_id=0)
  out["plain_tok"] = out_plain
  shutil.copytree(out["rm"], root / "rm_without_tokenizer")
  for name in hf_tokenizer.FILES:
    if os.path.exists(root / "rm_without_tokenizer" / name):
      os.remove(root / "rm_without_tokenizer" / name)
  chats = hf_dirs.conversations(conversations[300:], 40, seed=1)
  records = [{"messages": [{"role": m["role"], "content": m["content"][:40]} for m in c]} for c in chats]
  records += [{
      "text": "no messages field"
  }, {
      "messages": []
  }, {
      "messages": [{
          "role": "user",
          "content": "x" * 900
      }]
  }]
  out["prompts"] = str(root / "prompts.jsonl")
  with open(out["prompts"], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  (root / "my_rewards.py").write_text(textwrap.dedent(REWARD_MODULE))
  return out


def _flags(dirs, workdir, *extra):
  return [
      "--config=configs/hf.py", f"--workdir={workdir}", f"--config.reference={dirs['policy']}",
      f"--config.data.prompts={dirs['prompts']}", "--config.data.prompt_buckets=(128,)",
      "--config.sampling.max_new_tokens=8", f"--config.train.steps={STEPS}",
      "--config.train.checkpoint_every=2", "--config.train.log_every=1", "--config.eval.num_prompts=0", *extra
  ]


def _env(dirs, cache):
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
              JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=f"{REPO}:{dirs['root']}")


def _start(dirs, workdir, cache, *extra):
  cmd = [sys.executable, "-m", "bond_jax.train", *_flags(dirs, workdir, *extra)]
  return subprocess.Popen(cmd, cwd=REPO, env=_env(dirs, cache), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _steps(workdir):
  directory = workdir_lib.checkpoint_dir(workdir, distill.STAGE)
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _final(workdir):
  state, meta, step = checkpoint.restore_arrays(workdir_lib.checkpoint_dir(workdir, distill.STAGE))
  assert step == STEPS
  return state, meta


def test_reward_model_with_its_own_tokenizer_resumes_bitwise_after_sigkill_and_exports(dirs, cache, tmp_path):
  rm = f"--config.reward_model={dirs['rm']}"
  straight = str(tmp_path / "straight")
  proc = _start(dirs, straight, cache, rm)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  report = re.search(
      r"\[prompts\] train: (\d+) usable of 43 records; skipped: 1 empty, (\d+) longer than 128 "
      r"tokens, 1 no field 'messages'; held out: (\d+)", out)
  assert report, out[-3000:]
  usable, too_long, held_out = map(int, report.groups())
  assert usable + held_out + too_long + 2 == 43 and usable >= 20 and too_long >= 1 and held_out == 2
  rows = [json.loads(line) for line in open(workdir_lib.metrics_path(straight, distill.STAGE))]
  ties = [r["reward_tie_rate"] for r in rows if "reward_tie_rate" in r]
  assert len(ties) == STEPS and max(ties) < 0.5  # a real reward model: continuous scores

  interrupted = str(tmp_path / "interrupted")
  proc = _start(dirs, interrupted, cache, rm)
  start = time.time()
  while not _steps(interrupted) and proc.poll() is None and time.time() - start < 300:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)  # right after the first checkpoint: no chance to save anything more
  proc.communicate(timeout=60)
  assert 2 in _steps(interrupted) and max(_steps(interrupted)) < STEPS
  proc = _start(dirs, interrupted, cache, rm)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0 and "resumed from" in out, out[-3000:]
  (a, meta_a), (b, meta_b) = _final(straight), _final(interrupted)
  assert meta_a["data_iterator"] == meta_b["data_iterator"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  _exported_policy_generates(straight, dirs, tmp_path / "hf_policy")


def _exported_policy_generates(workdir, dirs, out):
  """The export loads in transformers with the policy's tokenizer and chat template; its logits are ours."""
  export.export_run(workdir, str(out))
  tok = transformers.AutoTokenizer.from_pretrained(out)
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(model).__name__ == "Qwen3ForCausalLM"
  messages = [{"role": "user", "content": "what is your favorite food?"}]
  ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
  ids = ids["input_ids"]
  ours = hf_tokenizer.load(dirs["policy"])
  assert ids[0].tolist() == ours.encode_rendered(ours.chat.render(messages))
  with torch.no_grad():
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    theirs = model(ids).logits[0].numpy()
  assert generated.shape[1] > ids.shape[1] and isinstance(tok.decode(generated[0, ids.shape[1]:]), str)
  params, cfg = export.load_run_params(workdir, "policy")
  from bond_jax.models import transformer
  logits = np.asarray(transformer.forward(cfg, params, ids.numpy(), np.ones(ids.shape, bool)))[0]
  assert np.abs(logits - theirs).max() <= 1e-4


def test_python_reward_function_trains_evaluates_and_warns_of_ties(dirs, cache, tmp_path):
  workdir = str(tmp_path / "fn")
  proc = _start(dirs, workdir, cache, "--config.reward_fn=my_rewards:says_hello", "--config.train.steps=2",
                "--config.eval.num_prompts=2", "--config.train.eval_every=2",
                "--config.eval.quantile_samples=4", "--config.eval.policy_samples=2",
                "--config.eval.best_of=(1,2)")
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert _steps(workdir) == [2]
  evaluation = json.load(
      open(os.path.join(workdir_lib.stage_dir(workdir, "bond"), "eval", "eval_000002.json")))
  assert 0 <= evaluation["policy_quantile_mean"] <= 1 and evaluation["reward_ties_fraction"] > 0.5
  rows = [json.loads(line) for line in open(workdir_lib.metrics_path(workdir, distill.STAGE))]
  ties = [r["reward_tie_rate"] for r in rows if "reward_tie_rate" in r]
  assert len(ties) == 2 and min(ties) > 0.5
  assert out.count("[bond] warning: ") == 1 and "of the reward pairs of a prompt tie at step 1" in out


def _config(dirs, **changes):
  c = hf_config.get_config()
  c.reference, c.reward_model = dirs["policy"], dirs["rm"]
  c.data.update(prompts=dirs["prompts"], prompt_buckets=(128,))
  c.sampling.max_new_tokens = 8
  for key, value in changes.items():
    *path, name = key.split("__")
    node = c
    for part in path:
      node = node[part]
    node[name] = value
  return c


def _bad_inputs(dirs, root):
  (root / "empty.jsonl").write_text("")
  (root / "prompts.csv").write_text("prompt\nhi\n")
  return [
      (dict(reward_model=str(dirs["root"] / "rm_without_tokenizer")),
       "has vocab_size=600 but the policy has"),
      (dict(data__prompts=str(root / "missing.jsonl")),
       "data.prompts='" + str(root) + "/missing.jsonl' does not exist"),
      (dict(data__prompts=str(root / "empty.jsonl")), "empty.jsonl' holds no records"),
      (dict(data__prompts=str(root / "prompts.csv")), "prompts.csv' is of an unknown format; allowed: jsonl"),
      (dict(data__prompt_field="conversation"), "no record has the field data.prompt_field='conversation'"),
      (dict(data__tokenizer=dirs["plain_tok"]),
       "chat prompts need a chat template and the tokenizer has none"),
      (dict(reward_model="", reward_fn="no_such_module:score"),
       "reward_fn='no_such_module:score' cannot be imported: ModuleNotFoundError"),
      (dict(reward_model="", reward_fn="my_rewards:wrong_shape"), "returned shape (2, 2) for 2 responses"),
      (dict(reward_model="", reward_fn="my_rewards:not_finite"), "returned non-finite values [nan, nan]"),
  ]


def test_bad_input_is_one_line_before_any_compute(dirs, tmp_path, monkeypatch):
  """Each bad input: one ValueError line naming the key, raised by validation (nothing written); two of them
  through the CLI as well: exit 2, one line on stderr."""
  monkeypatch.syspath_prepend(str(dirs["root"]))
  prompt_files._CACHE.clear()
  for changes, message in _bad_inputs(dirs, tmp_path):
    with pytest.raises(ValueError) as error:
      pipeline.run(_config(dirs, **changes), str(tmp_path / "run"))
    assert message in str(error.value) and "\n" not in str(error.value), (changes, str(error.value))
    assert not (tmp_path / "run").exists()
  validation.validate(_config(dirs))  # the good config passes
  for flag, message in ((f"--config.reward_model={dirs['root']}/rm_without_tokenizer", "holds no tokenizer"),
                        ("--config.reward_fn=my_rewards:not_finite", "non-finite")):
    extra = [flag] if "reward_fn" in flag else [flag]
    if "reward_fn" in flag:
      extra.append("--config.reward_model=")
    proc = subprocess.run([sys.executable, "-m", "bond_jax.train", *_flags(dirs, tmp_path / "cli", *extra)],
                          cwd=REPO, env=_env(dirs, str(tmp_path / "c")), capture_output=True, text=True,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "cli").exists()


def test_the_text_route_scores_as_transformers_scores_the_rendered_conversation(dirs, tmp_path):
  """The reward model with its own tokenizer: our text route's reward of a policy response equals
  transformers' LlamaForSequenceClassification on AutoTokenizer.apply_chat_template of the conversation."""
  config = _config(dirs)
  ctx = pipeline.setup(config, str(tmp_path / "run"))
  train, _ = prompt_files.load_splits(config, ctx.tokenizer)
  frozen = distill.frozen_models(ctx, train.records)
  policy = ctx.tokenizer
  assert frozen.eos_ids == (policy.piece_to_id("<|endoftext|>"), policy.piece_to_id("<|im_end|>"))
  assert frozen.text_rewards is not None and frozen.reward_cfg.vocab_size == 600
  record, texts = train.records[0], ["I like pizza a lot, and you?", "no"]
  width = len(record["tokens"])
  responses, response_mask = np.zeros((1, 2, 24), np.int32), np.zeros((1, 2, 24), bool)
  for n, text in enumerate(texts):
    ids = policy.encode(text) + [policy.piece_to_id("<|im_end|>")]
    responses[0, n, :len(ids)], response_mask[0, n, :len(ids)] = ids, True
  arrays = (record["tokens"][None], np.ones((1, width), bool), responses, response_mask)
  with jax.set_mesh(ctx.mesh):
    ours = np.asarray(rewards_lib.score(frozen, *jax.device_put(arrays, sharding.replicated(ctx.mesh))))[0]
  tok = transformers.AutoTokenizer.from_pretrained(dirs["rm"])
  model = transformers.AutoModelForSequenceClassification.from_pretrained(dirs["rm"]).eval()
  for n, text in enumerate(texts):
    ids = tok.apply_chat_template(record["prompt"] + [{
        "role": "assistant",
        "content": text
    }], tokenize=True, return_dict=False)
    with torch.no_grad():
      theirs = model(torch.tensor([ids])).logits[0, 0].item()
    assert abs(ours[n] - theirs) <= 1e-4, (n, ours[n], theirs)
  assert abs(ours[0] - ours[1]) > 1e-3  # two responses, two rewards


def test_presets_of_configs_hf():
  shapes = {p: hf_config.get_config(p) for p in ("cpu", "1b", "8b")}
  assert all(c.data.task == "prompts" and c.data.chat_template for c in shapes.values())
  assert (shapes["1b"].mesh.tensor, shapes["8b"].mesh.tensor, shapes["8b"].train.batch_size) == (1, 2, 128)
  with pytest.raises(ValueError, match="unknown preset 'huge' for configs/hf.py; allowed: cpu, 1b, 8b"):
    hf_config.get_config("huge")
