"""Orbax checkpoints of a run: the array state (any pytree of jax arrays) plus JSON metadata.

Layout: <workdir>/checkpoints/<step>/{state, meta}. Orbax writes each step under a temporary name and
renames it when complete, so a crash mid-save never leaves a checkpoint that restore would pick up.
Typed PRNG keys are stored as their raw uint32 data (key_data) and rebuilt on restore.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(directory: str, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
            async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (created if absent) keeping the last `max_to_keep` steps."""
  if max_to_keep is not None and max_to_keep < 1:
    raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 (or None to keep every checkpoint)")
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                         enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "meta"))


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree: Any, like: Any) -> Any:
  return jax.tree.map(lambda x, ref: jax.random.wrap_key_data(x) if _is_key(ref) else x, tree, like)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any], *,
         force: bool = False) -> bool:
  """Save (asynchronously when the manager is async). Returns whether a save was started.

  force: save even if the step is off the save interval (preemption, end of run).
  """
  args = ocp.args.Composite(state=ocp.args.StandardSave(_keys_to_data(state)), meta=ocp.args.JsonSave(meta))
  return mngr.save(step, args=args, force=force)


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a live state: the restore target of the same layout."""
  def spec(x):
    if _is_key(x):
      x = jax.random.key_data(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(spec, state)


def restore(mngr: ocp.CheckpointManager, target: Any, step: int | None = None) -> tuple[Any, dict, int]:
  """Restore onto the shardings of `target` (a live state of the wanted layout, e.g. freshly initialised
  on the current mesh). Returns (state, meta, step); step defaults to the latest."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"no checkpoint to restore in {mngr.directory}")
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(target)),
                                                       meta=ocp.args.JsonRestore()))
  return _data_to_keys(restored["state"], target), dict(restored["meta"]), step


def read_meta(directory: str, step: int | None = None) -> tuple[dict[str, Any], int]:
  """The JSON metadata of a checkpoint directory without reading any arrays: (meta, step)."""
  mngr = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta"),
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"no checkpoint in {directory!r}")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  mngr.close()
  return dict(meta), step


def restore_arrays(directory: str, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
  """Restore the state as host numpy arrays with no target (export, inspection): (state, meta, step).

  Works whatever mesh or number of processes saved it: every array is read whole onto one local device.
  """
  # The handlers must be named: with item_names alone item_metadata is None and Orbax would restore onto
  # the saved shardings, which fails for a checkpoint written on another topology (e.g. 2 processes).
  handlers = dict(state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
  mngr = ocp.CheckpointManager(os.path.abspath(directory), item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"no checkpoint in {directory!r}")
  metadata = mngr.item_metadata(step)["state"]
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                       sharding=jax.sharding.SingleDeviceSharding(
                                                           jax.devices()[0])), metadata)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                       meta=ocp.args.JsonRestore()))
  mngr.close()
  return restored["state"], dict(restored["meta"]), step


def restore_item(directory: str, step: int, key: str, target: Any) -> Any:
  """Only state[key] of checkpoint `step` (e.g. 'params' without the optimizer state), read straight onto
  the shardings of `target` (a tree of jax.ShapeDtypeStruct with shardings)."""
  wrapped = {key: target}
  args = ocp.args.PyTreeRestore(wrapped, restore_args=ocp.checkpoint_utils.construct_restore_args(wrapped),
                                partial_restore=True)
  path = os.path.join(os.path.abspath(directory), str(step), "state")
  return ocp.PyTreeCheckpointer().restore(path, args=args)[key]
