"""LoRA: low-rank adapters on chosen projections of a frozen base, written once for every family.

Shapes: D d_model, H heads, K kv heads, Dh head_dim, M mlp_dim, r rank, L layers (scanned models only).

A projection W (our layout: input dims first, then output dims; e.g. q [D, H, Dh], o [H, Dh, D]) gets
    W x  ->  W x + (alpha / r) * B (A x),    A: [inputs..., r] (random),  B: [r, outputs...] (zeros)
so freshly initialised adapters leave the base's function exactly as it was (B = 0 adds exact zeros).

Trees. `init` makes the ADAPTERS tree, shaped like the base tree but holding {'a', 'b'} per adapted
projection ({'layer_3': {'attn': {'q': {'a', 'b'}}}}, or stacked [L, ...] under 'layers/block' when the
model scans its layers). `attach(base, adapters, lora)` gives a params tree the model code reads as it is:
the base's own arrays (not copied) plus leaves '<name>_lora_a' and '<name>_lora_b' (B times the scale)
beside each adapted weight. transformer.py's forward adds the low-rank product wherever those leaves are
present (`low_rank`); the fused decode step (decode.py) either merges them into its per-call weights once
(`merge`, the default: BENCHMARKS.md, "LoRA in the sampler") or applies the product every step. A tree
without adapter leaves (pi_ref: the base alone) runs the base's graph unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from bond_jax.models.config import ModelConfig

# projection -> (its module in a layer, how many leading dims of its weight are inputs)
TARGETS = {
    "q": ("attn", 1),
    "k": ("attn", 1),
    "v": ("attn", 1),
    "o": ("attn", 2),
    "gate": ("mlp", 1),
    "up": ("mlp", 1),
    "down": ("mlp", 1)
}
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r >= 1; alpha: the product is scaled by alpha / r (alpha / sqrt(r) with rslora, PEFT's
  use_rslora); targets: projections among TARGETS; layers: the layer indices adapted (() = all).
  base_dtype: the frozen base's storage dtype ('' = as loaded, or 'bfloat16' / 'float32').
  decode: 'merge' (adapters merged into the sampler's weights once per sampling call) or 'low_rank'
  (the product applied at every decode step)."""
  rank: int = 16
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
  layers: tuple[int, ...] = ()
  rslora: bool = False
  base_dtype: str = ""
  decode: str = "merge"

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def validate(self, cfg: ModelConfig, prefix: str = "lora") -> None:
    """One-line ValueErrors naming the config key `prefix.<field>`."""
    if int(self.rank) != self.rank or self.rank < 1:
      raise ValueError(f"{prefix}.rank={self.rank} must be an integer >= 1")
    if not self.alpha > 0:
      raise ValueError(f"{prefix}.alpha={self.alpha} must be > 0")
    bad = [t for t in self.targets if t not in TARGETS]
    if bad or not self.targets or len(set(self.targets)) != len(self.targets):
      raise ValueError(f"{prefix}.targets={tuple(self.targets)}: need distinct names among "
                       f"{', '.join(TARGETS)}")
    bad_layers = [i for i in self.layers if not 0 <= int(i) < cfg.num_layers]
    if bad_layers:
      raise ValueError(f"{prefix}.layers={tuple(self.layers)}: layer {bad_layers[0]} is not in 0.."
                       f"{cfg.num_layers - 1}")
    if self.layers and cfg.scan_layers and sorted(set(self.layers)) != list(range(cfg.num_layers)):
      raise ValueError(f"{prefix}.layers={tuple(self.layers)}: a model with scan_layers=True adapts every "
                       "layer or none (set lora.layers=() or model.overrides.scan_layers=False)")
    if self.base_dtype not in ("", "float32", "bfloat16"):
      raise ValueError(f"{prefix}.base_dtype={self.base_dtype!r}; allowed: '', float32, bfloat16")
    if self.decode not in ("merge", "low_rank"):
      raise ValueError(f"{prefix}.decode={self.decode!r}; allowed: merge, low_rank")

  def adapted_layers(self, cfg: ModelConfig) -> tuple[int, ...]:
    return tuple(sorted(set(self.layers))) if self.layers else tuple(range(cfg.num_layers))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "LoraConfig":
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _layer_groups(cfg: ModelConfig, lora: LoraConfig) -> list[tuple[tuple[str, ...], bool]]:
  """(path of a layer's params in the model tree, stacked [L, ...]) for each adapted layer."""
  if cfg.scan_layers:
    return [(("layers", "block"), True)]
  return [((f"layer_{i}",), False) for i in lora.adapted_layers(cfg)]


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _per_target(cfg: ModelConfig, lora: LoraConfig, base_tree: Any, pair: Callable[[Any, int, int],
                                                                                   dict[str, Any]]) -> Any:
  """The adapters tree built from a base tree (of shapes, arrays or logical axes): for each adapted weight,
  pair(its base entry, lead, n_in) -> {'a': ..., 'b': ...}; lead = 1 for scanned layers, n_in = the
  weight's number of input dimensions."""
  out: dict[str, Any] = {}
  for path, stacked in _layer_groups(cfg, lora):
    layer = _get(base_tree, path)
    node = out
    for key in path:
      node = node.setdefault(key, {})
    for name in lora.targets:
      group, n_in = TARGETS[name]
      node.setdefault(group, {})[name] = pair(layer[group][name], 1 if stacked else 0, n_in)
  return out


