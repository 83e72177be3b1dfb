"""Orbax checkpoints: restore onto another mesh, PRNG keys, metadata, retention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax import checkpoint, sharding
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64)


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
  assert restored["params"]["layer_0"]["attn"]["q"].sharding == target["params"]["layer_0"]["attn"]["q"].sharding
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
