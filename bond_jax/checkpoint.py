"""Orbax checkpoints of a run: the array state (any pytree of jax arrays) plus JSON metadata.

Layout: <workdir>/checkpoints/<step>/{state, meta}. Orbax writes each step under a temporary name and
renames it when complete, so a crash mid-save never leaves a checkpoint that restore would pick up.
Typed PRNG keys are stored as their raw uint32 data (key_data) and rebuilt on restore.

Integrity. Orbax 0.12.8 has no verification to use: no option of its manager or handlers checks array
data, its default zarr2 chunks are zstd-compressed with nothing TensorStore checks on read, and zarr3
puts a crc32c on the shard index only, so bytes overwritten inside a data file restore as garbage. So
save stores a checksum of every array in the meta item (meta[CHECKSUMS]: an algorithm name and one 64-bit
digest per leaf, named by its tree path) and every restore recomputes and compares them. The digest is
computed on the device, one small jitted reduction per array: two 32-bit lanes over the array's bits
taken as uint32 words w[i] at flat index i, sum((2i + 1) * w[i]) and sum(fmix32(w[i] ^ fmix32(i +
golden))), mod 2**32. Integer sums are exact, so the digest does not depend on how the array is sharded,
on the number of processes or on the mesh it is restored onto; a sha256 of the bytes would need every
array gathered onto one host at every save, and per-shard checksums would not survive a restore onto
another mesh. Only 12 bytes per array reach the host; the first save compiles one small program per
distinct array layout. Any change of one word is always detected (2i + 1 is odd, so invertible mod
2**32); random damage to several words goes unnoticed with a probability of roughly 2**-64. It guards
against damage, not tampering. Checkpoints written before checksums existed restore unverified.

Restore. restore_latest_good (the training loop's entry point) tries the newest step first. A step that
is damaged or unreadable (missing state dir or _METADATA, missing manifest, truncated or overwritten
data, any other Orbax or TensorStore read error, checksum mismatch) is reported in one absl WARNING line
naming the step, the directory and what failed, renamed to <step>.corrupt (never deleted; Orbax ignores
the name, so it neither restores it nor counts it in max_to_keep), the manager is reloaded, and the next
newest step is tried. None when no usable checkpoint is left (the loop starts fresh); the last line then
says that every one was damaged. Not damage, so nothing is moved: a readable checkpoint whose tree,
shapes or dtypes are not the target's (the run's config changed: ValueError) and an out-of-memory error.
With several processes they agree on every verdict, and process 0 renames.

Rotation (max_to_keep) deletes the oldest steps only when a new one is saved, so a good checkpoint must
never be rotated out by a state that holds nothing new: save(..., all_skipped=True), for a loop whose
every step since its last save was skipped (non-finite loss or gradient), writes nothing, not even with
force (a resumed run redoes those steps from the last checkpoint), and save refuses a state with
non-finite values (FloatingPointError) rather than writing it over the rotation.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging as std_logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

CHECKSUMS = "checksums"  # the meta key save reserves
_ALGORITHM = "bond_jax.wsum-fmix32x2"
_CORRUPT_SUFFIX = ".corrupt"
_FMIX_1, _FMIX_2, _GOLDEN = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9


class CorruptCheckpointError(ValueError):
  """A checkpoint step whose files cannot be read or whose arrays do not match their checksums."""

  def __init__(self, step: int, directory: Any, reason: str):
    super().__init__(f"checkpoint step {step} in {directory} is unusable: {reason}")
    self.step, self.directory, self.reason = step, directory, reason


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


# --------------------------------------------------------------------------------------------------------
# Checksums.


def _path_name(path) -> str:
  """'params/layer_0/q': the same name for a dict, a dataclass or a list (Orbax's metadata has dicts)."""
  parts = []
  for entry in path:
    attr = next((a for a in ("key", "name", "idx") if hasattr(entry, a)), None)
    parts.append(str(getattr(entry, attr)) if attr else str(entry))
  return "/".join(parts)


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
  return [(_path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _fmix32(h: jax.Array) -> jax.Array:
  """murmur3's finaliser: each input bit flips about half of the output bits."""
  h = (h ^ (h >> 16)) * jnp.uint32(_FMIX_1)
  h = (h ^ (h >> 13)) * jnp.uint32(_FMIX_2)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of x as uint32 words: one per element, two per element of a 64-bit dtype."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = 8 * x.dtype.itemsize
  if bits > 32:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


def _scan_leaf(x: jax.Array) -> jax.Array:
  """uint32[3]: the two digest lanes of x and whether x is finite (see the module docstring)."""
  x = jnp.asarray(x)
  words = _words(x)
  # The flat index from per-axis iotas rather than a reshape, which could move a sharded array's data.
  index, stride = jnp.zeros(words.shape, jnp.uint32), 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= words.shape[axis]
  lane_a = jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)
  lane_b = jnp.sum(_fmix32(words ^ _fmix32(index + jnp.uint32(_GOLDEN))), dtype=jnp.uint32)
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
  return jnp.stack([lane_a, lane_b, finite.astype(jnp.uint32)])


@functools.lru_cache(maxsize=None)
def _scan_fn(out_sharding: jax.sharding.Sharding | None):
  # Replicated on the array's mesh, so that every process holds the result (multi-process).
  return jax.jit(_scan_leaf) if out_sharding is None else jax.jit(_scan_leaf, out_shardings=out_sharding)


def _scan(tree: Any) -> dict[str, tuple[str, bool]]:
  """{leaf name: (hex digest, finite)}. Collective: every process must call it on the same tree."""
  result = {}
  jax.block_until_ready(tree)  # nor while the (collective) step that computed the state still runs
  for name, x in _named_leaves(tree):
    sharding = getattr(x, "sharding", None)
    replicated = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()) if isinstance(
        sharding, jax.sharding.NamedSharding) else None)
    # One leaf at a time, each fetched before the next is dispatched: many collective programs in flight
    # at once deadlock XLA's CPU backend, and one program over the whole tree compiles for seconds.
    a, b, finite = (int(v) for v in np.asarray(_scan_fn(replicated)(x).addressable_data(0)))
    result[name] = (f"{a:08x}{b:08x}", bool(finite))
  return result


