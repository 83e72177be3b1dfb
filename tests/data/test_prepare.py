"""The tokenizer a workdir is prepared with (trained once) and the model shape it gives."""

import pytest

from bond_jax import workdir as wd
from bond_jax.data import prepare
from bond_jax.models import presets


def test_tokenizer_is_trained_once_and_sets_the_model_vocab(tmp_path, tiny_config):
  config = tiny_config()
  tokenizer = prepare.tokenizer(config, str(tmp_path))
  assert tokenizer.vocab_size == 400
  assert open(wd.tokenizer_path(str(tmp_path)), "rb").read() == tokenizer.model_proto
  again = prepare.tokenizer(config, str(tmp_path))  # cached file, same ids
  assert again.encode("hello there, how are you?") == tokenizer.encode("hello there, how are you?")
  cfg = presets.from_config(config.model, tokenizer.vocab_size)
  assert (cfg.vocab_size, cfg.d_model, cfg.num_layers) == (400, 32, 1)
  config.model.overrides.vocab_size = 512  # padding the vocabulary is allowed
  assert presets.from_config(config.model, tokenizer.vocab_size).vocab_size == 512
  config.model.overrides.vocab_size = 300
  with pytest.raises(ValueError, match="vocab_size=300 is smaller than the tokenizer's 400"):
    presets.from_config(config.model, tokenizer.vocab_size)
