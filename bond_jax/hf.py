"""Hugging Face format: export bond_jax params as Llama/Gemma checkpoints and import them back.

Export writes config.json, model.safetensors (or shards + model.safetensors.index.json),
generation_config.json and, given a tokenizer directory's files, the tokenizer. The policy loads as
LlamaForCausalLM / GemmaForCausalLM and the reward model as *ForSequenceClassification (num_labels=1, with
pad_token_id set so transformers reads the score at the last non-pad token, as models/reward.py does).
Neither direction needs torch or transformers: tensors go through safetensors' Flax backend.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.flax import load_file, save_file

from bond_jax import sharding
from bond_jax.models import params as params_lib
from bond_jax.models.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "gemma")
_ARCHITECTURES = {
    ("llama", "lm"): "LlamaForCausalLM",
    ("gemma", "lm"): "GemmaForCausalLM",
    ("llama", "reward"): "LlamaForSequenceClassification",
    ("gemma", "reward"): "GemmaForSequenceClassification"
}
_ACTIVATIONS = {"llama": ("silu",), "gemma": ("gelu_pytorch_tanh", "gelu", "gelu_tanh")}

# --------------------------------------------------------------------------- configs


def config_to_hf(cfg: ModelConfig, kind: str = "lm", *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None) -> dict[str, Any]:
  """config.json contents for `cfg`; kind 'lm' (causal LM) or 'reward' (sequence classifier)."""
  if kind not in ("lm", "reward"):
    raise ValueError(f"kind={kind!r}; allowed: 'lm', 'reward'")
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
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
  out = {
      "architectures": [_ARCHITECTURES[(cfg.family, kind)]],
      "model_type": cfg.family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu" if cfg.family == "llama" else "gelu_pytorch_tanh",
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps,
      "rope_parameters": rope,
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "torch_dtype": cfg.param_dtype,
      "bos_token_id": bos_id,
      "eos_token_id": eos_id,
      "pad_token_id": pad_id,
  }
  if cfg.family == "llama":
    out["mlp_bias"] = False
  if kind == "reward":
    out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  return out


def config_from_hf(hf: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
  """ModelConfig from a config.json dict; a clear error for anything this code cannot reproduce."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; allowed: "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  act = hf.get("hidden_activation") or hf.get("hidden_act")
  if act not in _ACTIVATIONS[model_type]:
    raise ValueError(f"{source}: hidden_act {act!r} is not supported for {model_type}; allowed: "
                     f"{', '.join(_ACTIVATIONS[model_type])}")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ValueError(f"{source}: attention_bias/mlp_bias=True is not supported; allowed: False")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "llama3"):
    raise ValueError(f"{source}: rope_type {rope_type!r} is not supported; allowed: default, llama3")
  llama3 = None
  if rope_type == "llama3":
    llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
              int(rope["original_max_position_embeddings"]))
  heads = hf["num_attention_heads"]
  fields = dict(family=model_type, vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"], num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or
                hf["hidden_size"] // heads, mlp_dim=hf["intermediate_size"],
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
                rope_llama3_scaling=llama3, norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(
                    hf.get("tie_word_embeddings",
                           model_type == "gemma")), max_seq_len=hf.get("max_position_embeddings", 2048))
  fields.update(overrides)
  return ModelConfig(**fields)


# --------------------------------------------------------------------------- tensor names


def _layer_params(params: dict[str, Any], cfg: ModelConfig) -> Iterator[tuple[int, dict[str, Any]]]:
  """(i, layer params) for both layouts: unrolled 'layer_i' or scanned 'layers/block' [L, ...]."""
  if "layers" in params:
    stacked = params["layers"]["block"]
    for i in range(cfg.num_layers):
      yield i, jax.tree.map(lambda x, i=i: x[i], stacked)
  else:
    for i in range(cfg.num_layers):
      yield i, params[f"layer_{i}"]


def _to_hf_tensors(backbone: dict[str, Any], cfg: ModelConfig) -> Iterator[tuple[str, jax.Array]]:
  d = cfg.d_model
  yield "model.embed_tokens.weight", backbone["embedding"]
  for i, layer in _layer_params(backbone, cfg):
    prefix = f"model.layers.{i}."
    attn, mlp = layer["attn"], layer["mlp"]
    yield prefix + "self_attn.q_proj.weight", attn["q"].reshape(d, -1).T
    yield prefix + "self_attn.k_proj.weight", attn["k"].reshape(d, -1).T
    yield prefix + "self_attn.v_proj.weight", attn["v"].reshape(d, -1).T
    yield prefix + "self_attn.o_proj.weight", attn["o"].reshape(-1, d).T
    yield prefix + "mlp.gate_proj.weight", mlp["gate"].T
    yield prefix + "mlp.up_proj.weight", mlp["up"].T
    yield prefix + "mlp.down_proj.weight", mlp["down"].T
    yield prefix + "input_layernorm.weight", layer["attn_norm"]["scale"]
    yield prefix + "post_attention_layernorm.weight", layer["mlp_norm"]["scale"]
  yield "model.norm.weight", backbone["final_norm"]["scale"]