def _verify(data: Any, meta: dict[str, Any], step: int, directory: Any, prefix: str = "") -> None:
  """Raise CorruptCheckpointError unless the leaves of `data` (the subtree state[prefix] when given) match
  meta's digests."""
  saved = meta.get(CHECKSUMS)
  if saved is None:
    return  # written before checksums existed
  if not isinstance(saved, dict) or saved.get("algorithm") != _ALGORITHM:
    raise CorruptCheckpointError(step, directory, f"unknown checksum algorithm in meta[{CHECKSUMS!r}]")
  expected = saved.get("leaves")
  if not isinstance(expected, dict):
    raise CorruptCheckpointError(step, directory, f"malformed meta[{CHECKSUMS!r}]")
  got = {"/".join(filter(None, (prefix, name))): digest for name, (digest, _) in _scan(data).items()}
  wanted = {n for n in expected if not prefix or n == prefix or n.startswith(prefix + "/")}
  bad = sorted(n for n in wanted | set(got) if expected.get(n) != got.get(n))
  if bad:
    shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    raise CorruptCheckpointError(step, directory,
                                 f"checksum mismatch in {len(bad)} of {len(wanted)} arrays ({shown})")


def _public(meta: dict[str, Any]) -> dict[str, Any]:
  """The meta as the caller saved it."""
  return {k: v for k, v in meta.items() if k != CHECKSUMS}


