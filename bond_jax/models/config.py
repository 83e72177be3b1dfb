"""Shape and numerics of a decoder LM: one frozen dataclass shared by every model in a run.

The policy, anchor, reference and reward model are four parameter pytrees of ONE module definition, so
they share this config; only the reward model adds a scalar head (see reward.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

FAMILIES = ("llama", "gemma")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer of the Llama or Gemma family.

  Llama: RMSNorm (x * w), split-half RoPE, SwiGLU, grouped-query attention, tied or untied embeddings.
  Gemma: embeddings scaled by sqrt(d_model), RMSNorm (x * (1 + w)), GeGLU (tanh GELU), tied embeddings.
  """

  family: str = "llama"
  vocab_size: int = 512
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 128
  rope_theta: float = 10_000.0
  # Llama 3 frequency scaling (None for plain RoPE): factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings, as in the Llama 3.1/3.2 configs.
  rope_llama3_scaling: tuple[float, float, float, int] | None = None
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  max_seq_len: int = 512
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  scan_layers: bool = False  # one compiled layer body: fast compiles for deep models
  remat: bool = False  # recompute layer activations in the backward pass (memory for FLOPs)

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"model family {self.family!r} is not supported; allowed: {', '.join(FAMILIES)}")
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r} is not supported; allowed: {', '.join(DTYPES)}")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                 "max_seq_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.family == "gemma" and not self.tie_embeddings:
      raise ValueError("gemma models tie input and output embeddings; set tie_embeddings=True")

  @property
  def dtype(self):
    return DTYPES[self.compute_dtype]

  @property
  def params_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready fields (stored in checkpoint metadata)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "ModelConfig":
    """Inverse of to_dict after a JSON round trip (lists back to tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

  def num_params(self) -> int:
    """Parameter count from the shapes (embeddings counted once when tied)."""
    d, h, kv, hd, m = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
    per_layer = d * hd * (h + 2 * kv) + h * hd * d + 3 * d * m + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * per_layer + d + head
