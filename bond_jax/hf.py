"""Hugging Face format: export bond_jax params as Llama, Gemma (1-3), Qwen2/3 or Mistral checkpoints and import
them back (config.json per family: hf_config.py).

Export writes config.json, model.safetensors (or shards + model.safetensors.index.json),
generation_config.json and, given a tokenizer directory's files, the tokenizer. The policy loads as
the family's *ForCausalLM (LlamaForCausalLM, Gemma3ForCausalLM, ...) and the reward model as its
*ForSequenceClassification (num_labels=1, with
pad_token_id set so transformers reads the score at the last non-pad token, as models/reward.py does).
Neither direction needs torch or transformers: tensors go through safetensors' Flax backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.flax import load_file, save_file

from bond_jax import sharding
from bond_jax.hf_config import SUPPORTED_MODEL_TYPES, config_from_hf, config_to_hf
from bond_jax.models import params as params_lib
from bond_jax.models.config import ModelConfig

__all__ = ["SUPPORTED_MODEL_TYPES", "config_from_hf", "config_to_hf", "export", "import_params"]

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


def _layer_tensors(cfg: ModelConfig) -> list[tuple[tuple[str, str], str, tuple[int, ...], int | None]]:
  """A layer's (our param path, Hugging Face tensor name, our shape, split). Hugging Face stores a matrix
  as [out, in]: ours reshaped to [prod(shape[:split]), prod(shape[split:])], transposed; a vector (split
  None) flattened. Optional params only where the config has them; the pre-MLP norm is mlp_norm in every
  family (Gemma 2/3 call it pre_feedforward_layernorm, the others post_attention_layernorm)."""
  d, h, k, hd, m = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  heads = {"q": h, "k": k, "v": k}
  out = [(("attn", n), f"self_attn.{n}_proj.weight", (d, heads[n], hd), 1) for n in "qkv"]
  out.append((("attn", "o"), "self_attn.o_proj.weight", (h, hd, d), 2))
  if cfg.qkv_bias:
    out += [(("attn", f"{n}_bias"), f"self_attn.{n}_proj.bias", (heads[n], hd), None) for n in "qkv"]
  if cfg.qk_norm:
    out += [(("attn", f"{n}_norm"), f"self_attn.{n}_norm.weight", (hd,), None) for n in "qk"]
  out += [(("mlp", "gate"), "mlp.gate_proj.weight", (d, m), 1),
          (("mlp", "up"), "mlp.up_proj.weight", (d, m), 1),
          (("mlp", "down"), "mlp.down_proj.weight", (m, d), 1)]
  norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
  if cfg.sandwich_norms:
    norms.update(attn_post_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
                 mlp_post_norm="post_feedforward_layernorm")
  return out + [((ours, "scale"), f"{theirs}.weight", (d,), None) for ours, theirs in norms.items()]


def _hf_shape(shape: tuple[int, ...], split: int | None) -> tuple[int, ...]:
  size = lambda dims: int(np.prod(dims, dtype=np.int64))
  return (size(shape),) if split is None else (size(shape[split:]), size(shape[:split]))


def _to_hf_tensors(backbone: dict[str, Any], cfg: ModelConfig) -> Iterator[tuple[str, jax.Array]]:
  yield "model.embed_tokens.weight", backbone["embedding"]
  spec = _layer_tensors(cfg)
  for i, layer in _layer_params(backbone, cfg):
    for (group, name), theirs, shape, split in spec:
      x = layer[group][name]
      yield f"model.layers.{i}.{theirs}", x.reshape(-1) if split is None else x.reshape(
          _hf_shape(shape, split)[::-1]).T
  yield "model.norm.weight", backbone["final_norm"]["scale"]


def _from_hf_tensors(tensors: dict[str, jax.Array], cfg: ModelConfig, source: str) -> dict[str, Any]:
  used = set()

  def get(name, shape):
    if name not in tensors:
      raise ValueError(f"{source}: tensor {name!r} is missing")
    x = tensors[name]
    if tuple(x.shape) != shape:
      raise ValueError(
          f"{source}: tensor {name!r} has shape {tuple(x.shape)}; expected {shape} from config.json")
    used.add(name)
    return x.astype(cfg.params_dtype)

  spec, layers = _layer_tensors(cfg), []
  for i in range(cfg.num_layers):
    layer = {}
    for (group, name), theirs, shape, split in spec:
      x = get(f"model.layers.{i}.{theirs}", _hf_shape(shape, split))
      layer.setdefault(group, {})[name] = x.reshape(shape) if split is None else x.T.reshape(shape)
    layers.append(layer)
  out = {
      "embedding": get("model.embed_tokens.weight", (cfg.vocab_size, cfg.d_model)),
      "final_norm": {
          "scale": get("model.norm.weight", (cfg.d_model,))
      }
  }
  unused = sorted(n for n in tensors
                  if n not in used and n not in ("lm_head.weight",
                                                 "score.weight") and not n.endswith("rotary_emb.inv_freq"))
  if unused:
    raise ValueError(f"{source}: tensor {unused[0]!r} (and {len(unused) - 1} more) has no place in a "
                     f"{cfg.family} model of this config.json")
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
  hf_config = config_to_hf(cfg, kind, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)  # refuses before writing
  backbone = params["backbone"] if kind == "reward" else params
  tensors = dict(_to_hf_tensors(backbone, cfg))
  if kind == "lm" and not cfg.tie_embeddings:
    tensors["lm_head.weight"] = params["lm_head"].T
  if kind == "reward":
    tensors["score.weight"] = params["head"][None, :]
  tensors = {name: jnp.asarray(jax.device_get(x)).astype(dtype) for name, x in tensors.items()}

  with staged_directory(out_dir) as staging:
    _write_safetensors(tensors, staging, max_shard_bytes)
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


@contextlib.contextmanager
def staged_directory(out_dir: str) -> Iterator[str]:
  """A fresh temporary directory beside out_dir that replaces out_dir when the block ends without an
  error, with the usual file modes: a failed export never leaves half a directory."""
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.partial-{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  try:
    yield staging
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
  """Read a Hugging Face directory of a supported family (SUPPORTED_MODEL_TYPES) into bond_jax params, placed on `mesh` when given.

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
