"""Tests of bond_jax.best_of_n: the exact Best-of-N law, quantiles, the pick, subset-winning weights.

The response space is an enumerated categorical (S atoms, the `distinct_space` fixture of conftest.py).
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax import best_of_n


def _kl(logp, logq):
  return float(jnp.sum(jnp.exp(logp) * (logp - logq)))


# ------------------------------------------------------------------------------------------------------
# Exact Best-of-N law.


@pytest.mark.parametrize("n", [2, 4, 8])
def test_best_of_n_density_matches_closed_form_and_normalises(distinct_space, n):
  ref_logprobs, rewards = distinct_space
  log_bon = best_of_n.best_of_n_log_density(ref_logprobs, rewards, n)
  p_less, p_less_equal = best_of_n.exact_quantiles(ref_logprobs, rewards)
  # With distinct rewards the tie set of y is {y}: P(max of n lands on y) = p_<=^n - p_<^n.
  closed_form = np.asarray(p_less_equal, np.float64)**n - np.asarray(p_less, np.float64)**n
  np.testing.assert_allclose(np.exp(np.asarray(log_bon)), closed_form, rtol=2e-4, atol=1e-7)
  assert abs(float(jnp.sum(jnp.exp(log_bon))) - 1.0) < 1e-5
  # The no-ties form over-counts repeated draws of an atom: it exceeds eq. 4 and does not sum to 1.
  no_ties = best_of_n.best_of_n_log_density_no_ties(ref_logprobs, rewards, n)
  assert bool(jnp.all(no_ties >= log_bon - 1e-6))
  assert float(jnp.sum(jnp.exp(no_ties))) > 1.0 + 1e-3


@pytest.mark.parametrize("n", [2, 4, 8])
def test_reference_lines_of_section_8(distinct_space, n):
  ref_logprobs, rewards = distinct_space
  log_bon = best_of_n.best_of_n_log_density(ref_logprobs, rewards, n)
  bon = jnp.exp(log_bon)
  bound = math.log(n) - (n - 1) / n
  kl_bon_ref = _kl(log_bon, ref_logprobs)
  assert kl_bon_ref <= bound + 1e-5
  assert kl_bon_ref >= bound - 0.01  # atoms are small here (max 0.046), so the bound is nearly tight
  p_less, p_less_equal = best_of_n.exact_quantiles(ref_logprobs, rewards)
  # The randomised quantile V in [p_<(Y), p_<=(Y)] of a BoN sample is exactly Beta(n, 1): mean n/(n+1),
  # mean log -1/n. So the two quantiles bracket those numbers and p_<= is off by at most the largest atom.
  mean_upper, mean_lower = float(jnp.sum(bon * p_less_equal)), float(jnp.sum(bon * p_less))
  target = n / (n + 1)
  assert mean_lower - 1e-5 <= target <= mean_upper + 1e-5
  assert mean_upper - target <= float(jnp.max(jnp.exp(ref_logprobs)))
  mean_log_upper = float(jnp.sum(bon * jnp.log(p_less_equal)))
  mean_log_lower = float(jnp.sum(bon * jnp.log(jnp.maximum(p_less, 1e-30))))
  assert mean_log_lower <= -1.0 / n <= mean_log_upper + 1e-5


def _simulate_best_of_n(rng, ref_probs, rewards, n, draws, rule):
  samples = rng.choice(len(ref_probs), size=(draws, n), p=ref_probs)
  sample_rewards = rewards[samples]
  if rule == "lowest_index":
    best, _ = best_of_n.select_best(jnp.asarray(sample_rewards))
    best = np.asarray(best)
  else:  # uniform among the tied best
    at_max = sample_rewards == sample_rewards.max(axis=1, keepdims=True)
    best = np.argmax(np.where(at_max, rng.random(at_max.shape), -1.0), axis=1)
  chosen = samples[np.arange(draws), best]
  return np.bincount(chosen, minlength=len(ref_probs)) / draws


@pytest.mark.parametrize("rule", ["lowest_index", "uniform_among_tied"])
def test_tie_corrected_density_matches_best_of_n_simulation(rule):
  """Eq. 4 with ties = the law of argmax with ANY index-only tie rule (see best_of_n_log_density)."""
  rng = np.random.default_rng(1)
  ref_probs = rng.dirichlet(np.ones(12) * 2.0)
  rewards = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4], np.float32)  # heavy ties
  n, draws = 4, 200_000
  freq = _simulate_best_of_n(rng, ref_probs, rewards, n, draws, rule)
  ref_logprobs = jnp.log(jnp.asarray(ref_probs, jnp.float32))
  exact = np.exp(
      np.asarray(best_of_n.best_of_n_log_density(ref_logprobs, jnp.asarray(rewards), n), np.float64))
  sigma = np.sqrt(exact * (1 - exact) / draws) + 1e-6
  assert np.max(np.abs(freq - exact) / sigma) < 5.0
  # The no-ties formula is far off here, so this comparison has teeth.
  no_ties = np.exp(np.asarray(best_of_n.best_of_n_log_density_no_ties(ref_logprobs, jnp.asarray(rewards), n)))
  assert np.max(np.abs(freq - no_ties) / sigma) > 20.0


# ------------------------------------------------------------------------------------------------------
# From k samples: Monte-Carlo quantile, the pick, subset-winning weights.


def test_empirical_quantile_counts_itself_as_floor():
  ref_rewards = jnp.array([[0.1, 0.5, 0.5, 0.9]])  # k = 4
  rewards = jnp.array([[0.0, 0.5, 0.7, 1.0]])
  expected = np.array([[1, 4, 4, 5]]) / 5.0  # (1 + #{r_i <= r}) / (k + 1)
  np.testing.assert_allclose(best_of_n.empirical_quantile(rewards, ref_rewards), expected, rtol=1e-6)
  np.testing.assert_allclose(best_of_n.empirical_quantile(rewards[:, 0], ref_rewards), expected[:, 0],
                             rtol=1e-6)
  assert np.all(np.isfinite(np.log(best_of_n.empirical_quantile(rewards, ref_rewards))))


def test_empirical_quantile_converges_to_p_less_equal(distinct_space):
  ref_logprobs, rewards = distinct_space
  _, p_less_equal = best_of_n.exact_quantiles(ref_logprobs, rewards)
  k, prompts = 4000, 8
  draws = jax.random.categorical(jax.random.key(0), ref_logprobs, shape=(prompts, k))
  estimate = best_of_n.empirical_quantile(jnp.broadcast_to(rewards, (prompts, rewards.shape[0])),
                                          rewards[draws])
  expected = (1.0 + k * p_less_equal) / (k + 1.0)  # E[p_hat]: the floor's bias is (1 - p_<=)/(k + 1)
  sigma = np.sqrt(0.25 / k / prompts)
  assert float(jnp.max(jnp.abs(jnp.mean(estimate, axis=0) - expected))) < 5 * sigma


def test_select_best_takes_lowest_index_and_counts_ties():
  rewards = jnp.array([[1.0, 3.0, 3.0, 2.0], [5.0, 1.0, 2.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
  best, num_at_max = best_of_n.select_best(rewards)
  np.testing.assert_array_equal(best, [1, 0, 0])
  np.testing.assert_array_equal(num_at_max, [2, 1, 4])


def test_best_of_n_weights_are_each_samples_chance_to_win_a_random_subset():
  """w_i = P(sample i is select_best's pick of a uniformly random n-subset), ties included; k = n gives
  back select_best's one-hot."""
  rewards = jnp.array([[0.3, 1.0, 1.0, -2.0, 1.0, 0.5], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
                       [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
  for n in (2, 3, 4):
    exact = np.zeros(rewards.shape)
    subsets = list(itertools.combinations(range(rewards.shape[1]), n))
    for row in range(rewards.shape[0]):
      for subset in subsets:
        winner, _ = best_of_n.select_best(rewards[row, list(subset)])
        exact[row, subset[int(winner)]] += 1 / len(subsets)
    np.testing.assert_allclose(best_of_n.best_of_n_weights(rewards, n), exact, atol=1e-7)
  best, _ = best_of_n.select_best(rewards[:, :3])
  np.testing.assert_array_equal(best_of_n.best_of_n_weights(rewards[:, :3], 3), jax.nn.one_hot(best, 3))


# ------------------------------------------------------------------------------------------------------
# Validation: one-line messages naming the value and what is allowed.


@pytest.mark.parametrize("call, message", [
    (lambda: best_of_n.best_of_n_weights(jnp.zeros((2, 3)), 4), r"k=3 .*Best-of-4"),
    (lambda: best_of_n.best_of_n_log_density(jnp.zeros(3), jnp.zeros(3), 1), r"n=1 "),
    (lambda: best_of_n.empirical_quantile(jnp.zeros((2, 1)), jnp.zeros((2, 0))), r"k=0 "),
    (lambda: best_of_n.iterative_best_of(1, 2), r"n=1 .*integer n >= 2"),
])
def test_bad_inputs_raise_one_line_errors(call, message):
  with pytest.raises(ValueError, match=message) as info:
    call()
  assert "\n" not in str(info.value)
