"""Every test runs on 8 fake CPU devices (set before jax is imported anywhere)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the environment above)
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
