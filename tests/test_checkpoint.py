"""Orbax checkpoints: restore onto another mesh, PRNG keys, metadata, retention, damage and fallback."""

import functools
import gc
import logging
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import checkpoint_damage as damage

from bond_jax import checkpoint, sharding, update
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                  mlp_dim=64)


def _state(mesh, seed):
  params, _ = sharding.init_sharded(lambda r: transformer.init_boxed(CFG, r), jax.random.key(seed), mesh)
  return {"params": params, "rng": jax.random.key(seed + 100), "step": jnp.int32(seed)}


def test_restore_onto_a_different_mesh_is_exact(tmp_path):
  saved = _state(sharding.make_mesh({"fsdp": 8}), seed=1)
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, 7, saved, {"note": "hello", "data_state": "{}"})
  mngr.wait_until_finished()
  target = _state(sharding.make_mesh({"data": 4, "tensor": 2}), seed=2)
  restored, meta, step = checkpoint.restore(mngr, target)
  assert step == 7 and meta["note"] == "hello"
  restored_q, target_q = (state["params"]["layer_0"]["attn"]["q"] for state in (restored, target))
  assert restored_q.sharding == target_q.sharding
  for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(restored["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(saved["rng"]))
  assert int(restored["step"]) == 1
  state, meta2, step2 = checkpoint.restore_arrays(str(tmp_path))
  assert step2 == 7 and meta2 == meta and state["params"]["embedding"].shape == (64, 32)
  assert checkpoint.read_meta(str(tmp_path)) == (meta, 7)


def test_keeps_the_last_k_and_refuses_bad_settings(tmp_path):
  mngr = checkpoint.manager(str(tmp_path), max_to_keep=2, async_save=False)
  state = {"x": jnp.arange(3)}
  for step in (1, 2, 3):
    checkpoint.save(mngr, step, state, {})
  assert mngr.all_steps() == [2, 3]
  with pytest.raises(ValueError, match="max_to_keep=0 must be >= 1"):
    checkpoint.manager(str(tmp_path / "other"), max_to_keep=0)
  with pytest.raises(ValueError, match="no checkpoint to restore"):
    checkpoint.restore(checkpoint.manager(str(tmp_path / "empty")), state)


# --------------------------------------------------------------------------------------------------------
# Damaged checkpoints: real Orbax files, damaged on disk the way disks and killed copies damage them.


def _small(seed):
  """A small state: random data (so a data file holds the array's bytes), bf16, int, a typed key."""
  return {
      "params": {
          "w": jax.random.normal(jax.random.key(seed), (64, 64)),
          "b": jnp.full((8,), seed / 3, jnp.bfloat16)
      },
      "count": jnp.int32(seed),
      "rng": jax.random.key(seed + 100)
  }


def _assert_bitwise_equal(restored, expected):
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  got, want = checkpoint._keys_to_data(restored), checkpoint._keys_to_data(expected)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """Steps 1, 2, 3 saved once for the module; each test damages its own copy."""
  directory = tmp_path_factory.mktemp("pristine")
  mngr = checkpoint.manager(str(directory), max_to_keep=3)
  for step in (1, 2, 3):
    checkpoint.save(mngr, step, _small(step), {"note": f"step {step}"})
  mngr.wait_until_finished()
  mngr.close()
  return directory


def _copy(pristine, tmp_path) -> str:
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(pristine, directory)
  return directory


# damage -> (how, what the reported line says failed)
DAMAGES = {
    "flipped_bytes": (damage.flip_bytes, "checksum mismatch in 1 of 4 arrays (params/w)"),
    "truncated_data_file": (damage.truncate, "is not valid for value of size"),
    "no_METADATA": (damage.remove_metadata, "_METADATA) does not exist"),
    "empty_state_dir": (damage.empty, "_METADATA) does not exist"),
    "no_manifest": (lambda d: os.remove(os.path.join(d, "manifest.ocdbt")), "NOT_FOUND"),
    "no_state_dir": (shutil.rmtree, "no state directory"),
    "no_meta_json":
        (lambda d: os.remove(os.path.join(d, os.pardir, "meta", "metadata")), "meta/metadata not found"),
}


def _reported(caplog) -> list[str]:
  return [
      r.getMessage() for r in caplog.records
      if r.pathname.endswith(os.path.join("bond_jax", "checkpoint.py")) and r.levelno >= logging.WARNING
  ]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_latest_step_is_set_aside_and_the_previous_one_restored(pristine, tmp_path, caplog, damage):
  directory = _copy(pristine, tmp_path)
  how, what = DAMAGES[damage]
  how(os.path.join(directory, "3", "state"))
  mngr = checkpoint.manager(directory, max_to_keep=3, async_save=False)
  with caplog.at_level(logging.WARNING):
    state, meta, step = checkpoint.restore_latest_good(mngr, _small(0))
  assert step == 2 and meta == {"note": "step 2"}
  _assert_bitwise_equal(state, _small(2))
  lines = _reported(caplog)
  assert len(lines) == 1 and "\n" not in lines[0], lines
  assert f"checkpoint step 3 in {directory} is damaged" in lines[0] and what in lines[0], lines[0]
  assert "moved it to 3.corrupt; trying step 2" in lines[0]
  assert sorted(os.listdir(directory)) == ["1", "2", "3.corrupt"] and mngr.latest_step() == 2
  # The resumed run saves again; max_to_keep=3 counts 2, 3, 4 and never touches the set-aside step.
  for new in (3, 4):
    checkpoint.save(mngr, new, _small(10 + new), {"note": f"new {new}"})
  assert mngr.all_steps() == [2, 3, 4] and os.path.isdir(os.path.join(directory, "3.corrupt"))
  state, meta, step = checkpoint.restore_latest_good(checkpoint.manager(directory), _small(0))
  assert step == 4 and meta == {"note": "new 4"}
  _assert_bitwise_equal(state, _small(14))


def test_when_every_checkpoint_is_damaged_it_says_so_and_starts_fresh(pristine, tmp_path, caplog):
  directory = _copy(pristine, tmp_path)
  for step, how in ((3, damage.flip_bytes), (2, damage.remove_metadata), (1, damage.truncate)):
    how(os.path.join(directory, str(step), "state"))
  mngr = checkpoint.manager(directory, async_save=False)
  with caplog.at_level(logging.WARNING):
    assert checkpoint.restore_latest_good(mngr, _small(0)) is None
  lines = _reported(caplog)
  assert len(lines) == 3, lines
  for step, line in zip((3, 2, 1), lines):
    assert f"checkpoint step {step} in {directory} is damaged" in line, line
    assert f"moved it to {step}.corrupt" in line
  assert lines[-1].endswith("no checkpoint left: all 3 in this directory were damaged, starting fresh")
  assert sorted(os.listdir(directory)) == ["1.corrupt", "2.corrupt", "3.corrupt"]
  assert mngr.latest_step() is None
  checkpoint.save(mngr, 3, _small(5), {})  # the fresh run's first checkpoint may reuse a set-aside step
  _assert_bitwise_equal(checkpoint.restore_latest_good(mngr, _small(0))[0], _small(5))
  assert checkpoint.restore_latest_good(checkpoint.manager(str(tmp_path / "none")), _small(0)) is None


def test_late_reports_of_a_failed_read_stay_quiet_and_other_errors_print(pristine, tmp_path, caplog):
  """An abandoned Orbax read can be reported after restore_latest_good has moved on: by asyncio when its
  task is garbage-collected ("Task exception was never retrieved", with a traceback). After a failed read
  those records are dropped for the rest of the process; an error from anywhere else still prints."""
  directory = _copy(pristine, tmp_path)
  damage.truncate(os.path.join(directory, "3", "state"))
  assert checkpoint.restore_latest_good(checkpoint.manager(directory, async_save=False), _small(0))[2] == 2
  os.rename(os.path.join(directory, "3.corrupt"), os.path.join(directory, "3"))
  reader, orbax_errors = checkpoint.manager(directory, async_save=False), []

  def read():  # the same damaged step, read by Orbax itself: keep the error it raises
    try:
      return reader.restore(
          3, args=checkpoint.ocp.args.Composite(
              state=checkpoint.ocp.args.StandardRestore(checkpoint.abstract_like(_small(0)))))
    except Exception as e:
      orbax_errors.append(e)
      raise

  with pytest.raises(checkpoint.CorruptCheckpointError):
    checkpoint._orbax_read(3, directory, "state", read)
  try:
    raise KeyError("not from a checkpoint read")
  except KeyError as e:
    other_error = e
  with caplog.at_level(logging.ERROR):
    for error in (orbax_errors[0], other_error):
      logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=error)
      logging.getLogger("absl").error("late report", exc_info=error)
  printed = [r.exc_info[1] is other_error for r in caplog.records if r.exc_info]
  # The kept error holds the abandoned reads' coroutines: finalise them the way _orbax_read does.
  previous, sys.unraisablehook = sys.unraisablehook, functools.partial(checkpoint._drop_abandoned_read_errors,
                                                                       sys.unraisablehook)
  orbax_errors.clear()
  caplog.clear()
  gc.collect()
  sys.unraisablehook = previous
  assert printed == [True, True], printed


def test_every_reader_verifies_checksums(pristine, tmp_path):
  directory = _copy(pristine, tmp_path)
  damage.flip_bytes(os.path.join(directory, "3", "state"))
  message = f"checkpoint step 3 in {directory} is unusable: checksum mismatch in 1 of "
  with pytest.raises(checkpoint.CorruptCheckpointError, match=re.escape(message + "4 arrays (params/w)")):
    checkpoint.restore(checkpoint.manager(directory), _small(0))
  with pytest.raises(checkpoint.CorruptCheckpointError, match=re.escape(message + "4 arrays")):
    checkpoint.restore_arrays(directory)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        _small(0)["params"])
  with pytest.raises(checkpoint.CorruptCheckpointError, match=re.escape(message + "2 arrays (params/w)")):
    checkpoint.restore_item(directory, 3, "params", params)
  assert checkpoint.read_meta(directory) == ({"note": "step 3"}, 3)  # the checksums are not the caller's
  restored = checkpoint.restore_item(directory, 2, "params", params)
  _assert_bitwise_equal(dict(_small(2), params=restored), _small(2))
  arrays, meta, step = checkpoint.restore_arrays(directory, 2)
  assert step == 2 and meta == {"note": "step 2"} and np.asarray(arrays["count"]) == 2


