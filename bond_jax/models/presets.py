"""Named model shapes, from a CPU-sized `tiny` to Llama 3.1 8B, Qwen3 8B, Gemma 2 9B and Mistral 7B. Shapes only:
nothing is downloaded.

A real checkpoint of the big shapes comes in through hf.import_params (a local Hugging Face directory).
"""

from __future__ import annotations

from typing import Any

from bond_jax.models.config import ModelConfig


def _every(num_layers: int, period: int) -> tuple[str, ...]:
  """Gemma's layer_types: layer i is full iff (i + 1) % period == 0, else sliding (Gemma 2: period 2)."""
  return tuple("full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(num_layers))


# Shared by the big shapes: bfloat16 compute, scanned rematerialised layers, an 8192-token context.
_BIG = dict(max_seq_len=8192, compute_dtype="bfloat16", scan_layers=True, remat=True)
_LLAMA3 = dict(family="llama", vocab_size=128_256, rope_theta=500_000.0, norm_eps=1e-5, **_BIG)
_QWEN3 = dict(family="qwen3", vocab_size=151_936, qk_norm=True, head_dim=128, rope_theta=1e6, **_BIG)
_GEMMA2 = dict(family="gemma2", vocab_size=256_000, head_dim=256, query_pre_attn_scalar=256.0,
               sliding_window=4096, attn_softcap=50.0, final_softcap=30.0, **_BIG)
_GEMMA3 = dict(family="gemma3", qk_norm=True, head_dim=256, query_pre_attn_scalar=256.0, rope_theta=1e6,
               rope_local_theta=10_000.0, **_BIG)

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
    "llama_3b":  # Llama 3.2 3B
        ModelConfig(**_LLAMA3, d_model=3072, num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128, mlp_dim=8192, rope_llama3_scaling=
                    (32.0, 1.0, 4.0, 8192), tie_embeddings=True),
    "llama_8b":  # Llama 3.1 8B
        ModelConfig(**_LLAMA3, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14_336, rope_llama3_scaling=
                    (8.0, 1.0, 4.0, 8192), tie_embeddings=False),
    "mistral_7b":  # Mistral 7B v0.1: a 4096-token window on every layer
        ModelConfig(family="mistral", vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14_336, norm_eps=1e-5, sliding_window=4096, tie_embeddings=False, **_BIG
                   ),
    "qwen3_0_6b":
        ModelConfig(**_QWEN3, d_model=1024, num_layers=28, num_heads=16, num_kv_heads=8, mlp_dim=3072,
                    tie_embeddings=True),
    "qwen3_1_7b":
        ModelConfig(**_QWEN3, d_model=2048, num_layers=28, num_heads=16, num_kv_heads=8, mlp_dim=6144,
                    tie_embeddings=True),
    "qwen3_8b":
        ModelConfig(**_QWEN3, d_model=4096, num_layers=36, num_heads=32, num_kv_heads=8, mlp_dim=12_288,
                    tie_embeddings=False),
    "gemma2_2b":
        ModelConfig(**_GEMMA2, d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4, mlp_dim=9216,
                    layer_types=_every(26, 2)),
    "gemma2_9b":
        ModelConfig(**_GEMMA2, d_model=3584, num_layers=42, num_heads=16, num_kv_heads=8, mlp_dim=14_336,
                    layer_types=_every(42, 2)),
    "gemma3_1b":
        ModelConfig(**_GEMMA3, vocab_size=262_144, d_model=1152, num_layers=26, num_heads=4, num_kv_heads=1,
                    mlp_dim=6912, sliding_window=512, layer_types=_every(26, 6)),
    "gemma3_4b":  # the text tower; full layers' RoPE linearly scaled by 8
        ModelConfig(**_GEMMA3, vocab_size=262_208, d_model=2560, num_layers=34, num_heads=8, num_kv_heads=4, mlp_dim=10_240, sliding_window=1024, layer_types=
                    _every(34, 6), rope_linear_factor=8.0),
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
