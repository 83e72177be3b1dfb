"""The workdir guard: step counts may change between runs, shapes and data may not; nothing is written
until the pipeline records the config."""

import os

import pytest

from bond_jax import workdir as wd


def test_config_guard_allows_step_counts_and_refuses_shape_changes(tmp_path, tiny_config):
  workdir = str(tmp_path)
  config = tiny_config()
  wd.check_config(config, workdir)  # first use: nothing recorded, nothing written
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  wd.record_config(config, workdir)
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


def test_a_workdir_recorded_before_a_guarded_field_existed_was_made_with_its_legacy_value(
    tmp_path, tiny_config):
  import json
  config, workdir = tiny_config(), str(tmp_path)
  config.reward_training.model = "transformer"
  wd.record_config(config, workdir)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    stored = json.load(f)
  del stored["reward_training.model"]  # as written before reward_training.model was guarded
  with open(path, "w") as f:
    json.dump(stored, f)
  wd.check_config(config, workdir)  # 'transformer', the only reward model there was
  config.reward_training.model = "bag_of_words"
  with pytest.raises(
      ValueError, match=r"reward_training.model='bag_of_words' \(the workdir was made with "
      r"'transformer'\)"):
    wd.check_config(config, workdir)
