"""Named model shapes, from a CPU-sized `tiny` to Gemma 7B. Shapes only: nothing is downloaded.

A real checkpoint of the big shapes comes in through hf.import_params (a local Hugging Face directory).
"""

from __future__ import annotations

from typing import Any

from bond_jax.models.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # Smoke tests of the whole pipeline (configs/dialogue.py:smoke).
    "micro":
        ModelConfig(family="llama", vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, mlp_dim=128, max_seq_len=256, tie_embeddings=True),
    # CPU tests and the embedded dialogue default (vocab set by the tokenizer trained on the data).
    "tiny":
        ModelConfig(family="llama", vocab_size=2048, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2,
                    head_dim=64, mlp_dim=768, max_seq_len=512, tie_embeddings=True),
    "small":
        ModelConfig(family="llama", vocab_size=8192, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4,
                    head_dim=64, mlp_dim=1536, max_seq_len=1024, tie_embeddings=True),
    "gemma_tiny":
        ModelConfig(family="gemma", vocab_size=2048, d_model=256, num_layers=4, num_heads=4, num_kv_heads=1,
                    head_dim=64, mlp_dim=1024, max_seq_len=512),
    # Llama 3.2 1B: tied embeddings, RoPE with Llama 3 frequency scaling.
    "llama_1b":
        ModelConfig(family="llama", vocab_size=128_256, d_model=2048, num_layers=16, num_heads=32,
                    num_kv_heads=8, head_dim=64, mlp_dim=8192, rope_theta=500_000.0,
                    rope_llama3_scaling=(32.0, 1.0, 4.0, 8192), norm_eps=1e-5, tie_embeddings=True,
                    max_seq_len=8192, compute_dtype="bfloat16", scan_layers=True, remat=True),
    "gemma_2b":
        ModelConfig(family="gemma", vocab_size=256_000, d_model=2048, num_layers=18, num_heads=8,
                    num_kv_heads=1, head_dim=256, mlp_dim=16_384, max_seq_len=8192, compute_dtype="bfloat16",
                    scan_layers=True, remat=True),
    "gemma_7b":
        ModelConfig(family="gemma", vocab_size=256_000, d_model=3072, num_layers=28, num_heads=16,
                    num_kv_heads=16, head_dim=256, mlp_dim=24_576, max_seq_len=8192, compute_dtype="bfloat16",
                    scan_layers=True, remat=True),
}


def get(name: str, **overrides) -> ModelConfig:
  """The preset `name` with field overrides, e.g. get('tiny', vocab_size=4096)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
  return PRESETS[name].replace(**overrides)


def from_config(model: Any, tokenizer_vocab: int | None = None) -> ModelConfig:
  """The ModelConfig of a config's `model` section: presets.get(model.preset, **model.overrides).

  tokenizer_vocab: the vocabulary of the tokenizer the run uses; it sets vocab_size unless
  model.overrides.vocab_size is given, which may be larger (padding the vocabulary, e.g. to divide the
  tensor axis) but not smaller. None keeps the preset's (or the override's) vocab_size, as a plan does.
  """
  overrides = dict(model.overrides.to_dict()) if model.get("overrides") else {}
  vocab = overrides.pop("vocab_size", tokenizer_vocab)
  if tokenizer_vocab is not None and vocab < tokenizer_vocab:
    raise ValueError(f"model.overrides.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab}; "
                     f"allowed: >= {tokenizer_vocab}")
  if vocab is not None:
    overrides["vocab_size"] = vocab
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  try:
    return get(model.preset, **overrides)
  except TypeError as error:  # an override naming no ModelConfig field
    raise ValueError(f"model.overrides: {error}") from None
