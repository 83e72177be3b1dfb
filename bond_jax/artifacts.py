"""The models a run reads or writes: a stage's Orbax checkpoint, a workdir, or a Hugging Face directory.

load(source, kind, mesh): pi_ref (kind 'lm') or a reward model (kind 'reward') from
  - a workdir (its sft/ or reward/ stage), a stage directory, or that stage's checkpoints directory (the
    latest step; only the params are read, never the optimizer state), or
  - a Hugging Face directory (config.json + *.safetensors; hf.import_params).
load_run_model(workdir, which, mesh): any model of a run, including the trained policy and its anchor
  (the latest checkpoint of the distillation stage).
Params come back placed on the mesh by their logical axis names (models/params.py, sharding.py).
"""

from __future__ import annotations

import os
from typing import Any

import jax
from jax.sharding import Mesh

from bond_jax import checkpoint, hf, workdir as workdir_lib
from bond_jax.models import lora as lora_lib
from bond_jax.models import params as params_lib
from bond_jax.models.config import ModelConfig

WHICH = ("policy", "anchor", "reference", "reward")  # export's choices
_BOND_STAGE = "bond"


def is_hf_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, "config.json")) and any(
      name.endswith(".safetensors") for name in os.listdir(path))


def stage_checkpoints(source: str, kind: str) -> str | None:
  """The Orbax directory of `kind` under `source`: a workdir, a stage dir, or a checkpoints dir."""
  for candidate in (workdir_lib.checkpoint_dir(source,
                                               workdir_lib.KINDS[kind]), os.path.join(source,
                                                                                      "checkpoints"), source):
    if os.path.isdir(candidate) and any(name.isdigit() for name in os.listdir(candidate)):
      return candidate
  return None


def _restore_params(directory: str, item: str, kind: str, mesh: Mesh) -> tuple[Any, ModelConfig]:
  """state[item] ('params' or 'anchor_params') of the latest checkpoint of `directory`, checked to hold
  params of `kind`."""
  meta, step = checkpoint.read_meta(directory)
  if meta.get("kind") != kind:
    raise ValueError(f"checkpoint {directory} step {step} is of kind {meta.get('kind')!r}; wanted {kind!r}")
  cfg = ModelConfig.from_dict(meta["model"])
  if meta.get("base") is not None:  # LoRA: the model is the base with these adapters, merged
    adapters, base, lora = load_adapters(directory, step, item, meta, mesh)
    return merged(base, adapters, lora), cfg
  target = params_lib.placement(cfg, kind, mesh)
  return checkpoint.restore_item(directory, step, item, target), cfg


def load_adapters(directory: str, step: int, item: str, meta: dict[str, Any],
                  mesh: Mesh) -> tuple[Any, Any, lora_lib.LoraConfig]:
  """(adapters, base, LoraConfig) of a LoRA checkpoint: state[item] and the base its metadata names, which
  must still hold the content it was trained on (one-line ValueError otherwise), stored as the run did."""
  cfg, identity = ModelConfig.from_dict(meta["model"]), meta["base"]
  lora = lora_lib.LoraConfig.from_dict(identity["lora"])
  adapters = checkpoint.restore_item(directory, step, item, params_lib.adapter_placement(cfg, lora, mesh))
  base, _ = load(identity["path"], "lm", mesh)
  digest = checkpoint.tree_digest(base)
  if digest != identity["hash"]:
    raise ValueError(
        f"checkpoint {directory}/{step} holds adapters for the base {identity['path']} with hash "
        f"{identity['hash']}, but that path now holds another model (hash {digest})")
  if lora.base_dtype:
    base = jax.tree.map(lambda x: x.astype(lora.base_dtype), base)
  return adapters, base, lora


def merged(base: Any, adapters: Any, lora: lora_lib.LoraConfig) -> Any:
  """base + adapters as one params tree (lora.merge, jitted as the sampler runs it)."""
  return jax.jit(lambda b, a: lora_lib.merge(lora_lib.attach(b, a, lora)))(base, adapters)


def load(source: str, kind: str, mesh: Mesh) -> tuple[Any, ModelConfig]:
  """(params on `mesh`, ModelConfig) of an SFT policy (kind 'lm') or a reward model (kind 'reward')."""
  if kind not in workdir_lib.KINDS:
    raise ValueError(f"kind={kind!r}; allowed: {', '.join(workdir_lib.KINDS)}")
  if not os.path.isdir(source):
    raise ValueError(f"{source!r} is not a directory; expected a workdir, a stage checkpoint directory "
                     "or a Hugging Face model directory")
  if is_hf_dir(source):
    return hf.import_params(source, mesh=mesh, kind=kind)
  directory = stage_checkpoints(source, kind)
  if directory is None:
    raise ValueError(f"{source!r} holds no {workdir_lib.KINDS[kind]!r} checkpoint and no Hugging Face model "
                     f"(looked for {workdir_lib.checkpoint_dir(source, workdir_lib.KINDS[kind])})")
  return _restore_params(directory, "params", kind, mesh)


def load_run_model(workdir: str, which: str, mesh: Mesh) -> tuple[Any, ModelConfig]:
  """(params on `mesh`, ModelConfig) of a run's policy or anchor (latest distillation checkpoint),
  reference (SFT stage) or reward model."""
  if which not in WHICH:
    raise ValueError(f"which={which!r}; allowed: {', '.join(WHICH)}")
  if which in ("reference", "reward"):
    return load(workdir, "lm" if which == "reference" else "reward", mesh)
  directory = workdir_lib.checkpoint_dir(workdir, _BOND_STAGE)
  if not os.path.isdir(directory):
    raise ValueError(f"{workdir!r} has no distillation checkpoint ({directory} is missing); train first or "
                     "export --which=reference")
  return _restore_params(directory, "params" if which == "policy" else "anchor_params", "lm", mesh)
