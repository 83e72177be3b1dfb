"""The real shapes (presets.py): parameter counts from the shapes equal the published ones and num_params."""

import jax
import numpy as np
import pytest

from bond_jax.models import params, presets

# preset: its parameter count in billions, rounded to 2 decimals, as the model cards and safetensors give it
PUBLISHED = {
    "llama_1b": 1.24,
    "llama_3b": 3.21,
    "llama_8b": 8.03,
    "mistral_7b": 7.24,
    "qwen3_0_6b": 0.60,
    "qwen3_1_7b": 1.72,
    "qwen3_8b": 8.19,
    "gemma2_2b": 2.61,
    "gemma2_9b": 9.24,
    "gemma3_1b": 1.00,
    "gemma3_4b": 3.88,  # the text tower of the 4.3B image-text model
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_parameter_counts(name):
  cfg = presets.get(name)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params.shapes(cfg, "lm")))
  assert count == cfg.num_params()
  assert round(count / 1e9, 2) == PUBLISHED[name], count
