"""The two kinds of parameter trees a run holds, and their logical axis names (for placement).

kind 'lm': a decoder LM (policy, anchor, reference; models/transformer.py).
kind 'reward': a reward model (backbone + scalar head; models/reward.py).
Placement on a mesh is sharding.py's (`sharding.tree_shardings(logical_axes(cfg, kind), mesh)`); this
module only says what each parameter is called.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax

from bond_jax import sharding
from bond_jax.models import lora, reward, transformer
from bond_jax.models.config import ModelConfig

KINDS = ("lm", "reward")


def init_boxed(cfg: ModelConfig, kind: str, rng: jax.Array) -> Any:
  """Fresh params of `kind` with their nn.LogicallyPartitioned boxes."""
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}; allowed: {', '.join(KINDS)}")
  return (transformer.init_boxed if kind == "lm" else reward.init_boxed)(cfg, rng)


@functools.lru_cache(maxsize=None)
def _abstract(cfg: ModelConfig, kind: str) -> Any:
  return jax.eval_shape(lambda r: init_boxed(cfg, kind, r), jax.random.key(0))


def logical_axes(cfg: ModelConfig, kind: str) -> Any:
  """The tree of logical-name tuples of a `kind` params tree of `cfg` (shapes only, nothing allocated)."""
  return sharding.logical_specs(_abstract(cfg, kind))


def shapes(cfg: ModelConfig, kind: str) -> Any:
  """The tree of jax.ShapeDtypeStruct of a `kind` params tree of `cfg`."""
  return nn.unbox(_abstract(cfg, kind))


def placement(cfg: ModelConfig, kind: str, mesh: jax.sharding.Mesh) -> Any:
  """ShapeDtypeStructs carrying each parameter's NamedSharding on `mesh`: a restore or jit target."""
  return sharding.abstract_on_mesh(shapes(cfg, kind), logical_axes(cfg, kind), mesh)


def init_sharded(cfg: ModelConfig, kind: str, rng: jax.Array, mesh: jax.sharding.Mesh) -> Any:
  """Fresh params initialised directly in their sharded layout."""
  return sharding.init_sharded(lambda r: init_boxed(cfg, kind, r), rng, mesh)[0]


def adapter_axes(cfg: ModelConfig, lora_cfg: lora.LoraConfig) -> Any:
  """The logical axes of LoRA adapters on an 'lm' params tree of `cfg` (models/lora.py)."""
  return lora.logical_axes(cfg, lora_cfg, logical_axes(cfg, "lm"))


def adapter_placement(cfg: ModelConfig, lora_cfg: lora.LoraConfig, mesh: jax.sharding.Mesh) -> Any:
  """ShapeDtypeStructs of the adapters with their NamedShardings on `mesh` (a restore target)."""
  return sharding.abstract_on_mesh(lora.adapter_shapes(cfg, lora_cfg, shapes(cfg, "lm")),
                                   adapter_axes(cfg, lora_cfg), mesh)


def init_adapters(cfg: ModelConfig, lora_cfg: lora.LoraConfig, rng: jax.Array,
                  mesh: jax.sharding.Mesh) -> Any:
  """Fresh adapters (B = 0: base + adapters is the base) made directly in their sharded layout."""
  target = adapter_placement(cfg, lora_cfg, mesh)
  return jax.jit(lambda r: lora.init(cfg, lora_cfg, shapes(cfg, "lm"), r),
                 out_shardings=jax.tree.map(lambda s: s.sharding, target))(rng)
