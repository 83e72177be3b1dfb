"""Device mesh and the ONE table that maps logical axis names to mesh axes.

Parameters carry logical names (models/transformer.py); activations are constrained with `constrain`.
Mesh axes: 'data' (pure data parallel), 'fsdp' (data parallel with parameters sharded over it),
'tensor' (heads / MLP / vocab split, Megatron style).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None = replicated). Parameters use the plain names; activations
# use 'act_*' names so that, e.g., a parameter's embed dim can be fsdp-sharded while the activations'
# embed dim stays whole (their batch dim already uses fsdp).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1 to take the devices left over.

  Args:
    shape: sizes per axis name, e.g. {'data': 1, 'fsdp': -1, 'tensor': 2}; missing axes are 1.
    devices: defaults to all devices of the JAX system (every process).
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axis {unknown[0]!r}; allowed: {', '.join(MESH_AXES)}")
  sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be >= 1 or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {len(devices)} devices: "
                       f"{len(devices)} is not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                     f"{len(devices)} are available; make the sizes multiply to {len(devices)} or use -1")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
  """PartitionSpec for a tuple of logical axis names, through LOGICAL_AXIS_RULES."""
  out = []
  for name in logical_axes:
    if name is not None and name not in _RULES:
      raise ValueError(f"logical axis {name!r} has no rule; known: {', '.join(_RULES)}")
    out.append(None if name is None else _RULES[name])
  return PartitionSpec(*out)


def _mesh_size(mesh: Any, axes) -> int:
  """The number of devices along mesh axes `axes` (a name, a tuple of names, or None); mesh: a Mesh, an
  AbstractMesh or an {axis: size} mapping (a plan for a mesh that is not here)."""
  if axes is None:
    return 1
  sizes = getattr(mesh, "shape", mesh)  # a Mesh, an AbstractMesh (inside jit) or a plain mapping
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(sizes[a] for a in axes)


def local_shape(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Any) -> tuple[int, ...]:
  """The per-device shape of an array of `shape` placed by its logical names (LOGICAL_AXIS_RULES)."""
  return tuple(
      dim // _mesh_size(mesh, _RULES[name] if name else None) for dim, name in zip(shape, logical_axes))


def logical_size(name: str, mesh: Any | None = None) -> int:
  """How many ways a dimension named `name` is split over mesh (default: the current jax.set_mesh one; 1
  outside any)."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  return 1 if getattr(mesh, "empty", False) else _mesh_size(mesh, _RULES[name])


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside a mesh (jax.set_mesh) context.

  Mesh axes that do not divide a dimension are dropped for that dimension (an activation, unlike a
  parameter, may be too small to split; e.g. a batch of 3 prompts on 8 devices).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, _fitted_spec(mesh, x.shape, logical_axes))


def _fitted_spec(mesh: Any, shape: Sequence[int], logical_axes: Sequence[str | None]) -> PartitionSpec:
  spec = logical_to_spec(logical_axes)
  return PartitionSpec(
      *[axes if dim % _mesh_size(mesh, axes) == 0 else None for dim, axes in zip(shape, spec)])


def fitted(mesh: Mesh, shape: Sequence[int], logical_axes: Sequence[str | None]) -> NamedSharding:
  """NamedSharding of an activation of `shape` by its logical names, dropping mesh axes that do not divide
  a dimension (as `constrain` does)."""
  return NamedSharding(mesh, _fitted_spec(mesh, shape, logical_axes))


def logical_specs(boxed_tree: Any) -> Any:
  """The tree of logical-name tuples of a pytree of nn.LogicallyPartitioned boxes (None elsewhere)."""
  return jax.tree.map(lambda leaf: tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else None,
                      boxed_tree, is_leaf=lambda leaf: isinstance(leaf, nn.LogicallyPartitioned))


def check_divisible(shapes: Any, logical: Any, mesh: Mesh) -> None:
  """Raise a one-line error naming the first parameter whose dimension its mesh axes do not divide."""
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  flat_names = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, tuple) or x is None)
  for (path, leaf), names in zip(flat_shapes, flat_names):
    if names is None:
      continue
    for dim, name in zip(leaf.shape, names):
      axes = _RULES.get(name) if name else None
      size = _mesh_size(mesh, axes)
      if dim % size:
        raise ValueError(f"parameter {jax.tree_util.keystr(path)} dimension {name}={dim} is not divisible "
                         f"by mesh axes {axes} of size {size}; change the mesh or the model shape")


def tree_shardings(logical: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of logical-name tuples (None leaves -> replicated)."""
  return jax.tree.map(lambda names: NamedSharding(mesh,
                                                  logical_to_spec(names) if names else PartitionSpec()),
                      logical, is_leaf=lambda x: isinstance(x, tuple) or x is None)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Arrays whose leading dim is the batch (rows): split over ('data', 'fsdp'), the rest whole."""
  return NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * (ndim - 1)))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Place host arrays [B, ...] on the mesh, batch over ('data', 'fsdp').

  Single process: device_put. Several processes: each passes its local rows and gets a global array.
  """

  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, tree)


def global_batch(tree: Any, mesh: Mesh) -> Any:
  """Place host arrays [B, ...] that are the SAME on every process (the whole global batch) on the mesh,
  batch over ('data', 'fsdp'): jax.device_put of a value identical on every process keeps, on each, the rows
  of its own devices (no cross-process transfer)."""
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x), batch_sharding(mesh, np.ndim(x))), tree)


def to_host(tree: Any) -> Any:
  """numpy copies of (possibly multi-process) jax arrays on every process.

  jax.device_get fails on an array sharded over other processes' devices; those are all-gathered.
  """

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def init_sharded(boxed_init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh) -> tuple[Any, Any]:
  """Initialise params directly in their sharded layout (no full copy on one device).

  Args:
    boxed_init_fn: rng -> params tree of nn.LogicallyPartitioned boxes (e.g. a module's init).
  Returns:
    (params as plain sharded arrays, tree of logical-name tuples).
  """
  abstract = jax.eval_shape(boxed_init_fn, rng)
  logical = logical_specs(abstract)
  check_divisible(nn.unbox(abstract), logical, mesh)
  shardings = tree_shardings(logical, mesh)
  params = jax.jit(lambda r: nn.unbox(boxed_init_fn(r)), out_shardings=shardings)(rng)
  return params, logical


def place(tree: Any, logical: Any, mesh: Mesh) -> Any:
  """Put host or device arrays onto the mesh by their logical names (after a divisibility check)."""
  check_divisible(tree, logical, mesh)
  return jax.device_put(tree, tree_shardings(logical, mesh))


def abstract_on_mesh(shapes: Any, logical: Any, mesh: Mesh) -> Any:
  """ShapeDtypeStructs of `shapes` carrying the NamedSharding their logical names give on `mesh` (after a
  divisibility check): the target to restore or import a params tree onto."""
  check_divisible(shapes, logical, mesh)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      tree_shardings(logical, mesh))


def on_mesh(tree: Any, mesh: Mesh) -> Any:
  """Arrays not yet spread over the whole mesh (e.g. optimizer counters made on one device) become
  replicated on it; arrays already on every device of the mesh are kept as they are."""

  def put(x):
    if isinstance(x, jax.Array) and len(x.sharding.device_set) == mesh.size:
      return x
    return jax.device_put(x, replicated(mesh))

  return jax.tree.map(put, tree)


def shardings_of(tree: Any) -> Any:
  """The sharding of every array of a tree (e.g. a live state: the in/out shardings of its jitted step)."""
  return jax.tree.map(lambda x: x.sharding, tree)
