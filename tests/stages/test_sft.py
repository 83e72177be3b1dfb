"""SFT stage on a tiny model: the loss falls, a stopped run resumes bit-exactly, a finished run is cached."""

import jax
import numpy as np
import pytest

from bond_jax import checkpoint, loop, metrics, pipeline, sharding, workdir as wd
from bond_jax.data import prepare
from bond_jax.models import params as params_lib
from bond_jax.models import presets, transformer
from bond_jax.stages import sft
from bond_jax.data.tokenizer import EOS_ID
from configs import dialogue

pytestmark = pytest.mark.usefixtures("compilation_cache")


def tiny_config(steps):
  c = dialogue.get_config()
  c.data.max_conversations = 200
  c.data.vocab_size = 400
  c.model.overrides.update(
      dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64))
  c.sft.update(
      dict(steps=steps, batch_size=8, seq_len=64, learning_rate=1e-2, warmup_steps=2, eval_every=10,
           eval_batches=2, checkpoint_every=10, log_every=5))
  return c


def test_response_nll_counts_only_loss_tokens():
  cfg = presets.get("micro", vocab_size=16, num_layers=1)
  params = params_lib.init_sharded(cfg, "lm", jax.random.key(0), sharding.make_mesh({}, jax.devices()[:1]))
  tokens = np.array([[2, 5, 7, 1, 0]])
  mask, loss_mask = np.array([[1, 1, 1, 1, 0]], bool), np.array([[0, 0, 1, 1, 0]], bool)
  total, count = sft.response_nll(cfg, params, dict(tokens=tokens, mask=mask, loss_mask=loss_mask))
  logp = jax.nn.log_softmax(transformer.forward(cfg, params, tokens, mask)[0], axis=-1)
  np.testing.assert_allclose([total, count], [-(logp[1, 7] + logp[2, 1]), 2.0], rtol=1e-5)


def test_unigram_is_add_one_smoothed():

  class Chars:  # a stand-in tokenizer: one id per character 'a'..'c' (ids 3..5)
    eos_id = EOS_ID

    def encode_batch(self, texts):
      return [[3 + "abc".index(ch) for ch in t] for t in texts]

  log_probs = sft.unigram_log_probs(["aab", "a"], Chars(), vocab_size=6)
  # counts + 1: eos 2+1, a 3+1, b 1+1, c 0+1, three unused ids 1 each -> total 6 + 6
  np.testing.assert_allclose(np.exp(log_probs), np.array([1, 3, 1, 4, 2, 1]) / 12)


def test_sft_batches_are_right_padded_with_response_loss(tmp_path):
  config = tiny_config(1)
  tokenizer = prepare.tokenizer(config, str(tmp_path))
  records = [{"prompt": "Topic: cats\nA:", "response": " I love cats"}] * 4
  batch = next(iter(sft.sft_batches(records, tokenizer, batch_size=2, seq_len=48, seed=0)))
  n = 1 + len(tokenizer.encode(records[0]["prompt"])) + len(tokenizer.encode(" I love cats")) + 1
  assert n < 48 and batch["tokens"].shape == (2, 48)
  assert batch["mask"][0].sum() == n and batch["mask"][0, :n].all()
  assert batch["tokens"][0, n - 1] == tokenizer.eos_id and batch["loss_mask"][0, n - 1]
  assert batch["loss_mask"][0].sum() == len(tokenizer.encode(" I love cats")) + 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sft"))
  return workdir, pipeline.run(tiny_config(30), workdir, until="sft")["sft"]


def test_sft_loss_decreases_and_stage_is_cached(trained, capsys):
  workdir, final = trained
  logged = metrics.read_metrics(wd.metrics_path(workdir, "sft"))
  losses = [r["loss"] for r in logged if "loss" in r]
  evals = [r for r in logged if "val_ppl" in r]
  assert losses[0] > 5.5 and losses[-1] < losses[0] - 1.0, losses  # from ~log(400) = 6.0
  assert [r["step"] for r in evals] == [10, 20, 30] and evals[-1]["val_ppl"] < evals[0]["val_ppl"]
  assert final["step"] == 30 and final["val_ppl"] == pytest.approx(np.exp(final["val_loss"]))
  assert final["unigram_ppl"] > 30
  meta, step = checkpoint.read_meta(wd.checkpoint_dir(workdir, "sft"))
  assert (step, meta["kind"], meta["model"]["d_model"]) == (30, "lm", 32)
  capsys.readouterr()
  assert pipeline.run(tiny_config(30), workdir, until="sft")["sft"] == final  # cached: no training
  assert "finished already" in capsys.readouterr().out


def test_resume_after_stop_is_bitwise_identical(tmp_path):
  config = tiny_config(6)
  config.sft.checkpoint_every = 3
  straight = pipeline.run(config, str(tmp_path / "straight"), until="sft")["sft"]
  stopped = str(tmp_path / "stopped")
  ctx = pipeline.setup(config, stopped, until="sft")
  assert loop.run(sft.build(ctx), stopped, stop_at_step=3) is None
  assert checkpoint.read_meta(wd.checkpoint_dir(stopped, "sft"))[1] == 3
  resumed = pipeline.run(config, stopped, until="sft")["sft"]
  assert resumed == straight
  a, _, step_a = checkpoint.restore_arrays(wd.checkpoint_dir(str(tmp_path / "straight"), "sft"))
  b, _, step_b = checkpoint.restore_arrays(wd.checkpoint_dir(stopped, "sft"))
  assert step_a == step_b == 6
  jax.tree.map(np.testing.assert_array_equal, a, b)
  steps = [r["step"] for r in metrics.read_metrics(wd.metrics_path(stopped, "sft")) if "loss" in r]
  assert steps == [1, 3, 4, 5, 6]  # logged at 1, 3 (stop), then 4 (first after resume), 5, 6