# --------------------------------------------------------------------------------------------------------
# Save and restore.


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any], *, force: bool = False,
         all_skipped: bool = False) -> bool:
  """Save (asynchronously when the manager is async). Returns whether a save was started.

  force: save even if the step is off the save interval (preemption, end of run).
  all_skipped: every step since the previous save was skipped (non-finite loss or gradient): the state
    holds no new update, so nothing is written, even with force, and rotation keeps the older steps.
  Raises FloatingPointError, writing nothing, when a floating-point array of the state is not finite.
  """
  if all_skipped:
    logging.info("checkpoint step %d not saved: every step since the last checkpoint was skipped", step)
    return False
  if CHECKSUMS in meta:
    raise ValueError(f"meta key {CHECKSUMS!r} is reserved for the checkpoint's array checksums")
  if not force and not mngr.should_save(step):
    return False  # before computing checksums, which would be wasted
  data = _keys_to_data(state)
  scanned = _scan(data)
  non_finite = [name for name, (_, finite) in scanned.items() if not finite]
  if non_finite:
    raise FloatingPointError(f"state at step {step} has non-finite values in {', '.join(non_finite[:3])}"
                             f"{', ...' if len(non_finite) > 3 else ''}; not saved, so rotation keeps the "
                             f"older checkpoints of {mngr.directory}")
  checksums = {"algorithm": _ALGORITHM, "leaves": {name: digest for name, (digest, _) in scanned.items()}}
  args = ocp.args.Composite(state=ocp.args.StandardSave(data),
                            meta=ocp.args.JsonSave(dict(meta, **{CHECKSUMS: checksums})))
  return mngr.save(step, args=args, force=force)


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a live state: the restore target of the same layout."""

  def spec(x):
    if _is_key(x):
      x = jax.random.key_data(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

  return jax.tree.map(spec, state)


def _one_line(error: BaseException) -> str:
  """The root cause of an Orbax / TensorStore error in one line, without TensorStore's spec dump."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = " ".join(str(error).split()) or type(error).__name__
  text = re.split(r" \[tensorstore_spec| See full TensorStore details", text)[0]
  return text if len(text) <= 300 else text[:297] + "..."


def _drop_abandoned_read_errors(previous: Callable[[Any], None], unraisable: Any) -> None:
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
    return  # an abandoned Orbax read, finalised
  if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
    return  # a TensorStore read finishing after Orbax closed the event loop that awaited it
  previous(unraisable)


def _orbax_read(step: int, directory: Any, what: str, read: Callable[[], Any]) -> Any:
  """read(), or CorruptCheckpointError naming `what` failed and why, in one line: any error reading a
  checkpoint's own files is damage, except a full device (MemoryError, RESOURCE_EXHAUSTED)."""
  # A failed Orbax restore abandons its other reads, and Python prints a traceback (with a TensorStore
  # spec dump) for each: Orbax's array read turns its coroutine's GeneratorExit into an Exception, and
  # TensorStore reads completing later call back into the closed event loop. Those are let finish and
  # collected here, with Python's report of them silenced.
  # Orbax's worker threads also log the failure they hand back (absl ERROR with a traceback, seen under
  # load), and an abandoned read task that is garbage-collected later is logged by asyncio ("Task exception
  # was never retrieved", with its traceback) at any time afterwards: the caller reports the failure in one
  # line instead, so those records are dropped while the read runs and, after a failed read, for the rest
  # of the process (only records whose traceback runs through Orbax's reads: _DropOrbaxReadErrors).
  previous = sys.unraisablehook
  sys.unraisablehook = functools.partial(_drop_abandoned_read_errors, previous)
  during_read = _DropOrbaxErrors()
  std_logging.getLogger("absl").addFilter(during_read)
  try:
    try:
      return read()
    except Exception as e:
      if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
        raise
      reason = f"{what}: {_one_line(e)}"
    for name in ("absl", "asyncio"):
      std_logging.getLogger(name).addFilter(_ORBAX_READ_ERRORS)  # idempotent: a filter is added once
    _let_abandoned_reads_finish()
  finally:
    sys.unraisablehook = previous
    std_logging.getLogger("absl").removeFilter(during_read)
  raise CorruptCheckpointError(step, directory, reason)


