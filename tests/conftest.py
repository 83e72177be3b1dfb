"""Every test runs on 8 fake CPU devices (set before jax is imported anywhere)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the environment above)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """Several runs in this module compile the same programs: a persistent cache compiles each once."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = [getattr(jax.config, n) for n in names]
  for name, value in zip(names, (str(tmp_path_factory.mktemp("xla_cache")), 0.0, 0)):
    jax.config.update(name, value)
  yield
  for name, value in zip(names, saved):
    jax.config.update(name, value)


@pytest.fixture
def tiny_config():
  """A factory of the default dialogue config at a tiny size (200 conversations, 400 pieces, a 1-layer
  32-wide model): each call a fresh ConfigDict the test may change."""
  from configs import dialogue

  def make():
    c = dialogue.get_config()
    c.data.max_conversations = 200
    c.data.vocab_size = 400
    c.model.overrides.update(
        dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64))
    return c

  return make


@pytest.fixture(scope="session")
def smoke_stages(tmp_path_factory):
  """A workdir of configs/dialogue.py:smoke whose SFT and reward stages are done, shared by the session's
  tests (tests/test_train.py, tests/test_study.py): read it, or copy it before writing."""
  from bond_jax import pipeline
  from configs import dialogue
  workdir = str(tmp_path_factory.mktemp("smoke_stages"))
  pipeline.run(dialogue.get_config("smoke"), workdir, until="reward")
  return workdir


@pytest.fixture(scope="session")
def distinct_space():
  """An enumerated response space for the math tests: 81 atoms (3 tokens ** length 4) with log pi_ref [81]
  and distinct rewards [81], so repeated draws of one atom are the only ties."""
  rng = np.random.default_rng(0)
  ref_logprobs = jax.nn.log_softmax(jnp.asarray(rng.normal(size=81) * 0.7, jnp.float32))
  return ref_logprobs, jnp.asarray(rng.normal(size=81), jnp.float32)
