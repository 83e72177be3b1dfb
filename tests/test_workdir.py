"""Workdir layout: the config guard, the cached tokenizer, the model shape, loading a stage's params."""

import jax
import numpy as np
import optax
import pytest

from bond_jax import checkpoint, hf, sharding, stages, workdir as wd
from bond_jax.models import reward, transformer
from configs import dialogue


def tiny_config():
  c = dialogue.get_config()
  c.data.max_conversations = 200
  c.data.vocab_size = 400
  c.model.overrides.update(dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                                mlp_dim=64))
  return c


def test_config_guard_allows_step_counts_and_refuses_shape_changes(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config()
  wd.check_config(config, workdir)  # first use: records
  config.sft.steps = 5  # non-guarded: allowed
  config.reward_training.learning_rate = 1.0
  wd.check_config(config, workdir)
  config.data.vocab_size = 512
  with pytest.raises(ValueError, match=r"data.vocab_size=512 \(the workdir was made with 400\)"):
    wd.check_config(config, workdir)
  config = tiny_config()
  config.model.overrides.d_model = 48
  with pytest.raises(ValueError, match="model.overrides.d_model=48"):
    wd.check_config(config, workdir)


def test_tokenizer_is_trained_once_and_sets_the_model_vocab(tmp_path):
  config = tiny_config()
  tokenizer = wd.prepare_tokenizer(config, str(tmp_path))
  assert tokenizer.vocab_size == 400
  assert open(wd.tokenizer_path(str(tmp_path)), "rb").read() == tokenizer.model_proto
  again = wd.prepare_tokenizer(config, str(tmp_path))  # cached file, same ids
  assert again.encode("hello there, how are you?") == tokenizer.encode("hello there, how are you?")
  cfg = wd.model_config(config, tokenizer)
  assert (cfg.vocab_size, cfg.d_model, cfg.num_layers) == (400, 32, 1)
  config.model.overrides.vocab_size = 512  # padding the vocabulary is allowed
  assert wd.model_config(config, tokenizer).vocab_size == 512
  config.model.overrides.vocab_size = 300
  with pytest.raises(ValueError, match="vocab_size=300 is smaller than the tokenizer's 400"):
    wd.model_config(config, tokenizer)


def _save_stage(workdir, kind, params, cfg):
  optimizer = optax.adam(1e-3)
  mesh = sharding.make_mesh({"fsdp": -1})
  state = stages.init_state(params, optimizer, jax.random.key(3), mesh)
  mngr = checkpoint.manager(wd.checkpoint_dir(workdir, wd.KINDS[kind]))
  checkpoint.save(mngr, 7, state, dict(kind=kind, model=wd.as_dict(cfg), final_metrics=None), force=True)
  mngr.wait_until_finished()
  mngr.close()


@pytest.mark.parametrize("kind", ["lm", "reward"])
def test_load_stage_params_from_orbax_and_hugging_face(tmp_path, kind):
  mesh = sharding.make_mesh({"fsdp": -1})
  cfg = wd.model_config(tiny_config(), type("T", (), {"vocab_size": 128})())
  init = transformer.init_boxed if kind == "lm" else reward.init_boxed
  params, _ = sharding.init_sharded(lambda r: init(cfg, r), jax.random.key(0), mesh)
  if kind == "reward":  # a non-zero head, so the comparison covers it
    params = {**params, "head": params["head"] + 0.5}
  workdir = str(tmp_path / "run")
  _save_stage(workdir, kind, params, cfg)
  hf_dir = str(tmp_path / "hf")
  hf.export(params, cfg, hf_dir, kind=kind, bos_id=2, eos_id=1, pad_id=0)
  for source in (workdir, wd.stage_dir(workdir, wd.KINDS[kind]), hf_dir):
    loaded, loaded_cfg = wd.load_stage_params(source, kind, mesh)
    assert (loaded_cfg.d_model, loaded_cfg.vocab_size) == (cfg.d_model, cfg.vocab_size)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(params))
    embedding = loaded["embedding"] if kind == "lm" else loaded["backbone"]["embedding"]
    assert embedding.sharding.spec == sharding.logical_to_spec(("vocab", "embed"))
  other = "reward" if kind == "lm" else "lm"
  with pytest.raises(ValueError, match=f"holds no {wd.KINDS[other]!r} checkpoint"):
    wd.load_stage_params(workdir, other, mesh)