class _DropOrbaxErrors(std_logging.Filter):
  """Drops ERROR records logged from Orbax's own files (the failure a restore already raised)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.levelno >= std_logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


class _DropOrbaxReadErrors(std_logging.Filter):
  """Drops ERROR records whose exception (or one it was raised from) passed through an Orbax function
  that reads or deserializes: late reports of a failed read, which _orbax_read already turned into one
  line. Other Orbax errors (a failed save) still print."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.ERROR or not record.exc_info or record.exc_info[1] is None:
      return True
    error, seen = record.exc_info[1], set()
    while error is not None and id(error) not in seen:
      seen.add(id(error))
      tb = error.__traceback__
      while tb is not None:
        code = tb.tb_frame.f_code
        if f"{os.sep}orbax{os.sep}" in code.co_filename and any(
            word in code.co_name for word in ("read", "deserialize", "restore")):
          return False
        tb = tb.tb_next
      error = error.__cause__ or error.__context__
    return True


_ORBAX_READ_ERRORS = _DropOrbaxReadErrors()


def _let_abandoned_reads_finish(timeout_s: float = 5.0) -> None:
  """After a failed restore, wait (only then) until Orbax's worker threads are gone, up to timeout_s, and
  collect the abandoned reads: they usually finish within milliseconds, longer on a loaded machine."""
  deadline = time.monotonic() + timeout_s
  time.sleep(0.05)
  while time.monotonic() < deadline and any(
      type(t).__name__ == "_SignalingThread" and t.is_alive() for t in threading.enumerate()):
    time.sleep(0.05)
  gc.collect()  # the error is gone, so nothing keeps them alive


def _check_layout(directory: Any, step: int, abstract: Any) -> None:
  """Read the step's array metadata (every array's, so a lost manifest shows here) and compare it with
  the target's: CorruptCheckpointError when unreadable, ValueError when the layout differs."""
  state_dir = epath.Path(directory) / str(step) / "state"
  if not state_dir.is_dir():
    raise CorruptCheckpointError(step, directory, f"no state directory {state_dir}")
  saved = _orbax_read(step, directory, "unreadable array metadata",
                      lambda: ocp.StandardCheckpointHandler().metadata(state_dir))
  have = {n: (tuple(m.shape), np.dtype(m.dtype)) for n, m in _named_leaves(saved)}
  want = {n: (tuple(m.shape), np.dtype(m.dtype)) for n, m in _named_leaves(abstract)}
  if have != want:
    diff = sorted(n for n in have.keys() | want.keys() if have.get(n) != want.get(n))
    raise ValueError(f"checkpoint step {step} in {directory} holds another state layout than this run "
                     f"({len(diff)} arrays differ: {', '.join(diff[:3])}); is this the config it was "
                     "saved with?")


def _read(mngr: ocp.CheckpointManager, abstract: Any, step: int) -> tuple[Any, dict[str, Any]]:
  """This process's part of one step: (state with PRNG keys as data, meta with checksums), unverified."""
  _check_layout(mngr.directory, step, abstract)
  args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
  restored = _orbax_read(step, mngr.directory, "restore failed", lambda: mngr.restore(step, args=args))
  return restored["state"], dict(restored["meta"])


def restore(mngr: ocp.CheckpointManager, target: Any, step: int | None = None) -> tuple[Any, dict, int]:
  """Restore onto the shardings of `target` (a live state of the wanted layout, e.g. freshly initialised
  on the current mesh). Returns (state, meta, step); step defaults to the latest.

  Raises CorruptCheckpointError for a damaged step (restore_latest_good falls back instead), ValueError
  when there is none or its layout is not the target's.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"no checkpoint to restore in {mngr.directory}")
  data, meta = _read(mngr, abstract_like(target), step)
  _verify(data, meta, step, mngr.directory)
  return _data_to_keys(data, target), _public(meta), step


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process, so that they all take the same branch of the fallback."""
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> epath.Path:
  """Rename step's directory to <step>.corrupt (or .corrupt.<n>) and reload the manager's step list."""
  source = epath.Path(mngr.directory) / str(step)
  target, n = source.parent / f"{step}{_CORRUPT_SUFFIX}", 1
  while target.exists():
    target, n = source.parent / f"{step}{_CORRUPT_SUFFIX}.{n}", n + 1
  if jax.process_count() > 1:  # every process has chosen the name before process 0 takes it
    multihost_utils.sync_global_devices(f"bond_jax.checkpoint: set aside {step}")
  if jax.process_index() == 0:
    source.rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"bond_jax.checkpoint: set aside {step} done")
  mngr.reload()  # the manager caches its steps: latest_step() and rotation must no longer see this one
  return target


