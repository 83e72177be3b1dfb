"""Mesh construction, the logical-axis table, and identical logits on 1-device and 8-device meshes."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from bond_jax import sharding
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig

# heads and kv heads divisible by tensor=4, vocab and d_model by 8
CFG = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                  mlp_dim=128, tie_embeddings=False)


def _sharded_forward(mesh, params, tokens, mask):
  with jax.set_mesh(mesh):
    placed = sharding.place(
        params,
        sharding.logical_specs(jax.eval_shape(lambda r: transformer.init_boxed(CFG, r), jax.random.key(0))),
        mesh)
    batch = sharding.shard_batch((tokens, mask), mesh)
    out_sharding = sharding.batch_sharding(mesh, 3)
    fn = jax.jit(functools.partial(transformer.forward, CFG), out_shardings=out_sharding)
    return placed, np.asarray(fn(placed, *batch))


def test_same_logits_on_one_device_and_three_eight_device_meshes():
  one = sharding.make_mesh({}, jax.devices()[:1])
  params, _ = sharding.init_sharded(lambda r: transformer.init_boxed(CFG, r), jax.random.key(0), one)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 128, (8, 10)).astype(np.int32)
  mask = np.arange(10)[None] >= rng.integers(0, 6, (8, 1))
  _, reference = _sharded_forward(one, params, tokens, mask)
  for shape in ({"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 2, "tensor": 4}):
    placed, logits = _sharded_forward(sharding.make_mesh(shape), params, tokens, mask)
    assert len(placed["layer_0"]["attn"]["q"].sharding.device_set) == 8
    np.testing.assert_allclose(logits, reference, atol=1e-5, err_msg=str(shape))


def test_params_are_initialised_in_their_sharded_layout():
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": -1})
  params, logical = sharding.init_sharded(lambda r: transformer.init_boxed(CFG, r), jax.random.key(0), mesh)
  assert mesh.shape == {"data": 1, "fsdp": 2, "tensor": 4}
  q = params["layer_0"]["attn"]["q"]
  assert logical["layer_0"]["attn"]["q"] == ("embed", "heads", "head_dim")
  assert q.sharding.spec == PartitionSpec("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (32, 2, 8)
  assert params["lm_head"].sharding.spec == PartitionSpec("fsdp", "tensor")


def test_logical_rules_form_one_table():
  assert sharding.logical_to_spec(("act_batch", "act_length", "act_vocab")) == \
      PartitionSpec(("data", "fsdp"), None, "tensor")
  with pytest.raises(ValueError, match="logical axis 'bogus' has no rule"):
    sharding.logical_to_spec(("bogus",))


@pytest.mark.parametrize("shape,message", [
    ({
        "data": 3
    }, r"mesh \{'data': 3, 'fsdp': 1, 'tensor': 1\} needs 3 devices but 8 are available"),
    ({
        "data": 3,
        "fsdp": -1
    }, r"does not fit 8 devices: 8 is not divisible by 3"),
    ({
        "data": -1,
        "fsdp": -1
    }, r"at most one axis may be -1"),
    ({
        "pipeline": 2
    }, r"unknown mesh axis 'pipeline'; allowed: data, fsdp, tensor"),
])
def test_bad_mesh_is_rejected(shape, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(shape)


def test_non_divisible_dimension_is_named():
  cfg = CFG.replace(num_heads=6, num_kv_heads=6)
  with pytest.raises(
      ValueError, match=r"parameter \['layer_0'\]\['attn'\]\['k'\] dimension kv_heads=6 is "
      r"not divisible by mesh axes tensor of size 4"):
    sharding.init_sharded(lambda r: transformer.init_boxed(cfg, r), jax.random.key(0),
                          sharding.make_mesh({
                              "fsdp": 2,
                              "tensor": 4
                          }))