def test_another_layout_is_an_error_not_damage(pristine, tmp_path):
  directory = _copy(pristine, tmp_path)
  target = dict(_small(0), extra=jnp.zeros(3))
  with pytest.raises(
      ValueError, match=r"step 3 in .* holds another state layout than this run \(1 arrays "
      r"differ: extra\)"):
    checkpoint.restore_latest_good(checkpoint.manager(directory), target)
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]


def test_save_never_rotates_good_checkpoints_out_for_skipped_or_non_finite_steps(tmp_path):
  mngr = checkpoint.manager(str(tmp_path), max_to_keep=1, async_save=False)
  assert checkpoint.save(mngr, 1, _small(1), {})
  assert not checkpoint.save(mngr, 2, _small(1), {}, all_skipped=True, force=True)
  bad = dict(_small(2), params=dict(_small(2)["params"], b=jnp.full((8,), jnp.nan, jnp.bfloat16)))
  with pytest.raises(
      FloatingPointError, match=r"state at step 3 has non-finite values in params/b; not "
      r"saved, so rotation keeps the older checkpoints"):
    checkpoint.save(mngr, 3, bad, {})
  with pytest.raises(ValueError, match="meta key 'checksums' is reserved"):
    checkpoint.save(mngr, 4, _small(4), {"checksums": 1})
  assert mngr.all_steps() == [1] and os.listdir(tmp_path) == ["1"]


def test_the_trainers_state_round_trips(tmp_path):
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
  state = update.init_train_state(params, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)))
  mngr = checkpoint.manager(str(tmp_path), async_save=False)
  checkpoint.save(mngr, 5, state, {"kind": "bond"})
  restored, meta, step = checkpoint.restore_latest_good(mngr, state)
  assert step == 5 and meta == {"kind": "bond"} and restored.anchor_params is None
  assert jax.tree.structure(restored) == jax.tree.structure(state)
