"""Hugging Face config.json <-> ModelConfig, per family (hf.py re-exports both directions).

Each family reads what its transformers modeling file reads: Qwen2's q/k/v biases (always on), Qwen3's and
Gemma 3's q/k norms, Mistral's sliding window on every layer, Gemma 2/3's per-layer window (layer_types, or
the older alternation / sliding_window_pattern), query_pre_attn_scalar and soft-capping, and RoPE settings
in the transformers 5 layout (rope_parameters, per layer type for Gemma 3) or the older one (rope_theta,
rope_scaling, rope_local_base_freq). Anything this code cannot reproduce is a one-line ValueError.
"""

from __future__ import annotations

from typing import Any

from bond_jax.models.config import ModelConfig

# family -> (model_type, causal LM class, sequence classifier class)
_FAMILIES = {
    "llama": ("llama", "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "gemma": ("gemma", "GemmaForCausalLM", "GemmaForSequenceClassification"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "mistral": ("mistral", "MistralForCausalLM", "MistralForSequenceClassification"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
}
_FAMILY_OF = {model_type: family for family, (model_type, _, _) in _FAMILIES.items()}
SUPPORTED_MODEL_TYPES = tuple(_FAMILY_OF)
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "gelu_tanh")  # the Gemma families' tanh GELU
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_FAMILY_REQUIRED = {  # fields with no safe default: a file without them is not what it claims to be
    "qwen3": ("head_dim",),
    "mistral": ("sliding_window",),
    "gemma2": ("head_dim", "sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping",
               "final_logit_softcapping"),
    "gemma3": ("head_dim", "sliding_window", "query_pre_attn_scalar"),
}
_DEFAULT_THETA = {"gemma3": 1_000_000.0}  # transformers' defaults when a file gives no RoPE base

