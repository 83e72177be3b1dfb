"""The memory plan (plan.py) against XLA's own numbers: the J-BOND update and the sampler compiled for the
run's config on the local devices (a CPU mesh in tests), read with `compiled.memory_analysis()`.

XLA's per-device phases, in the plan's terms:
  persistent  the update's arguments but the batch (state: policy or adapters, anchor, Adam; pi_ref or
              the base) + the reward model's arrays (not an argument of the update; none when
              the rewards are computed on the host: plan.reward_on_device)
  update      temp + output - alias (the donated state's buffers are reused for the new state)
  sampling    the sampler's temp + output (its weights are the persistent policy)
  peak        persistent + max(update, sampling), as plan.peak_bytes
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bond_jax import plan, sampling, scoring, sharding, update
from bond_jax.models import lora as lora_lib
from bond_jax.models import params as params_lib


@dataclasses.dataclass(frozen=True)
class Phases:
  """Per-device bytes of each phase (see the module docstring)."""
  persistent: float
  update: float
  sampling: float

  @property
  def peak(self) -> float:
    return self.persistent + max(self.update, self.sampling)


def planned(config: Any, mesh_shape: dict[str, int]) -> Phases:
  rows = plan.plan(config, mesh_shape)
  phase = lambda name: sum(r.bytes for r in rows if r.phase == name)
  return Phases(phase("persistent"), phase("update"), phase("sampling"))


def _batch(config: Any, mesh: jax.sharding.Mesh) -> update.JBondBatch:
  B, P, T = config.train.batch_size, max(config.data.prompt_buckets), config.sampling.max_new_tokens
  spec = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(
      mesh, len(shape)))
  L = P + T
  return update.JBondBatch(spec(jnp.int32, B, L), spec(jnp.bool_, B, L), spec(jnp.float32, B),
                           spec(jnp.int32, B, 2, L), spec(jnp.bool_, B, 2, L), spec(jnp.float32, B, 2))


def measured(config: Any, mesh: jax.sharding.Mesh) -> Phases:
  """XLA's phases for `config` on `mesh` (fresh params of the run's shapes; nothing is trained)."""
  cfg = plan.model_config(config)
  lora = lora_lib.from_section(config.get("lora"))
  base = params_lib.init_sharded(cfg, "lm", jax.random.key(0), mesh)
  if lora is not None and lora.base_dtype:
    base = jax.tree.map(lambda x: x.astype(lora.base_dtype), base)
  reward = params_lib.placement(cfg, "reward", mesh) if plan.reward_on_device(config) else {}
  optimizer = update.make_optimizer(update.OptimizerConfig.from_section(config.optimizer, config.train.steps))
  trainable, options = base, {}
  if lora is not None:
    trainable = params_lib.init_adapters(cfg, lora, jax.random.key(1), mesh)
    options = dict(params_view=lambda b, a: lora_lib.attach(b, a, lora))
  state = update.new_state(trainable, optimizer, mesh, trainable)
  batch = _batch(config, mesh)
  step = update.make_jbond_step(
      scoring.sequence_logprob_fn(cfg, 0, response_width=config.sampling.max_new_tokens), optimizer,
      mesh=mesh, state_sharding=sharding.shardings_of(state), ref_sharding=sharding.shardings_of(base),
      batch_sharding=sharding.shardings_of(batch), **options)
  policy = base if lora is None else lora_lib.attach(base, trainable, lora)
  B, P, T = config.train.batch_size, max(config.data.prompt_buckets), config.sampling.max_new_tokens
  generate = sampling._jitted_generate(cfg, mesh, B, 2, T,
                                       tuple(sorted(sampling._static_mode(1.0, 0, 1.0).items())),
                                       lora_lib.layout(policy), lora is None or lora.decode == "merge")
  with jax.set_mesh(mesh):
    up = step.lower(state, base, batch).compile().memory_analysis()
    prompts = jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
    mask = jax.ShapeDtypeStruct((B, P), jnp.bool_, sharding=sharding.batch_sharding(mesh, 2))
    sm = generate.lower(policy, prompts, mask, jax.random.key(0), np.float32(1), np.float32(1),
                        np.zeros(cfg.vocab_size, bool), np.int32(0)).compile().memory_analysis()
  local_bytes = lambda tree: sum(
      np.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(tree))
  # the rollout batch is an argument of the update but no row of the plan (KiBs: B * (P + T) ids a device)
  return Phases(persistent=float(up.argument_size_in_bytes - local_bytes(batch) + local_bytes(reward)),
                update=float(up.temp_size_in_bytes + up.output_size_in_bytes - up.alias_size_in_bytes),
                sampling=float(sm.temp_size_in_bytes + sm.output_size_in_bytes))


def compare(config: Any, mesh: jax.sharding.Mesh) -> str:
  """A table of the plan against XLA for each phase and the peak (MiB per device)."""
  ours, theirs = planned(config, dict(mesh.shape)), measured(config, mesh)
  lines = [f"{'phase':<12}{'plan MiB':>10}{'XLA MiB':>10}{'plan/XLA':>10}"]
  for name in ("persistent", "update", "sampling", "peak"):
    a, b = getattr(ours, name) / 2**20, getattr(theirs, name) / 2**20
    lines.append(f"{name:<12}{a:>10.2f}{b:>10.2f}{a / b:>10.3f}")
  return "\n".join(lines)
