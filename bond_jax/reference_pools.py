"""pi_ref's pools: K scored samples of the frozen reference per prompt, drawn once and kept on disk.

pi_ref and the reward model never change during distillation, so K samples of pi_ref for a batch of
prompts, with a given key, are a pure function of (both models' contents, the prompts, the key, K, the
response budget, the ids that end or pad a response). Two readers draw such pools:
- the evaluation (evaluate.py): K = eval.quantile_samples per held-out prompt, once per run, in
  eval.pool_dir; the study's arms share them, and a resumed run reads its own;
- BOND's training step (rollout.bond, base = pi_ref): k = bond.k samples per training prompt every step,
  kept in bond.pool_dir when it is set, so that the study's BOND arms (same prompts and keys per step) draw
  each step's k samples once between them.

A pool's file name carries `fingerprint`, a digest of every input above, so a pool is only read back for
the inputs that drew it; `Store.get` holds a lock on the file while it draws, so two runs that need the
same pool at once draw it once (the second waits, then reads). Shapes: B prompts, K samples, T =
max_new_tokens.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bond_jax import checkpoint, rewards as rewards_lib, rollout, sharding
from bond_jax.frozen import FrozenModels


class ReferencePool(NamedTuple):
  """K samples of pi_ref per prompt, scored: rewards and response lengths [B, K] float64 (host); the
  samples themselves, tokens / mask [B, K, T] and their log pi_ref [B, K] (device)."""
  rewards: np.ndarray
  lengths: np.ndarray
  tokens: jax.Array
  mask: jax.Array
  ref_logprobs: jax.Array


FIELDS = ReferencePool._fields


def _host(x) -> np.ndarray:
  return np.asarray(sharding.to_host(x), np.float64)  # rows may live on other processes' devices


def draw(frozen: FrozenModels, prompts: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *,
         num_samples: int, max_new_tokens: int) -> ReferencePool:
  """Sample num_samples = K responses of pi_ref per prompt [B, P] with `rng` and score them (the same
  samples and rewards as rollout.sample + rewards.score of the same key: BOND's step relies on it)."""
  reference = rollout.sample(frozen, frozen.reference_params, prompts, prompt_mask, rng, num_samples,
                             max_new_tokens)
  rewards = rewards_lib.score(frozen, prompts, prompt_mask, reference.tokens, reference.mask)
  return ReferencePool(_host(rewards), _host(reference.lengths), reference.tokens, reference.mask,
                       jnp.sum(reference.model_logprobs, axis=-1))


def can_keep(frozen: FrozenModels) -> bool:
  """Whether pools can be kept and read back: not with a host reward route whose scorer has no digest (a
  user's function: its code is not hashable), nor
  across several processes (every process would have to agree that a file exists before the collective
  draw)."""
  text = frozen.text_rewards
  return (text is None or getattr(text, "digest", None) is not None) and jax.process_count() == 1


def models_digest(frozen: FrozenModels) -> str:
  """pi_ref's and the reward model's contents (not their paths), hashed: the part of a fingerprint that is
  the same for every pool of a run (a scan of both models: `Store` computes it once)."""
  text = frozen.text_rewards
  rewards = checkpoint.tree_digest(frozen.reward_params) if text is None else f"text:{text.digest}"
  return "|".join((checkpoint.tree_digest(frozen.reference_params), rewards, repr(frozen.policy_cfg),
                   repr(frozen.reward_cfg)))


def fingerprint(frozen: FrozenModels, prompts: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *,
                num_samples: int, max_new_tokens: int, models: str | None = None) -> str | None:
  """What a pool is a function of, hashed: `models_digest` (pass `models` to reuse it), the prompts, the
  draw's key, K, the response budget and the token ids that end or pad a response. None where a pool must
  be drawn every time (`can_keep`)."""
  if not can_keep(frozen):
    return None
  parts = [
      models or models_digest(frozen),
      str(np.asarray(jax.random.key_data(rng)).tolist()), f"K={num_samples} T={max_new_tokens}",
      f"eos={frozen.eos_ids} pad={frozen.pad_id}"
  ]
  digest = hashlib.sha256("|".join(parts).encode())
  for x in (prompts, prompt_mask):
    digest.update(np.ascontiguousarray(sharding.to_host(x)).tobytes())
  return digest.hexdigest()[:24]


def save(pool: ReferencePool, path: str) -> None:
  """Write a pool as one .npz, atomically (a killed run leaves no half-written file for the next to trust)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = f"{path}.partial-{os.getpid()}"
  with open(partial, "wb") as f:
    np.savez(f, **{name: np.asarray(sharding.to_host(x)) for name, x in zip(FIELDS, pool)})
  os.replace(partial, path)


def load(path: str, mesh: Any) -> ReferencePool:
  """A pool written by `save`, its device arrays placed as the sampler places them (batch split)."""
  with np.load(path) as saved:
    arrays = {name: saved[name] for name in FIELDS}
  place = lambda x: jax.device_put(x, sharding.fitted(mesh, x.shape, ("act_batch",) + (None,) * (x.ndim - 1)))
  return ReferencePool(arrays["rewards"], arrays["lengths"], place(arrays["tokens"]), place(arrays["mask"]),
                       place(arrays["ref_logprobs"]))


@contextlib.contextmanager
def _locked(path: str):
  """An exclusive lock on `path`.lock for the block (held by this process: released if it dies)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(f"{path}.lock", "a") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


class Store:
  """The run's pools of pi_ref: `get` reads a kept pool of the same inputs, else draws it (and keeps it
  where the directory is set and `can_keep` holds). Both models are hashed once, at the first get."""

  def __init__(self, frozen: FrozenModels):
    self.frozen = frozen
    self._models: str | None = None
    self.read = self.drawn = 0  # pools read back / drawn by this store

  def get(self, directory: str, name: str, prompts: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *,
          num_samples: int, max_new_tokens: int) -> tuple[ReferencePool, str | None]:
    """(pool, the path it was read from, or None when drawn). directory '': drawn, never kept."""
    options = dict(num_samples=num_samples, max_new_tokens=max_new_tokens)
    if not directory or not can_keep(self.frozen):
      self.drawn += 1
      return draw(self.frozen, prompts, prompt_mask, rng, **options), None
    if self._models is None:
      self._models = models_digest(self.frozen)
    key = fingerprint(self.frozen, prompts, prompt_mask, rng, models=self._models, **options)
    path = os.path.join(directory, f"{name}-{key}.npz")
    with _locked(path):  # a second run that needs this pool now waits here, then reads it
      if os.path.exists(path):
        self.read += 1
        return load(path, self.frozen.mesh), path
      pool = draw(self.frozen, prompts, prompt_mask, rng, **options)
      save(pool, path)
    self.drawn += 1
    return pool, None
