"""LoRA adapters as a PEFT adapter directory: adapter_config.json + adapter_model.safetensors, which
`peft.PeftModel.from_pretrained(base, adapter_dir)` loads onto the family's *ForCausalLM of the base.

PEFT's conventions: a LoRA layer computes W x + (lora_alpha / r) * lora_B(lora_A(x)) (alpha / sqrt(r)
with use_rslora) with lora_A.weight [r, in] and lora_B.weight [out, r], stored under
'base_model.model.<the module's name>.lora_A.weight'. Ours (models/lora.py): A [inputs..., r] and
B [r, outputs...] with the same scale, so lora_A = A flattened and transposed, lora_B likewise; the module
names come from hf.py's tensor table (`_layer_tensors`), the one map of our params to Hugging Face names.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from bond_jax import hf
from bond_jax.models import lora as lora_lib
from bond_jax.models.config import ModelConfig

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _module_names(cfg: ModelConfig) -> dict[str, str]:
  """Our projection name -> its Hugging Face module inside a layer ('q' -> 'self_attn.q_proj')."""
  return {name: theirs[:-len(".weight")] for (_, name), theirs, _, _ in hf._layer_tensors(cfg)}


def adapter_tensors(adapters: Any, cfg: ModelConfig, lora: lora_lib.LoraConfig) -> dict[str, np.ndarray]:
  """PEFT's tensors (float32, [r, in] and [out, r]) of an adapters tree (lora.init's layout)."""
  modules, out = _module_names(cfg), {}
  for i in lora.adapted_layers(cfg):
    layer = (jax.tree.map(lambda x, i=i: x[i], adapters["layers"]["block"])
             if cfg.scan_layers else adapters[f"layer_{i}"])
    for name in lora.targets:
      group, n_in = lora_lib.TARGETS[name]
      a, b = (np.asarray(jax.device_get(layer[group][name][k]), np.float32) for k in ("a", "b"))
      prefix = f"base_model.model.model.layers.{i}.{modules[name]}"
      out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, lora.rank).T)
      out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.reshape(lora.rank, -1).T)
  return out


def adapter_config(cfg: ModelConfig, lora: lora_lib.LoraConfig, base_path: str = "") -> dict[str, Any]:
  """PEFT's LoraConfig fields for these adapters (no dropout, no bias)."""
  modules = _module_names(cfg)
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_path,
      "r": lora.rank,
      "lora_alpha": lora.alpha,
      "use_rslora": lora.rslora,
      "target_modules": sorted(modules[name].split(".")[-1] for name in lora.targets),
      "layers_to_transform": list(lora.adapted_layers(cfg)) if lora.layers else None,
      "lora_dropout": 0.0,
      "bias": "none",
      "fan_in_fan_out": False,
      "init_lora_weights": True,
      "modules_to_save": None,
      "inference_mode": True,
  }


def export_adapters(adapters: Any, cfg: ModelConfig, lora: lora_lib.LoraConfig, out_dir: str, *,
                    base_path: str = "", overwrite: bool = False) -> None:
  """Write the PEFT adapter directory (through a temporary directory renamed into place)."""
  hf.check_out_dir(out_dir, overwrite)
  tensors = adapter_tensors(adapters, cfg, lora)
  with hf.staged_directory(out_dir) as staging:
    save_file(tensors, os.path.join(staging, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(staging, CONFIG), "w") as f:
      json.dump(adapter_config(cfg, lora, base_path), f, indent=2)
