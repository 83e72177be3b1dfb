"""pi_ref's pools: kept bitwise, keyed by every input, drawn once by two readers, and BOND's step fed from
one is the step that samples pi_ref itself."""

import dataclasses
import multiprocessing
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax import reference_pools, rollout, sharding
from bond_jax.frozen import FrozenModels
from bond_jax.models import reward, transformer
from bond_jax.models.config import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                  mlp_dim=64, max_seq_len=64)
OPTIONS = dict(num_samples=4, max_new_tokens=5)


def _frozen(devices):
  params = nn.unbox(transformer.init_boxed(CFG, jax.random.key(0)))
  rm_params = {**nn.unbox(reward.init_boxed(CFG, jax.random.key(1))), "head": jnp.ones((CFG.d_model,))}
  mesh = sharding.make_mesh({"fsdp": len(devices)} if len(devices) > 1 else {}, devices)
  return FrozenModels(policy_cfg=CFG, reference_params=params, reward_cfg=CFG, reward_params=rm_params,
                      eos_ids=(1,), pad_id=0, mesh=mesh)


@pytest.fixture(scope="module")
def frozen():
  return _frozen(jax.devices()[:2])


def _prompts(seed=0):
  prompts = np.random.default_rng(seed).integers(3, 64, (4, 6)).astype(np.int32)
  return prompts, np.ones_like(prompts, bool)


def _assert_same(pool, again):
  for name, x, y in zip(reference_pools.FIELDS, pool, again):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    assert np.asarray(x).dtype == np.asarray(y).dtype


def test_a_saved_pool_reads_back_bitwise_and_its_fingerprint_tracks_its_inputs(frozen, tmp_path):
  prompts, mask = _prompts()
  rng = jax.random.key(3)
  pool = reference_pools.draw(frozen, prompts, mask, rng, **OPTIONS)
  path = str(tmp_path / "pools" / "p.npz")
  reference_pools.save(pool, path)
  again = reference_pools.load(path, frozen.mesh)
  _assert_same(pool, again)
  assert again.tokens.sharding.is_equivalent_to(pool.tokens.sharding, 3)
  assert os.listdir(tmp_path / "pools") == ["p.npz"]  # no partial file left behind

  def fingerprint(models=frozen, prompts=prompts, rng=rng, **options):
    return reference_pools.fingerprint(models, prompts, mask, rng, **{**OPTIONS, **options})

  base = fingerprint()
  assert base == fingerprint(prompts=prompts.copy())
  params, rm_params = frozen.reference_params, frozen.reward_params
  nudged = {**params, "final_norm": jax.tree.map(lambda x: x + 1e-3, params["final_norm"])}
  changed = [
      fingerprint(dataclasses.replace(frozen, reference_params=nudged)),
      fingerprint(prompts=prompts[::-1].copy()),
      fingerprint(rng=jax.random.key(4)),
      fingerprint(num_samples=8),
      fingerprint(dataclasses.replace(frozen, reward_params={
          **rm_params, "head": -rm_params["head"]
      })),
      fingerprint(dataclasses.replace(frozen, eos_ids=(1, 2))),
  ]
  assert base not in changed and len(set(changed)) == len(changed)
  assert fingerprint(dataclasses.replace(frozen, text_rewards=object())) is None


def _get_in_another_process(directory, queue):
  """A second run (its own process and models, one device) asking for a pool another run is drawing."""
  jax.config.update("jax_platforms", "cpu")
  store = reference_pools.Store(_frozen(jax.devices()[:1]))
  prompts, mask = _prompts()
  pool, path = store.get(directory, "set", prompts, mask, jax.random.key(3), **OPTIONS)
  queue.put((path, store.drawn, np.asarray(pool.rewards)))


def test_the_store_draws_a_pool_once_and_a_second_reader_waits_for_it(frozen, tmp_path):
  directory = str(tmp_path / "pools")
  prompts, mask = _prompts()
  store = reference_pools.Store(frozen)
  get = lambda directory, rng: store.get(directory, "set", prompts, mask, jax.random.key(rng), **OPTIONS)
  pool, path = get(directory, 3)
  assert path is None and (store.drawn, store.read) == (1, 0)
  again, path = get(directory, 3)
  assert os.path.basename(path).startswith("set-") and (store.drawn, store.read) == (1, 1)
  _assert_same(pool, again)
  other, path = get(directory, 5)  # another key: another pool
  assert path is None and store.drawn == 2 and not np.array_equal(other.rewards, pool.rewards)
  unkept, path = get("", 3)  # '' keeps nothing
  assert path is None and store.drawn == 3
  _assert_same(pool, unkept)

  # A second process asking while this one holds the pool's lock waits, then reads it (draws nothing).
  fresh = str(tmp_path / "fresh")
  name = f"set-{reference_pools.fingerprint(frozen, prompts, mask, jax.random.key(3), **OPTIONS)}.npz"
  context = multiprocessing.get_context("spawn")
  queue = context.Queue()
  with reference_pools._locked(os.path.join(fresh, name)):
    reader = context.Process(target=_get_in_another_process, args=(fresh, queue))
    reader.start()
    reader.join(timeout=20)
    assert reader.is_alive()  # blocked on the lock
    reference_pools.save(pool, os.path.join(fresh, name))
  path, drawn, rewards = queue.get(timeout=120)
  reader.join(timeout=10)
  assert path == os.path.join(fresh, name) and drawn == 0
  np.testing.assert_array_equal(rewards, pool.rewards)


def test_a_bond_step_fed_a_kept_pool_is_the_step_that_samples_pi_ref(frozen):
  params = frozen.reference_params
  policy = jax.tree.map(lambda x: x * 1.01, params)  # the policy has moved; the base is pi_ref
  prompts, mask = _prompts(1)
  rng = jax.random.key(9)
  step = lambda **kw: rollout.bond(frozen, policy, params, prompts, mask, rng, 5, n=2, num_policy_samples=2,
                                   **kw)
  drawn, _ = step(k=4)
  pool = reference_pools.draw(frozen, prompts, mask, rollout.bond_keys(rng)[1], **OPTIONS)
  kept, _ = step(k=4, reference=pool)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(drawn), jax.tree.leaves(kept)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert np.asarray(x).dtype == np.asarray(y).dtype
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim)  # as the update's jit expects
  with pytest.raises(ValueError, match="the reference pool has 4 samples per prompt; k=8"):
    step(k=8, reference=pool)