def _from_hf_tensors(tensors: dict[str, jax.Array], cfg: ModelConfig, source: str) -> dict[str, Any]:
  d, h, k, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def get(name, shape):
    if name not in tensors:
      raise ValueError(f"{source}: tensor {name!r} is missing")
    x = tensors[name]
    if tuple(x.shape) != shape:
      raise ValueError(f"{source}: tensor {name!r} has shape {tuple(x.shape)}; expected {shape}")
    return x.astype(cfg.params_dtype)

  layers = []
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    layers.append({
        "attn": {
            "q": get(p + "self_attn.q_proj.weight", (h * hd, d)).T.reshape(d, h, hd),
            "k": get(p + "self_attn.k_proj.weight", (k * hd, d)).T.reshape(d, k, hd),
            "v": get(p + "self_attn.v_proj.weight", (k * hd, d)).T.reshape(d, k, hd),
            "o": get(p + "self_attn.o_proj.weight", (d, h * hd)).T.reshape(h, hd, d)
        },
        "mlp": {
            "gate": get(p + "mlp.gate_proj.weight", (cfg.mlp_dim, d)).T,
            "up": get(p + "mlp.up_proj.weight", (cfg.mlp_dim, d)).T,
            "down": get(p + "mlp.down_proj.weight", (d, cfg.mlp_dim)).T
        },
        "attn_norm": {
            "scale": get(p + "input_layernorm.weight", (d,))
        },
        "mlp_norm": {
            "scale": get(p + "post_attention_layernorm.weight", (d,))
        },
    })
  out = {
      "embedding": get("model.embed_tokens.weight", (cfg.vocab_size, d)),
      "final_norm": {
          "scale": get("model.norm.weight", (d,))
      }
  }
  if cfg.scan_layers:
    out["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
  else:
    out.update({f"layer_{i}": layer for i, layer in enumerate(layers)})
  return out


# --------------------------------------------------------------------------- files


def check_out_dir(out_dir: str, overwrite: bool) -> None:
  """One-line ValueError when export may not write `out_dir`: a file, or non-empty without overwrite."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"export target {out_dir!r} is a file; give a directory")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise ValueError(f"export directory {out_dir!r} is not empty; pass --overwrite to replace it")


def _write_safetensors(tensors: dict[str, jax.Array], out_dir: str, max_shard_bytes: int) -> None:
  total = sum(x.size * x.dtype.itemsize for x in tensors.values())
  if total <= max_shard_bytes:
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return
  shards, current, size = [], {}, 0
  for name, x in tensors.items():
    nbytes = x.size * x.dtype.itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = x
    size += nbytes
  shards.append(current)
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
    weight_map.update({name: fname for name in shard})
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, f, indent=2)


def _safetensors_files(model_dir: str) -> list[str]:
  index = os.path.join(model_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      return sorted(set(json.load(f)["weight_map"].values()))
  if os.path.exists(os.path.join(model_dir, "model.safetensors")):
    return ["model.safetensors"]
  raise ValueError(f"{model_dir!r} has neither model.safetensors nor model.safetensors.index.json")


def _read_safetensors(model_dir: str) -> dict[str, jax.Array]:
  tensors = {}
  for fname in _safetensors_files(model_dir):
    tensors.update(load_file(os.path.join(model_dir, fname)))
  return tensors


def model_kind(model_dir: str) -> str:
  """'reward' when the directory holds a score.weight (a *ForSequenceClassification export), else 'lm'.

  Reads only the safetensors headers, so a CLI can check a directory before loading any weights.
  """
  for fname in _safetensors_files(model_dir):
    with safe_open(os.path.join(model_dir, fname), framework="numpy") as f:
      if "score.weight" in f.keys():
        return "reward"
  return "lm"


def check_kind(model_dir: str, kind: str, found: str | None = None) -> None:
  """One-line ValueError unless the directory holds a model of `kind` ('lm' or 'reward'); `found`: its
  kind when already known (default: model_kind)."""
  found = found or model_kind(model_dir)
  names = {"lm": "a causal LM", "reward": "a reward model"}
  if kind not in names:
    raise ValueError(f"kind={kind!r}; allowed: 'lm', 'reward'")
  if kind != found:
    has = "has a score.weight" if found == "reward" else "has no score.weight"
    raise ValueError(f"{model_dir} is {names[found]} ({has}); expected {names[kind]}")


def _give_usual_modes(directory: str) -> None:
  """safetensors writes each file through a tempfile.NamedTempFile (mode 0600 whatever the umask) that it
  renames into place; give every file the mode open() gives (0666 less the umask), read off `directory`,
  which os.makedirs made with 0777 less the umask."""
  mode = os.stat(directory).st_mode & 0o666
  for name in os.listdir(directory):
    os.chmod(os.path.join(directory, name), mode)


def export(params: Any, cfg: ModelConfig, out_dir: str, *, kind: str = "lm", overwrite: bool = False,
           tokenizer_files: dict[str, str] | None = None, bos_id: int | None = None,
           eos_id: int | None = None, pad_id: int | None = None, dtype: str | None = None,
           max_shard_bytes: int = 5 * 2**30) -> None:
  """Write a Hugging Face checkpoint of policy (kind='lm') or reward-model (kind='reward') params.

  The directory is written under a temporary name and renamed into place, so a failed export never
  leaves a half-written checkpoint, and an existing one is replaced only when the new one is complete.
  tokenizer_files: {file name in out_dir: source path} (e.g. tokenizer.model, tokenizer_config.json).
  dtype: tensor dtype in the files (default: the config's param dtype).
  """
  check_out_dir(out_dir, overwrite)
  if kind == "reward" and pad_id is None:
    raise ValueError("exporting a reward model needs pad_id: transformers reads the score at the last "
                     "token that is not pad_token_id")
  dtype = dtype or cfg.param_dtype
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r}; allowed: float32, bfloat16, float16")
  backbone = params["backbone"] if kind == "reward" else params
  tensors = dict(_to_hf_tensors(backbone, cfg))
  if kind == "lm" and not cfg.tie_embeddings:
    tensors["lm_head.weight"] = params["lm_head"].T
  if kind == "reward":
    tensors["score.weight"] = params["head"][None, :]
  tensors = {name: jnp.asarray(jax.device_get(x)).astype(dtype) for name, x in tensors.items()}

  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.partial-{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  try:
    _write_safetensors(tensors, staging, max_shard_bytes)
    hf_config = config_to_hf(cfg, kind, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    hf_config["torch_dtype"] = dtype
    with open(os.path.join(staging, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    if kind == "lm":
      generation = {
          "bos_token_id": bos_id,
          "eos_token_id": eos_id,
          "pad_token_id": pad_id,
          "do_sample": True,
          "temperature": 1.0,
          "top_k": 0,
          "top_p": 1.0
      }
      with open(os.path.join(staging, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    for name, src in (tokenizer_files or {}).items():
      shutil.copyfile(src, os.path.join(staging, name))
    _give_usual_modes(staging)
    if os.path.isdir(out_dir):
      shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def load_config(model_dir: str, **overrides) -> tuple[ModelConfig, dict[str, Any]]:
  """(ModelConfig, raw config.json dict) of a Hugging Face directory."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{model_dir!r} is not a Hugging Face model directory: no config.json")
  with open(path) as f:
    raw = json.load(f)
  return config_from_hf(raw, path, **overrides), raw


def import_params(model_dir: str, mesh: Mesh | None = None, kind: str | None = None,
                  **config_overrides) -> tuple[Any, ModelConfig]:
  """Read a Hugging Face Llama/Gemma directory into bond_jax params, placed on `mesh` when given.

  kind: 'lm' or 'reward'; by default inferred from the architecture (a *ForSequenceClassification with a
  score.weight is a reward model); a directory of the other kind is a ValueError.
  config_overrides: e.g. scan_layers=True, compute_dtype='bfloat16'.
  Returns (params, cfg).
  """
  cfg, raw = load_config(model_dir, **config_overrides)
  tensors = _read_safetensors(model_dir)
  found = "reward" if "score.weight" in tensors else "lm"
  kind = found if kind is None else kind
  check_kind(model_dir, kind, found)
  backbone = _from_hf_tensors(tensors, cfg, model_dir)
  if kind == "reward":
    head = tensors.get("score.weight")
    if head is None or head.shape != (1, cfg.d_model):
      raise ValueError(f"{model_dir}: a reward model needs score.weight of shape (1, {cfg.d_model}) "
                       f"(num_labels=1); found {None if head is None else tuple(head.shape)}")
    params = {"backbone": backbone, "head": head[0].astype(cfg.params_dtype)}
  else:
    params = backbone
    if not cfg.tie_embeddings:
      lm_head = tensors.get("lm_head.weight")
      if lm_head is None:
        raise ValueError(f"{model_dir}: tie_word_embeddings is false but lm_head.weight is missing")
      params["lm_head"] = lm_head.T.astype(cfg.params_dtype)
  if mesh is not None:
    params = sharding.place(params, params_lib.logical_axes(cfg, kind), mesh)
  return params, cfg