def restore_latest_good(mngr: ocp.CheckpointManager, target: Any) -> tuple[Any, dict[str, Any], int] | None:
  """(state, meta, step) of the newest usable checkpoint, restored onto the shardings of `target`; None
  when there is none (start fresh). Damaged steps are reported, set aside and skipped (module docstring).

  Raises ValueError when a readable checkpoint's layout is not the target's. Every process must call it.
  """
  mngr.reload()
  abstract = abstract_like(target)
  steps = sorted(mngr.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    reason = None
    try:
      data, meta = _read(mngr, abstract, step)
    except CorruptCheckpointError as e:
      reason = e.reason
    if not _everywhere(reason is None):
      reason = reason or "unreadable on another process"
    if reason is None:
      try:
        _verify(data, meta, step, mngr.directory)  # collective: only once every process has read it
        return _data_to_keys(data, target), _public(meta), step
      except CorruptCheckpointError as e:
        reason = e.reason
    moved = _set_aside(mngr, step)
    then = (f"trying step {steps[i + 1]}" if i + 1 < len(steps) else
            f"no checkpoint left: all {len(steps)} in this directory were damaged, starting fresh")
    logging.warning("checkpoint step %d in %s is damaged (%s); moved it to %s; %s", step, mngr.directory,
                    reason, moved.name, then)
  return None


def _read_only_manager(directory: str, **kwargs) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False), **kwargs)


def _raw_meta(directory: str, step: int | None) -> tuple[dict[str, Any], int]:
  mngr = _read_only_manager(directory, item_names=("state", "meta"))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"no checkpoint in {directory!r}")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  mngr.close()
  return dict(meta), step


def read_meta(directory: str, step: int | None = None) -> tuple[dict[str, Any], int]:
  """The JSON metadata of a checkpoint directory without reading any arrays: (meta, step)."""
  meta, step = _raw_meta(directory, step)
  return _public(meta), step


def restore_arrays(directory: str, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
  """Restore the state as host numpy arrays with no target (export, inspection): (state, meta, step).

  Works whatever mesh or number of processes saved it: every array is read whole onto one local device.
  Checksums are verified (CorruptCheckpointError).
  """
  # The handlers must be named: with item_names alone item_metadata is None and Orbax would restore onto
  # the saved shardings, which fails for a checkpoint written on another topology (e.g. 2 processes).
  handlers = dict(state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
  mngr = _read_only_manager(directory, item_handlers=handlers)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"no checkpoint in {directory!r}")
  metadata = mngr.item_metadata(step)["state"]
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices(
      )[0])), metadata)
  restored = mngr.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  mngr.close()
  meta = dict(restored["meta"])
  _verify(restored["state"], meta, step, mngr.directory)
  return restored["state"], _public(meta), step


def restore_item(directory: str, step: int, key: str, target: Any) -> Any:
  """Only state[key] of checkpoint `step` (e.g. 'params' without the optimizer state), read straight onto
  the shardings of `target` (a tree of jax.ShapeDtypeStruct with shardings). Checksums are verified."""
  wrapped = {key: target}
  args = ocp.args.PyTreeRestore(wrapped, restore_args=ocp.checkpoint_utils.construct_restore_args(wrapped),
                                partial_restore=True)
  path = os.path.join(os.path.abspath(directory), str(step), "state")
  item = ocp.PyTreeCheckpointer().restore(path, args=args)[key]
  _verify(item, _raw_meta(directory, step)[0], step, os.path.abspath(directory), prefix=key)
  return item


def tree_digest(tree: Any) -> str:
  """One hex digest of every array of a tree (names, dtypes, shapes and contents: the per-array checksums
  `save` stores, hashed together): the identity of a frozen base. Collective, like `save`."""
  scanned = _scan(tree)
  text = ";".join(f"{name}:{x.dtype}:{tuple(x.shape)}:{scanned[name][0]}" for name, x in _named_leaves(tree))
  return hashlib.sha256(text.encode()).hexdigest()[:32]
