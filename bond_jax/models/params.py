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
from bond_jax.models import reward, transformer
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
