"""Reward stage: the Wilson interval, a tiny Bradley-Terry run from an SFT backbone with its baselines."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bond_jax import artifacts, checkpoint, pipeline, reward_baselines, sharding, workdir as wd
from bond_jax.data import formats
from bond_jax.stages import reward_model as rt
from configs import dialogue

pytestmark = pytest.mark.usefixtures("compilation_cache")


def test_wilson_interval_known_values():
  # Reference values: Wilson (1927) score interval, z = 1.96 (e.g. statsmodels proportion_confint).
  np.testing.assert_allclose(rt.wilson_interval(8, 10), (0.4901625, 0.9433178), atol=1e-6)
  np.testing.assert_allclose(rt.wilson_interval(0, 10), (0.0, 0.2775328), atol=1e-6)
  np.testing.assert_allclose(rt.wilson_interval(50, 100), (0.4038315, 0.5961685), atol=1e-6)
  with pytest.raises(ValueError, match="n=0"):
    rt.wilson_interval(0, 0)


def tiny_config():
  c = dialogue.get_config()
  c.data.max_conversations = 600  # enough rated conversations for pairs in every split
  c.data.vocab_size = 400
  c.model.overrides.update(
      dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64))
  c.sft.update(dict(steps=2, batch_size=8, seq_len=64, eval_every=2, eval_batches=1, checkpoint_every=2))
  c.reward_training.update(
      dict(steps=30, batch_size=8, max_len=64, buckets=(32, 64), learning_rate=3e-3, warmup_steps=2,
           max_pairs_per_prompt=4, eval_every=30, checkpoint_every=30, log_every=10, model="transformer"))
  return c


def test_reward_model_learns_train_pairs_and_reports_heldout_accuracy(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config()
  final = pipeline.run(config, workdir, until="reward")["reward"]  # runs the (2-step) SFT stage first
  assert checkpoint.read_meta(wd.checkpoint_dir(workdir, "sft"))[1] == 2
  meta, step = checkpoint.read_meta(wd.checkpoint_dir(workdir, "reward"))
  assert (step, meta["kind"], meta["final_metrics"]) == (30, "reward", final)
  for name in ("validation", "test"):
    assert final[f"{name}_pairs"] > 0 and final[f"{name}_prompts"] >= 1
    low, high = rt.wilson_interval(final[f"{name}_accuracy"] * final[f"{name}_pairs"],
                                   int(final[f"{name}_pairs"]))
    assert final[f"{name}_ci_low"] == pytest.approx(low) and final[f"{name}_ci_high"] == pytest.approx(high)
    assert 0 <= final[f"{name}_length_accuracy"] <= 1 and 0 <= final[f"{name}_bow_accuracy"] <= 1
  # Sanity: accuracy on the TRAIN pairs is well above chance after 30 steps (240 pairs seen).
  ctx = pipeline.setup(config, workdir, until="reward")
  mesh, tokenizer, builder = ctx.mesh, ctx.tokenizer, ctx.preferences
  params, cfg = artifacts.load(workdir, "reward", mesh)
  records = rt._records(builder.as_data_source("train"))[:64]
  margins = []
  for batch, real in rt.pair_batches(records, tokenizer, 8, (32, 64)):
    scores = np.asarray(
        rt.score_pairs(cfg, params,
                       sharding.shard_batch(batch, mesh)["tokens"],
                       sharding.shard_batch(batch, mesh)["mask"]))
    margins.append(scores[:real, 0] - scores[:real, 1])
  accuracy = reward_baselines.wins(np.concatenate(margins)).mean()
  assert accuracy > 0.7, accuracy
  trained_head = np.asarray(jax.device_get(params["head"]))
  assert np.abs(trained_head).max() > 0  # the zero-initialised head moved


def test_a_bag_of_words_reward_stage_fits_once_reports_and_scores_the_policys_responses(tmp_path, capsys):
  from types import SimpleNamespace
  from bond_jax import reference_pools, rewards, study
  workdir = str(tmp_path)
  config = tiny_config()
  config.reward_training.model = "bag_of_words"
  final = pipeline.run(config, workdir, until="reward")["reward"]
  path = wd.bag_of_words_path(workdir)
  assert not os.path.exists(wd.checkpoint_dir(workdir, "reward"))  # no network was trained
  with open(path) as f:
    saved = json.load(f)
  assert saved["metrics"] == final and final["model"] == "bag_of_words"
  model = reward_baselines.BagOfWords.load(path)
  ctx = pipeline.setup(config, workdir, until="reward")
  splits = rt._splits(ctx.preferences)
  assert saved["train_pairs"] == len(splits["train"])
  for name in ("validation", "test"):
    wins = model.wins(splits[name])
    assert final[f"{name}_accuracy"] == wins.mean() and final[f"{name}_pairs"] == len(wins)
    assert 0 <= final[f"{name}_length_accuracy"] <= 1 and f"{name}_bow_accuracy" not in final
  out = capsys.readouterr().out
  assert f"[reward] bag-of-words model ({len(model.index)} words): held-out pairwise accuracy" in out
  # A rerun finds the stage finished and fits nothing; the study accepts the workdir as its base.
  mtime = os.stat(path).st_mtime_ns
  assert pipeline.run(config, workdir, until="reward")["reward"] == final
  assert os.stat(path).st_mtime_ns == mtime and "[reward] finished already" in capsys.readouterr().out
  study.check_base(config, workdir)
  # The distillation's reward route: that model on the decoded responses, with a digest (pools kept).
  route = rewards.route(config, ctx.tokenizer, workdir, ctx.mesh, [], eos_ids=[ctx.tokenizer.eos_id])
  assert route.cfg is None and route.text.digest == model.digest()
  assert reference_pools.can_keep(SimpleNamespace(text_rewards=route.text))
  texts = [" I love great movies\nA: me too", " no", " what do you like to do for fun?", " ok ok"]
  ids = [ctx.tokenizer.encode(t) for t in texts]
  width = max(map(len, ids))
  responses = np.zeros((2, 2, width), np.int32)
  response_mask = np.zeros((2, 2, width), bool)
  for i, seq in enumerate(ids):
    responses[i // 2, i % 2, :len(seq)], response_mask[i // 2, i % 2, :len(seq)] = seq, True
  # Distillation prompts (topic, opening turn): the model reads each conversation as the pairs held it.
  prompt_texts = [formats.dialogue_prompt("Do you like movies?", [t], 0) for t in ("hi there", "so bored")]
  prompt_ids = [ctx.tokenizer.encode_plain_prompt(t) for t in prompt_texts]
  prompt_width = max(map(len, prompt_ids))
  prompts, prompt_mask = np.zeros((2, prompt_width), np.int32), np.zeros((2, prompt_width), bool)
  for b, seq in enumerate(prompt_ids):  # left-padded
    prompts[b, prompt_width - len(seq):], prompt_mask[b, prompt_width - len(seq):] = seq, True
  scores = np.asarray(jax.device_get(route.text(prompts, prompt_mask, responses, response_mask))).reshape(-1)
  decoded = [ctx.tokenizer.decode(seq) for seq in ids]
  decoded_prompts = [ctx.tokenizer.decode(seq) for seq in prompt_ids for _ in range(2)]
  np.testing.assert_array_equal(scores, model.scores(decoded_prompts, decoded).astype(np.float32))
  assert len(set(scores.tolist())) > 1
  # ... which is not the response alone: the opening turn and the "B:" tag count
  assert not np.array_equal(scores, model.scores([""] * 4, decoded).astype(np.float32))
  # Export refuses it in one line: a bag of words has no Hugging Face form.
  proc = subprocess.run([
      sys.executable, "-m", "bond_jax.export", f"--workdir={workdir}", "--which=reward",
      f"--out={tmp_path.parent / 'bow_export'}"
  ], capture_output=True, text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  assert proc.returncode == 2 and "has no Hugging Face form" in proc.stderr.strip().splitlines()[-1]
  assert not os.path.exists(tmp_path.parent / "bow_export")
  # The workdir is guarded: its reward stage cannot be redone as a network under the same workdir.
  config.reward_training.model = "transformer"
  with pytest.raises(
      ValueError, match=r"reward_training.model='transformer' \(the workdir was made with "
      r"'bag_of_words'\)"):
    pipeline.run(config, workdir, until="reward")