def adapter_shapes(cfg: ModelConfig, lora: LoraConfig, base_shapes: Any) -> Any:
  """The adapters tree of jax.ShapeDtypeStruct (float32) for a base tree (of shapes or arrays)."""

  def pair(weight, lead, n_in):
    shape = tuple(weight.shape)
    inputs, outputs = shape[lead:lead + n_in], shape[lead + n_in:]
    return {
        "a": jax.ShapeDtypeStruct(shape[:lead] + inputs + (lora.rank,), jnp.float32),
        "b": jax.ShapeDtypeStruct(shape[:lead] + (lora.rank,) + outputs, jnp.float32)
    }

  return _per_target(cfg, lora, base_shapes, pair)


def logical_axes(cfg: ModelConfig, lora: LoraConfig, base_axes: Any) -> Any:
  """The adapters' logical axes from the base's: A keeps its weight's input axes (the rank replicated),
  B its output axes, so an adapter lives where its weight's shards do."""

  def pair(names, lead, n_in):
    names = tuple(names)
    return {"a": names[:lead + n_in] + (None,), "b": names[:lead] + (None,) + names[lead + n_in:]}

  return _per_target(cfg, lora, base_axes, pair)


def init(cfg: ModelConfig, lora: LoraConfig, base_shapes: Any, rng: jax.Array) -> Any:
  """Fresh adapters: A ~ normal(0, 1 / fan_in) (fan_in: the weight's input size), B = 0."""
  shapes = adapter_shapes(cfg, lora, base_shapes)
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(rng, len(leaves))
  out = []
  for (path, s), key in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], keys):
    if path[-1].key == "b":
      out.append(jnp.zeros(s.shape, s.dtype))
    else:
      fan_in = math.prod(s.shape[-1 - TARGETS[path[-2].key][1]:-1])
      out.append(jax.random.normal(key, s.shape, s.dtype) * fan_in**-0.5)
  return jax.tree.unflatten(treedef, out)


def attach(base: Any, adapters: Any, lora: LoraConfig) -> Any:
  """The params tree of base + adapters (see the module docstring): dicts along the adapted paths are new,
  every base array is the base's own. B carries the scale (inside a differentiated function, its gradient
  flows back to the adapters' B)."""

  def merge_node(base_node, adapter_node):
    if not isinstance(base_node, dict):
      return base_node
    out = dict(base_node)
    for key, sub in adapter_node.items():
      if isinstance(sub, dict) and set(sub) == {"a", "b"}:
        out[key + SUFFIX_A] = sub["a"]
        out[key + SUFFIX_B] = sub["b"] * jnp.asarray(lora.scale, sub["b"].dtype)
      else:
        out[key] = merge_node(base_node[key], sub)
    return out

  return merge_node(base, adapters)


def has_adapters(params: Any) -> bool:
  """Whether a params tree carries attached adapter leaves."""
  if not isinstance(params, dict):
    return False
  return any(k.endswith(SUFFIX_A) or has_adapters(v) for k, v in params.items())


