"""The law of Best-of-N and its estimates from samples: exact density, quantiles, selection, subset weights.

Best-of-n of a base policy pi_base draws n i.i.d. responses and keeps the one with the highest reward. This
module holds what BOND needs to know about that distribution, as pure functions:
  * on an enumerated response space: the exact quantiles p_<(y), p_<=(y) and the exact density of
    Theorem 1 (eq. 4, ties included), the reference the tests hold every estimator to;
  * from k samples of pi_base per prompt: the Monte-Carlo quantile (eq. 10), the Best-of-n pick
    (`select_best`, ties to the lowest index, so its law is eq. 4), and each sample's chance to win a random
    n-subset (`best_of_n_weights`);
  * Best-of-n iterated M times (Algorithm 1) is Best-of-(n^M).

Paper: "BOND: Aligning LLMs with Best-of-N Distillation", Sessa et al. 2024 (arXiv 2407.14622); shapes
follow bond_jax.objectives: `B` prompts, `k` base samples per prompt, `S` atoms of an enumerated space.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def is_static_number(value: Any) -> bool:
  return isinstance(value, numbers.Number) and not isinstance(value, jax.core.Tracer)


def check_best_of(name: str, value: Any) -> None:
  """ValueError (one line) unless a static `value` is an integer >= 2; a traced value passes."""
  if is_static_number(value) and (int(value) != value or value < 2):
    raise ValueError(f"{name}={value} is not allowed: Best-of-{name} needs an integer {name} >= 2")


# --------------------------------------------------------------------------------------------------------
# Exact Best-of-N density on an enumerated response space (Theorem 1, eq. 4).


def exact_quantiles(ref_logprobs: Array, rewards: Array) -> tuple[Array, Array]:
  """Exact reference quantiles p_<(y) and p_<=(y) over an enumerated response set.

  Args:
    ref_logprobs: [..., S] log pi_ref(y) of EVERY response of the space (they must sum to 1 in prob).
    rewards: [..., S] r(y).
  Returns:
    (p_less, p_less_equal), each [..., S]: P_{y'~pi_ref}[r(y') < r(y)] and P[r(y') <= r(y)].
  """
  ref_probs = jnp.exp(ref_logprobs)
  # [..., S(y), S(y')]: an O(S^2) comparison is fine for the spaces that can be enumerated at all.
  less = rewards[..., None, :] < rewards[..., :, None]
  less_equal = rewards[..., None, :] <= rewards[..., :, None]
  p_less = jnp.sum(jnp.where(less, ref_probs[..., None, :], 0.0), axis=-1)
  p_less_equal = jnp.sum(jnp.where(less_equal, ref_probs[..., None, :], 0.0), axis=-1)
  return p_less, jnp.minimum(p_less_equal, 1.0)


def best_of_n_log_density(ref_logprobs: Array, rewards: Array, n: int) -> Array:
  """Exact log pi_BoN(y) of Theorem 1 (eq. 4), WITH the tie (collision) correction factor.

      pi_BoN(y) = pi_ref(y) * p_<=(y)^(n-1) * sum_{i=1..n} (p_<(y) / p_<=(y))^(i-1)

  It is the law of the following sampler: draw n i.i.d. responses from pi_ref, return the one with the
  highest reward, ties broken by ANY rule that looks only at the sample indices (lowest index, uniform at
  random, ...). Proof: the chosen index is i with y_i = y iff the i-1 earlier samples score < r(y) and the
  n-i later ones <= r(y) (lowest-index rule), probability pi_ref(y) p_<^(i-1) p_<=^(n-i); summing over i
  gives eq. 4. Any index-only rule gives the same law because the samples are exchangeable. A rule that
  looks at the responses themselves (e.g. shortest among tied) is NOT covered by eq. 4.

  Repeated draws of the same y count as ties, so on a discrete space the correction matters even when
  all rewards are distinct.

  Args:
    ref_logprobs: [..., S] log pi_ref over the enumerated space.
    rewards: [..., S].
    n: Best-of-n, static integer >= 2.
  Returns:
    [..., S] log pi_BoN(y).
  """
  check_best_of("n", n)
  p_less, p_less_equal = exact_quantiles(ref_logprobs, rewards)
  ratio = p_less / jnp.maximum(p_less_equal, jnp.finfo(p_less_equal.dtype).tiny)
  powers = ratio[..., None]**jnp.arange(n, dtype=ratio.dtype)
  correction = jnp.sum(powers, axis=-1)  # in [1, n]
  return ref_logprobs + (n - 1) * jnp.log(p_less_equal) + jnp.log(correction)


def best_of_n_log_density_no_ties(ref_logprobs: Array, rewards: Array, n: int) -> Array:
  """The no-ties form log(n * pi_ref(y) * p_<=(y)^(n-1)) of eq. 4 (the correction factor set to n).

  Exact only for continuous reward distributions; on a discrete space it over-weights responses with a
  large reference mass and does not sum to 1. Shapes as in `best_of_n_log_density`.
  """
  check_best_of("n", n)
  _, p_less_equal = exact_quantiles(ref_logprobs, rewards)
  return math.log(n) + ref_logprobs + (n - 1) * jnp.log(p_less_equal)


# --------------------------------------------------------------------------------------------------------
# From k samples per prompt: Monte-Carlo quantile (eq. 10), the Best-of-n pick, subset-winning weights.


def empirical_quantile(rewards: Array, ref_rewards: Array) -> Array:
  """Monte-Carlo reference quantile p_hat(y) of eq. 10, floored by counting y itself.

      p_hat(y) = (1 + #{i : r(y_i) <= r(y)}) / (k + 1),   y_1..y_k ~ pi_ref(.|x)

  The floor: y joins the pool of k reference rewards, so p_hat is y's rank in k + 1 rewards. It is always
  in [1/(k+1), 1] (log p_hat is finite) and converges to p_<=(y) as k grows; its bias,
  (1 - p_<=)/(k+1), vanishes as k grows and is largest for low-reward y.

  Args:
    rewards: [B, M] rewards of the responses to rank (M per prompt; [B] is treated as M = 1).
    ref_rewards: [B, k] rewards of k >= 1 reference samples of the SAME prompt.
  Returns:
    [B, M] (or [B]) p_hat in [1/(k+1), 1].
  """
  k = ref_rewards.shape[-1]
  if k < 1:
    raise ValueError(f"k={k} is not allowed: the quantile needs an integer k >= 1 reference samples")
  flat = rewards.ndim == 1
  rewards_2d = rewards[:, None] if flat else rewards
  count = jnp.sum(ref_rewards[:, None, :] <= rewards_2d[:, :, None], axis=-1)
  quantile = (1.0 + count.astype(jnp.float32)) / (k + 1.0)
  return quantile[:, 0] if flat else quantile


def select_best(rewards: Array) -> tuple[Array, Array]:
  """Index of the highest reward along the last axis; ties go to the LOWEST index, and are counted.

  Lowest-index tie-breaking depends only on positions, so the selected response follows eq. 4 exactly
  (see `best_of_n_log_density`).

  Args:
    rewards: [..., N].
  Returns:
    (best_index [...] int32, num_at_max [...] int32): num_at_max = how many of the N share the best
    reward (1 = no tie).
  """
  best_index = jnp.argmax(rewards, axis=-1).astype(jnp.int32)  # argmax returns the first maximum
  best_reward = jnp.max(rewards, axis=-1, keepdims=True)
  num_at_max = jnp.sum(rewards == best_reward, axis=-1).astype(jnp.int32)
  return best_index, num_at_max


def best_of_n_weights(rewards: Array, n: int) -> Array:
  """Chance of each of k samples to be the Best-of-n of a uniformly random n-subset of them.

      w_i = C(b_i, n - 1) / C(k, n),   b_i = #{j : r_j < r_i, or r_j == r_i and j > i}

  b_i counts the samples that i beats under `select_best`'s rule (ties: the lowest index wins), so each
  n-subset has exactly one winner and every row sums to 1. sum_i w_i f(y_i) is then the mean of f(winner)
  over all C(k, n) subsets: the U-statistic of E_{y ~ Best-of-n}[f(y)], unbiased as the best of the first
  n samples is (k = n gives back that one-hot choice), with every sample contributing (k = 16, n = 4: an
  effective sample size 1 / sum w^2 of ~6 instead of 1).

  Args:
    rewards: [B, k] rewards of k >= n i.i.d. samples of pi_base of the same prompt.
    n: Best-of-n, static >= 2.
  Returns:
    [B, k] float32 weights; the n - 1 lowest-ranked samples of each row get 0.
  """
  check_best_of("n", n)
  k = rewards.shape[-1]
  if k < n:
    raise ValueError(f"k={k} samples cannot supply a Best-of-{n}: need k >= n")
  index = jnp.arange(k)
  # [B, i, j]: does sample i beat sample j?
  beats = ((rewards[:, :, None] > rewards[:, None, :]) | ((rewards[:, :, None] == rewards[:, None, :]) &
                                                          (index[:, None] < index[None, :])))
  beaten = jnp.sum(beats, axis=-1)
  # C(b, n - 1) / C(k, n) for b = 0..k-1, exact in float64 on the host (k and n are static)
  table = jnp.asarray([math.comb(b, n - 1) / math.comb(k, n) for b in range(k)], jnp.float32)
  return table[beaten]


def iterative_best_of(n: int, num_anchor_updates: int) -> int:
  """Best-of-n distilled M times in a row is Best-of-(n^M) of pi_ref (the max of maxes is a max)."""
  check_best_of("n", n)
  return int(n)**int(num_anchor_updates)
