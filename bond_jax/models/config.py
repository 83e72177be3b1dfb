"""Shape and numerics of a decoder LM: one frozen dataclass shared by every model in a run.

The policy, anchor, reference and reward model are four parameter pytrees of ONE module definition, so
they share this config; only the reward model adds a scalar head (see reward.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

FAMILIES = ("llama", "gemma", "qwen2", "qwen3", "mistral", "gemma2", "gemma3")
GEMMA_STYLE = ("gemma", "gemma2", "gemma3")  # (1 + w) norms in float32, sqrt(D) embeddings, GeGLU, tied
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's names
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer of the Llama, Qwen, Mistral or Gemma families.

  Llama style (llama, qwen2, qwen3, mistral): RMSNorm (x * w), split-half RoPE, SwiGLU, grouped-query
  attention, tied or untied embeddings. Gemma style (gemma, gemma2, gemma3): embeddings scaled by
  sqrt(d_model), RMSNorm (x * (1 + w)), GeGLU (tanh GELU), tied embeddings; gemma2 and gemma3 add a norm
  after the attention and after the MLP (sandwich_norms). The family names the Hugging Face model type;
  the optional features below are switched on by the importer from each config.json, and every one is off
  by default (then compiled out: the llama and gemma graphs are unchanged).
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
  qkv_bias: bool = False  # Qwen2: biases on the q, k, v projections (not o)
  qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim of every q and k head, before RoPE
  # A sliding layer's query reads the keys of the last sliding_window slots, its own included.
  sliding_window: int | None = None
  # Per layer, one of LAYER_TYPES; None: every layer sliding when sliding_window is set (Mistral), else full.
  layer_types: tuple[str, ...] | None = None
  query_pre_attn_scalar: float | None = None  # scores times this ** -0.5 (Gemma 2/3); None: head_dim
  attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
  final_softcap: float | None = None  # the same on the output logits (Gemma 2)
  rope_local_theta: float | None = None  # sliding layers' unscaled RoPE base (Gemma 3); None: as full ones
  rope_linear_factor: float | None = None  # full layers' positions divided by it (linear RoPE scaling)
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
    if self.gemma_style and not self.tie_embeddings:
      raise ValueError(f"{self.family} models tie input and output embeddings; set tie_embeddings=True")
    self._check_features()

  def _check_features(self):
    for name in ("sliding_window", "query_pre_attn_scalar", "attn_softcap", "final_softcap",
                 "rope_local_theta", "rope_linear_factor"):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ValueError(f"{name}={getattr(self, name)} must be > 0 (or None: off)")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
        raise ValueError(f"layer_types={self.layer_types} must give one of {', '.join(LAYER_TYPES)} for each "
                         f"of the {self.num_layers} layers")
      if "sliding_attention" in self.layer_types and self.sliding_window is None:
        raise ValueError("layer_types has sliding_attention layers but sliding_window is None")

  @property
  def gemma_style(self) -> bool:
    return self.family in GEMMA_STYLE

  @property
  def sandwich_norms(self) -> bool:
    """Gemma 2/3: norms after the attention and after the MLP too (four per block)."""
    return self.family in ("gemma2", "gemma3")

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: True where it attends to a sliding window only."""
    if self.sliding_window is None:
      return (False,) * self.num_layers
    if self.layer_types is None:
      return (True,) * self.num_layers
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def mixed_layers(self) -> bool:
    """Some layers slide and others do not (Gemma 2/3): a scanned body reads its kind as a scanned flag."""
    return len(set(self.sliding_layers)) > 1

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
    per_layer = d * hd * (h + 2 * kv) + h * hd * d + 3 * d * m + (4 if self.sandwich_norms else 2) * d
    per_layer += (h + 2 * kv) * hd * self.qkv_bias + 2 * hd * self.qk_norm
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * per_layer + d + head