def layout(params: Any) -> tuple[tuple[tuple[str, ...], int], ...]:
  """A hashable description of a params tree's adapter leaves: (path of A, rank) for each (() for none)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return tuple(
      (tuple(p.key for p in path), int(x.shape[-1])) for path, x in flat if path[-1].key.endswith(SUFFIX_A))


def attached_axes(base_axes: Any, adapter_layout: tuple[tuple[tuple[str, ...], int], ...]) -> Any:
  """Logical axes of an attached params tree, from the base's axes and its `layout`."""
  out = jax.tree.map(lambda x: x, base_axes, is_leaf=lambda x: isinstance(x, tuple) or x is None)
  for path, _ in adapter_layout:
    parent = _get(out, path[:-1])
    name = path[-1][:-len(SUFFIX_A)]
    n_in = TARGETS[name][1]
    lead = 1 if "layers" in path else 0  # scanned: a leading [L] axis
    names = tuple(parent[name])
    parent[name + SUFFIX_A] = names[:lead + n_in] + (None,)
    parent[name + SUFFIX_B] = names[:lead] + (None,) + names[lead + n_in:]
  return out


def low_rank(x: jax.Array, a: jax.Array, b: jax.Array, n_in: int, dtype) -> jax.Array:
  """B (A x) of activations x [..., inputs...] (n_in input dims) in `dtype`, accumulated in float32:
  [..., outputs...]."""
  f32 = jnp.float32
  xa = jax.lax.dot_general(x, a.astype(dtype),
                           (((tuple(range(x.ndim - n_in, x.ndim))), tuple(range(n_in))), ((), ())),
                           preferred_element_type=f32).astype(dtype)
  return jax.lax.dot_general(xa, b.astype(dtype), (((xa.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=f32).astype(dtype)


def delta(a: jax.Array, b: jax.Array, stacked: bool) -> jax.Array:
  """The float32 weight update A B [(L,) inputs..., outputs...] of one adapter (B already scaled)."""
  if stacked:
    return jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1, precision="highest"))(a.astype(jnp.float32),
                                                                                   b.astype(jnp.float32))
  return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1, precision="highest")


def merge(params: Any) -> Any:
  """An attached tree with every adapter folded into its weight: W + A B, added in float32 and stored in
  the dtype W and the adapters promote to. The sampler's weights (lora.decode 'merge') and the merged
  export are this function's output, so the exported model is the function the sampler ran."""
  if not isinstance(params, dict):
    return params
  out = {}
  for key, value in params.items():
    if key.endswith(SUFFIX_A) or key.endswith(SUFFIX_B):
      continue
    if key + SUFFIX_A in params:
      a, b = params[key + SUFFIX_A], params[key + SUFFIX_B]
      dtype = jnp.promote_types(value.dtype, a.dtype)
      out[key] = (value.astype(jnp.float32) + delta(a, b, a.ndim > TARGETS[key][1] + 1)).astype(dtype)
    else:
      out[key] = merge(value)
  return out


def fuse(parts: list[tuple[Any, Any, int]]) -> tuple[jax.Array, jax.Array] | None:
  """One adapter for fused weights (the decode step's qkv [D, (H + 2K) Dh] or gate_up [D, 2M]) from its
  parts' (A [..., D, r] or None, B [..., r, width] flattened or None, width): A side by side, B block
  diagonal, so that the fused product equals the parts' products side by side. None: no part adapted."""
  present = [(a, b) for a, b, _ in parts if a is not None]
  if not present:
    return None
  lead, dtype = present[0][1].shape[:-2], present[0][1].dtype
  total = sum(width for _, _, width in parts)
  a_cat = jnp.concatenate([a for a, _ in present], axis=-1)
  rows, offset = [], 0
  for a, b, width in parts:
    if a is not None:
      rank = b.shape[-2]
      rows.append(
          jnp.concatenate([
              jnp.zeros(lead + (rank, offset), dtype), b,
              jnp.zeros(lead + (rank, total - offset - width), dtype)
          ], axis=-1))
    offset += width
  return a_cat, jnp.concatenate(rows, axis=-2)


def from_section(section: Any) -> LoraConfig | None:
  """The LoraConfig of a run config's `lora` section, or None when it is absent or lora.rank is 0 (off)."""
  if section is None or not section.rank:
    return None
  return LoraConfig(rank=section.rank, alpha=float(section.alpha), targets=tuple(section.targets),
                    layers=tuple(int(i) for i in section.layers), rslora=bool(section.rslora),
                    base_dtype=section.base_dtype, decode=section.decode)
