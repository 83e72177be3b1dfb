"""The one table of distillation algorithms: what each samples, how it updates, what it aims at.

    jbond           J-BOND (Algorithm 2): 1 policy + 2 anchor samples, EMA anchor (the default).
    jbond_hard      J-BOND with a hard anchor update every anchor_period steps instead of the EMA (Fig. 5).
    bond            BOND: Jeffreys divergence to Best-of-n of pi_ref, Monte-Carlo quantiles from k samples.
    iterative_bond  BOND of Best-of-n of an anchor that becomes the policy every anchor_period steps.
    reinforce       the RLOO baseline: REINFORCE on r - beta_rl * (log pi - log pi_ref).
Everything that differs between algorithms is a field of its row; nothing else compares their names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import optax

from bond_jax import best_of_n, objectives, rollout, update
from bond_jax.frozen import FrozenModels

# (bond config, frozen models, state, prompts [B, P], prompt mask [B, P], rng, max_new_tokens)
#   -> (update batch, rollout.Stats); an algorithm that `draws_reference` also takes reference= (a pool)
Rollout = Callable[
    [ml_collections.ConfigDict, FrozenModels, update.TrainState, jax.Array, jax.Array, jax.Array, int],
    tuple[Any, rollout.Stats]]
# (bond config, sequence_logprob_fn, optimizer, build_update_step's options, measure_ref, sequence_kl_fn)
# -> jitted step; measure_ref=False: a step without pi_ref's forward, for an algorithm that
# `measures_ref_only`; sequence_kl_fn (scoring.sequence_kl_fn): what bond.kl_estimator="per_position" reads
StepBuilder = Callable[[
    ml_collections.ConfigDict, update.SequenceLogprobFn, optax.GradientTransformation, dict[
        str, Any], bool, update.SequenceKLFn | None
], Callable]

PROGRESS_KEYS = ("reward_mean", "kl_policy_ref", "kl_policy_anchor", "penalty_rate", "kl_base_importance",
                 "loss")
POLICY_SAMPLES = 2  # per prompt for BOND and RLOO: the fewest a leave-one-out baseline needs


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """uses_anchor: the state carries anchor params (started at pi_ref). target_best_of(bond, step): the
  Best-of-N of pi_ref the algorithm aims at after `step` steps, or None (RLOO aims at none).
  draws_reference: each step draws bond.k samples of pi_ref per prompt (with rollout.bond_keys' base key),
  so its rollout takes them as reference= from a kept pool instead (bond.pool_dir: the study's BOND arms
  share them). measures_ref_only: the loss never reads pi_ref, which only measures kl_policy_ref, so
  make_step(..., measure_ref=False) builds a step without pi_ref's forward (the stage runs it on the
  steps it does not log)."""
  name: str
  uses_anchor: bool
  rollout: Rollout
  make_step: StepBuilder
  target_best_of: Callable[[ml_collections.ConfigDict, int], float | None]
  draws_reference: bool = False
  measures_ref_only: bool = False


def _jbond_rollout(bond, frozen, state, prompts, mask, rng, max_new_tokens):
  del bond
  return rollout.jbond(frozen, frozen.model_params(state.params), frozen.model_params(state.anchor_params),
                       prompts, mask, rng, max_new_tokens)


def _bond_rollout(bond, frozen, state, prompts, mask, rng, max_new_tokens, reference=None):
  base = (frozen.model_params(state.anchor_params)
          if state.anchor_params is not None else frozen.reference_params)
  return rollout.bond(frozen, frozen.model_params(state.params), base, prompts, mask, rng, max_new_tokens,
                      n=bond.n, k=bond.k, num_policy_samples=POLICY_SAMPLES, reference=reference,
                      forward_estimator=_forward_estimator(bond))


def _forward_estimator(bond: ml_collections.ConfigDict) -> str:
  return bond.get("forward_estimator", "best_of_n")  # absent from configs written before it existed


def _reinforce_rollout(bond, frozen, state, prompts, mask, rng, max_new_tokens):
  del bond
  return rollout.reinforce(frozen, frozen.model_params(state.params), prompts, mask, rng, max_new_tokens,
                           num_policy_samples=POLICY_SAMPLES)


def _jbond_step(b, fn, opt, options, measure_ref=True, kl_fn=None):
  return update.make_jbond_step(fn, opt, beta=b.beta, gamma=b.gamma, eta=b.eta, measure_ref=measure_ref,
                                sequence_kl_fn=_per_position(b, kl_fn), **options)


def _jbond_hard_step(b, fn, opt, options, measure_ref=True, kl_fn=None):
  return update.make_jbond_step(fn, opt, beta=b.beta, gamma=b.gamma, eta=b.eta, anchor_period=b.anchor_period,
                                measure_ref=measure_ref, sequence_kl_fn=_per_position(b, kl_fn), **options)


def _bond_step(b, fn, opt, options, measure_ref=True, kl_fn=None):
  del measure_ref  # BOND's loss reads its base (pi_ref) anyway
  return update.make_bond_step(fn, opt, n=b.n, beta=b.beta, forward_estimator=_forward_estimator(b),
                               sequence_kl_fn=_per_position(b, kl_fn), **options)


def _iterative_bond_step(b, fn, opt, options, measure_ref=True, kl_fn=None):
  del measure_ref
  return update.make_bond_step(fn, opt, n=b.n, beta=b.beta, anchor_period=b.anchor_period,
                               forward_estimator=_forward_estimator(b),
                               sequence_kl_fn=_per_position(b, kl_fn), **options)


def _per_position(bond: ml_collections.ConfigDict, kl_fn):
  """The sequence_kl_fn the KL term of the return reads (bond.kl_estimator "per_position"), else None."""
  if _kl_estimator(bond) == "sampled":
    return None
  if kl_fn is None:
    raise ValueError("bond.kl_estimator='per_position' needs the step builder's sequence_kl_fn")
  return kl_fn


def _kl_estimator(bond: ml_collections.ConfigDict) -> str:
  return bond.get("kl_estimator", "sampled")  # absent from configs written before it existed


def _reinforce_step(b, fn, opt, options, measure_ref=True, kl_fn=None):
  del measure_ref  # RLOO's loss reads pi_ref (its KL penalty)
  return update.make_reinforce_step(fn, opt, beta_rl=b.beta_rl, sequence_kl_fn=_per_position(b, kl_fn),
                                    **options)


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a for a in (
        Algorithm(
            "jbond",
            uses_anchor=True,
            rollout=_jbond_rollout,
            make_step=_jbond_step,
            # the EMA anchor makes each step distil Best-of-2 of an anchor that is itself ahead of pi_ref
            target_best_of=lambda b, step: float(2.0**(b.eta * step)),
            measures_ref_only=True),
        Algorithm(
            "jbond_hard",
            uses_anchor=True,
            rollout=_jbond_rollout,
            make_step=_jbond_hard_step,
            # Best-of-2 of an anchor that is Best-of-2^M after M hard updates
            target_best_of=lambda b, step: float(2.0**(step // b.anchor_period + 1)),
            measures_ref_only=True),
        Algorithm("bond", uses_anchor=False, rollout=_bond_rollout, make_step=_bond_step,
                  target_best_of=lambda b, step: float(b.n), draws_reference=True),
        Algorithm(
            "iterative_bond",
            uses_anchor=True,
            rollout=_bond_rollout,
            make_step=_iterative_bond_step,
            # n^(M + 1) after M hard anchor updates
            target_best_of=lambda b, step: float(best_of_n.iterative_best_of(b.n, step // b.anchor_period + 1)
                                                )),
        Algorithm("reinforce", uses_anchor=False, rollout=_reinforce_rollout, make_step=_reinforce_step,
                  target_best_of=lambda b, step: None),
    )
}


def get(name: str) -> Algorithm:
  if name not in ALGORITHMS:
    raise ValueError(f"bond.algorithm={name!r}; allowed: {', '.join(ALGORITHMS)}")
  return ALGORITHMS[name]


def validate(bond: ml_collections.ConfigDict) -> None:
  """The algorithm's name and hyperparameters (one-line errors naming the value)."""
  algorithm = get(bond.algorithm)
  try:  # objectives names the hyperparameter; the config key is bond.<name>
    objectives.validate_hparams(beta=bond.beta, eta=bond.eta, gamma=bond.gamma, k=bond.k,
                                beta_rl=bond.beta_rl, anchor_period=bond.anchor_period,
                                forward_estimator=_forward_estimator(bond), kl_estimator=_kl_estimator(bond))
    if algorithm.rollout is _bond_rollout:
      objectives.validate_hparams(n=bond.n)
  except ValueError as error:
    raise ValueError(f"bond.{error}") from None
  if algorithm.rollout is _bond_rollout and bond.k < bond.n:
    raise ValueError(f"bond.k={bond.k} reference samples cannot supply a Best-of-{bond.n}: need bond.k >= "
                     "bond.n")