# --------------------------------------------------------------------------- export


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """rope_parameters (transformers 5 layout) of the full-attention layers; Gemma 3: per layer type."""
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_linear_factor is not None:
    rope = {"rope_type": "linear", "rope_theta": cfg.rope_theta, "factor": cfg.rope_linear_factor}
  if cfg.rope_llama3_scaling is not None:
    factor, low, high, original = cfg.rope_llama3_scaling
    rope = {
        "rope_type": "llama3",
        "rope_theta": cfg.rope_theta,
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original
    }
  if cfg.family != "gemma3":
    return rope
  local = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
  return {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": local}}


def _features_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The family-specific config.json fields."""
  out = {"attention_bias": False}
  if cfg.family in ("llama", "qwen2", "qwen3", "mistral"):
    out["hidden_act"] = "silu"
  else:
    out["hidden_act"] = out["hidden_activation"] = "gelu_pytorch_tanh"
  if cfg.family == "llama":
    out["mlp_bias"] = False
  if cfg.family == "qwen2":
    del out["attention_bias"]  # Qwen2 always has q/k/v biases
  if cfg.family in ("qwen2", "qwen3"):
    out["use_sliding_window"] = cfg.sliding_window is not None
  if cfg.family in ("qwen2", "qwen3", "mistral", "gemma2", "gemma3"):
    out["sliding_window"] = cfg.sliding_window
  if cfg.family in ("qwen2", "qwen3", "gemma2", "gemma3"):
    out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers]
  if cfg.family in ("gemma2", "gemma3"):
    scalar = cfg.head_dim if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar
    out.update(
        query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,  # typed int there
        attn_logit_softcapping=cfg.attn_softcap,
        final_logit_softcapping=cfg.final_softcap)
  return out


def _check_exportable(cfg: ModelConfig) -> None:
  """One-line ValueError for a feature the family's transformers class would not reproduce."""
  allowed = {
      "qkv_bias": cfg.family == "qwen2",
      "qk_norm": cfg.family in ("qwen3", "gemma3"),
      "sliding_window": cfg.family not in ("llama", "gemma"),
      "query_pre_attn_scalar": cfg.family in ("gemma2", "gemma3"),
      "attn_softcap": cfg.family in ("gemma2", "gemma3"),
      "final_softcap": cfg.family in ("gemma2", "gemma3"),
      "rope_local_theta": cfg.family == "gemma3",
  }
  for name, ok in allowed.items():
    value = getattr(cfg, name)
    if value not in (None, False) and not ok:
      raise ValueError(f"{name}={value!r} has no {cfg.family} config.json field; export it as another family")
  needed = {"qwen2": "qkv_bias", "qwen3": "qk_norm", "gemma3": "qk_norm"}.get(cfg.family)
  if needed and not getattr(cfg, needed):  # the class always builds them
    raise ValueError(f"{cfg.family} models have {needed}=True; set it or export as another family")


def config_to_hf(cfg: ModelConfig, kind: str = "lm", *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None) -> dict[str, Any]:
  """config.json contents for `cfg`; kind 'lm' (causal LM) or 'reward' (sequence classifier)."""
  if kind not in ("lm", "reward"):
    raise ValueError(f"kind={kind!r}; allowed: 'lm', 'reward'")
  _check_exportable(cfg)
  model_type, causal_lm, classifier = _FAMILIES[cfg.family]
  out = {
      "architectures": [causal_lm if kind == "lm" else classifier],
      "model_type": model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps,
      "rope_parameters": _rope_to_hf(cfg),
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_dropout": 0.0,
      "torch_dtype": cfg.param_dtype,
      "bos_token_id": bos_id,
      "eos_token_id": eos_id,
      "pad_token_id": pad_id,
      **_features_to_hf(cfg),
  }
  if kind == "reward":
    out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  return out


# --------------------------------------------------------------------------- import


def _parse_rope(rope: dict[str, Any], theta: float, source: str) -> dict[str, Any]:
  """ModelConfig's RoPE fields of one rope_parameters / rope_scaling dict (theta: the base if it has none)."""
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  fields = {"rope_theta": float(rope.get("rope_theta", theta))}
  if rope_type == "llama3":
    fields["rope_llama3_scaling"] = (float(rope["factor"]), float(rope["low_freq_factor"]),
                                     float(rope["high_freq_factor"]),
                                     int(rope["original_max_position_embeddings"]))
  elif rope_type == "linear":
    fields["rope_linear_factor"] = float(rope["factor"])
  elif rope_type != "default":
    raise ValueError(f"{source}: rope_type {rope_type!r} is not supported; allowed: default, linear, llama3")
  return fields


def _rope_from_hf(hf: dict[str, Any], family: str, source: str) -> dict[str, Any]:
  """RoPE fields from the transformers 5 layout (rope_parameters) or the older one (rope_theta and
  rope_scaling; Gemma 3: rope_local_base_freq for its sliding layers)."""
  theta = float(hf.get("rope_theta", _DEFAULT_THETA.get(family, 10_000.0)))
  params = hf.get("rope_parameters")
  if family != "gemma3":
    return _parse_rope(params or hf.get("rope_scaling") or {}, theta, source)
  if params and "full_attention" in params:
    full, local = params["full_attention"], params.get("sliding_attention") or {}
  else:  # the older layout: rope_scaling applies to the full layers only
    full, local = dict(params or hf.get("rope_scaling") or {}), {}
  fields = _parse_rope(full, theta, source)
  local = _parse_rope(local, float(hf.get("rope_local_base_freq", 10_000.0)), source)
  if set(local) != {"rope_theta"}:
    raise ValueError(f"{source}: scaled RoPE on sliding layers is not supported; allowed: rope_type default")
  return dict(fields, rope_local_theta=local["rope_theta"])


def _layer_types(hf: dict[str, Any], family: str, window: int | None) -> tuple[str, ...] | None:
  """Per-layer attention kinds: the file's layer_types, else the family's rule (None: all alike)."""
  if window is None:
    return None
  if hf.get("layer_types"):
    return tuple(hf["layer_types"])
  layers = range(hf["num_hidden_layers"])
  kind = lambda sliding: "sliding_attention" if sliding else "full_attention"
  if family == "gemma2":
    return tuple(kind((i + 1) % 2) for i in layers)
  if family == "gemma3":
    return tuple(kind((i + 1) % hf.get("sliding_window_pattern", 6)) for i in layers)
  if family in ("qwen2", "qwen3"):
    return tuple(kind(i >= hf.get("max_window_layers", 28)) for i in layers)
  return None


def _check_hf(hf: dict[str, Any], family: str, source: str) -> None:
  model_type = _FAMILIES[family][0]
  missing = [name for name in _REQUIRED + _FAMILY_REQUIRED.get(family, ()) if name not in hf]
  if missing:
    raise ValueError(f"{source}: a {model_type} config needs {', '.join(missing)}; the file lacks them")
  act = hf.get("hidden_activation") or hf.get("hidden_act")
  allowed = _ACTIVATIONS if family.startswith("gemma") else ("silu",)
  if act not in allowed:
    raise ValueError(f"{source}: hidden_act {act!r} is not supported for {model_type}; allowed: "
                     f"{', '.join(allowed)}")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ValueError(
        f"{source}: attention_bias/mlp_bias=True is not supported for {model_type}; allowed: False")
  if hf.get("use_bidirectional_attention"):
    raise ValueError(f"{source}: use_bidirectional_attention=True is not supported; allowed: False")


def config_from_hf(hf: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
  """ModelConfig from a config.json dict; a clear error for anything this code cannot reproduce."""
  model_type = hf.get("model_type")
  if model_type not in _FAMILY_OF:
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; allowed: "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  family = _FAMILY_OF[model_type]
  _check_hf(hf, family, source)
  heads = hf["num_attention_heads"]
  window = hf.get("sliding_window")
  if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
    window = None  # as transformers: Qwen's window is off unless use_sliding_window
  fields = dict(family=family, vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"], num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or
                hf["hidden_size"] // heads, mlp_dim=hf["intermediate_size"], norm_eps=hf.get(
                    "rms_norm_eps",
                    1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", family.startswith("gemma"))),
                max_seq_len=hf.get("max_position_embeddings",
                                   2048), qkv_bias=family == "qwen2", qk_norm=family in ("qwen3", "gemma3"),
                sliding_window=window, layer_types=_layer_types(hf, family, window),
                **_rope_from_hf(hf, family, source))
  if family in ("gemma2", "gemma3"):
    fields.update(query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
                  attn_softcap=hf.get("attn_logit_softcapping"),
                  final_softcap=hf.get("final_logit_softcapping"))
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except ValueError as error:
    raise ValueError(f"{source}: {error}") from None
