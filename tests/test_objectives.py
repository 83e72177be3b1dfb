"""Tests of bond_jax.objectives: loss values, gradient signs and noise, anchor updates, validation.

The response space here is an enumerated categorical (S atoms, conftest.py's `distinct_space`); the objectives only ever see sequence
log-probs, so an autoregressive structure adds nothing to these checks (it is used in test_update.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax import best_of_n, objectives as obj


def _kl(logp, logq):
  return float(jnp.sum(jnp.exp(logp) * (logp - logq)))


# ------------------------------------------------------------------------------------------------------
# Exact Best-of-N law.

# ------------------------------------------------------------------------------------------------------
# Quantiles, selection, baselines.


def test_leave_one_out_baseline():
  grouped = jnp.array([[1.0, 2.0, 6.0], [0.0, 4.0, 8.0]])
  np.testing.assert_allclose(obj.leave_one_out_baseline(grouped), [[4.0, 3.5, 1.5], [6.0, 4.0, 2.0]])
  single = jnp.array([[1.0], [2.0], [6.0]])  # one sample per prompt: across the batch
  np.testing.assert_allclose(obj.leave_one_out_baseline(single), [[4.0], [3.5], [1.5]])
  with pytest.raises(ValueError, match="needs >= 2"):
    obj.leave_one_out_baseline(jnp.array([1.0]))


# ------------------------------------------------------------------------------------------------------
# Loss values and gradients.


def _categorical_logprob(logits, indices):
  return jax.nn.log_softmax(logits)[indices]


def test_forward_gradient_is_the_kl_gradient(distinct_space):
  ref_logprobs, rewards = distinct_space
  n, draws = 4, 40_000
  log_bon = best_of_n.best_of_n_log_density(ref_logprobs, rewards, n)
  samples = jax.random.categorical(jax.random.key(1), log_bon, shape=(draws,))
  logits = ref_logprobs  # pi = pi_ref
  grad = jax.grad(lambda th: obj.forward_kl_loss(_categorical_logprob(th, samples)))(logits)
  exact = jnp.exp(logits) - jnp.exp(log_bon)  # d KL(pi_BoN || softmax(th)) / d th
  assert float(jnp.max(jnp.abs(grad - exact))) < 0.01


def _forward_gradients(ref_logprobs, rewards, logits, forward_estimator, n=4, k=16, draws=20_000):
  """Per-prompt gradients [draws, S] of a forward estimator on k samples of pi_ref (base = pi_ref)."""
  samples = jax.random.categorical(jax.random.key(5), ref_logprobs, shape=(draws, k))

  def loss(th, sample):
    logprobs = _categorical_logprob(th, sample)[None]
    if forward_estimator == "all_k":
      weights = best_of_n.best_of_n_weights(rewards[sample][None], n)
      return obj.weighted_forward_kl_loss(logprobs, ref_logprobs[sample][None], weights)[0]
    best, _ = best_of_n.select_best(rewards[sample][None, :n])
    return obj.forward_kl_loss(logprobs[0, best])

  return jax.vmap(jax.grad(loss), in_axes=(None, 0))(logits, samples)


def test_weighted_forward_gradient_is_the_kl_gradient_with_a_fraction_of_the_noise(distinct_space):
  """Both estimators average to d KL(pi_BoN || pi) / d logits; all k samples, less the importance weight,
  cut the per-prompt noise ~10x near pi_ref and ~60x at pi = pi_BoN, where the best-of-n NLL's stays."""
  ref_logprobs, rewards = distinct_space
  n = 4
  log_bon = best_of_n.best_of_n_log_density(ref_logprobs, rewards, n)
  near_ref = ref_logprobs + 0.3 * jax.random.normal(jax.random.key(2), ref_logprobs.shape)
  noise = {}
  for name, logits in (("near pi_ref", near_ref), ("pi_BoN", log_bon)):
    exact = jax.nn.softmax(logits) - jnp.exp(log_bon)
    for estimator in obj.FORWARD_ESTIMATORS:
      grads = _forward_gradients(ref_logprobs, rewards, logits, estimator, n=n)
      error = float(jnp.max(jnp.abs(jnp.mean(grads, axis=0) - exact)))
      noise[name, estimator] = float(jnp.sum(jnp.var(grads, axis=0)))
      print(f"{name:12s} {estimator:9s}: max |mean - exact| {error:.4f}, noise {noise[name, estimator]:.4f}")
      assert error < 0.004
  assert noise["near pi_ref", "all_k"] < 0.15 * noise["near pi_ref", "best_of_n"]
  assert noise["pi_BoN", "all_k"] < 0.03 * noise["pi_BoN", "best_of_n"]


def test_backward_gradient_is_the_kl_gradient(distinct_space):
  ref_logprobs, rewards = distinct_space
  n, draws = 4, 100_000
  logits = ref_logprobs + 0.3 * jax.random.normal(jax.random.key(2), ref_logprobs.shape)
  log_pi = jax.nn.log_softmax(logits)
  samples = jax.random.categorical(jax.random.key(3), log_pi, shape=(draws, 1))
  _, p_less_equal = best_of_n.exact_quantiles(ref_logprobs, rewards)

  def surrogate(th):
    loss, _ = obj.backward_kl_loss(_categorical_logprob(th, samples), ref_logprobs[samples],
                                   jnp.log(p_less_equal)[samples], n)
    return loss

  grad = jax.grad(surrogate)(logits)
  # Target of the estimator: q ~ pi_ref * p_<=^(n-1); d KL(pi || q) / d th = pi * (log pi - log q - KL).
  log_q = jax.nn.log_softmax(ref_logprobs + (n - 1) * jnp.log(p_less_equal))
  kl = jnp.sum(jnp.exp(log_pi) * (log_pi - log_q))
  exact = jnp.exp(log_pi) * (log_pi - log_q - kl)
  cosine = jnp.dot(grad, exact) / (jnp.linalg.norm(grad) * jnp.linalg.norm(exact))
  assert float(cosine) > 0.97
  assert float(jnp.max(jnp.abs(grad - exact))) < 0.15 * float(jnp.max(jnp.abs(exact)))


def test_anchor_kl_regularizer_step_lowers_kl(distinct_space):
  anchor_logprobs, _ = distinct_space
  logits = anchor_logprobs + 0.5 * jax.random.normal(jax.random.key(4), anchor_logprobs.shape)
  samples = jax.random.categorical(jax.random.key(5), jax.nn.log_softmax(logits), shape=(50_000,))
  kl = lambda th: _kl(jax.nn.log_softmax(th), anchor_logprobs)

  def reg(th):
    return obj.anchor_kl_regularizer(_categorical_logprob(th, samples), anchor_logprobs[samples])

  grad = jax.grad(reg)(logits)
  exact = jax.grad(lambda th: jnp.sum(jax.nn.softmax(th) * (jax.nn.log_softmax(th) - anchor_logprobs)))(
      logits)
  assert float(jnp.dot(grad, exact) / (jnp.linalg.norm(grad) * jnp.linalg.norm(exact))) > 0.95
  before = kl(logits)
  assert kl(logits - 1.0 * grad) < before - 1e-3  # descending loss_reg lowers KL(pi || anchor)
  assert kl(logits + 1.0 * grad) > before + 1e-3  # the printed Algorithm 2 sign would raise it


def _jbond_example():
  policy_logprobs = jnp.array([-1.0, -2.0, -3.0, -0.5])
  anchor_logprobs = jnp.array([-1.5, -2.0, -2.0, -1.0])
  policy_rewards = jnp.array([0.0, 1.0, 2.0, 5.0])
  anchor_rewards = jnp.array([[1.0, 2.0], [1.0, 3.0], [2.0, 2.0], [0.0, 9.0]])
  best_anchor_logprobs = jnp.array([-2.0, -1.0, -1.5, -3.0])
  return policy_logprobs, anchor_logprobs, policy_rewards, anchor_rewards, best_anchor_logprobs


def test_jbond_loss_values_and_strict_penalty():
  args = _jbond_example()
  policy_logprobs, anchor_logprobs, _, _, best_anchor_logprobs = args
  loss, metrics = obj.jbond_loss(*args, beta=0.5, gamma=2.0, baseline="none")
  # Only sample 0 is strictly below both anchors; sample 1 equals the worse anchor (no penalty).
  r_j = np.array([-math.log(16.0), 0.0, 0.0, 0.0])
  log_ratio = np.asarray(policy_logprobs - anchor_logprobs)
  returns = r_j - log_ratio
  loss_bw = -np.mean(np.asarray(policy_logprobs) * returns)
  loss_fw = -np.mean(np.asarray(best_anchor_logprobs))
  loss_reg = np.mean(np.asarray(policy_logprobs) * log_ratio)
  assert float(metrics["penalty_rate"]) == pytest.approx(0.25)
  assert float(metrics["loss_backward"]) == pytest.approx(loss_bw, rel=1e-6)
  assert float(metrics["loss_forward"]) == pytest.approx(loss_fw, rel=1e-6)
  assert float(metrics["loss_reg"]) == pytest.approx(loss_reg, rel=1e-6)
  assert float(loss) == pytest.approx(0.5 * loss_fw + 0.5 * loss_bw + 2.0 * loss_reg, rel=1e-6)
  assert float(metrics["kl_policy_anchor"]) == pytest.approx(np.mean(log_ratio), rel=1e-6)
  assert float(metrics["anchor_tie_rate"]) == pytest.approx(0.25)
  assert float(metrics["policy_tie_rate"]) == pytest.approx(0.5)  # samples 1 and 2 equal the worse anchor
  # The LOO baseline changes the value of the surrogate but not its expected gradient.
  _, metrics_loo = obj.jbond_loss(*args, beta=0.5, gamma=2.0, baseline="loo")
  advantage = returns - (returns.sum() - returns) / 3
  assert float(metrics_loo["loss_backward"]) == pytest.approx(
      -np.mean(np.asarray(policy_logprobs) * advantage), rel=1e-5)


def test_jbond_penalty_rate_is_one_third_when_policy_is_anchor():
  rewards = jax.random.normal(jax.random.key(6), (30_000, 3))
  zeros = jnp.zeros(30_000)
  _, metrics = obj.jbond_loss(zeros, zeros, rewards[:, 0], rewards[:, 1:], zeros, beta=0.5)
  assert float(metrics["penalty_rate"]) == pytest.approx(1 / 3, abs=0.01)


def test_bond_loss_values():
  policy_logprobs = jnp.array([[-1.0], [-2.0], [-1.5]])
  base_logprobs = jnp.array([[-1.2], [-1.0], [-1.5]])
  policy_rewards = jnp.array([[0.5], [2.0], [-1.0]])
  base_rewards = jnp.array([[0.0, 1.0, 3.0]] * 3)  # k = 3
  best_logprobs = jnp.array([-0.5, -0.7, -0.9])
  loss, metrics = obj.bond_loss(policy_logprobs, base_logprobs, policy_rewards, base_rewards, best_logprobs,
                                n=4, beta=0.25, baseline="none")
  quantiles = np.array([2, 3, 1]) / 4.0
  log_ratio = np.array([0.2, -1.0, 0.0])
  returns = 3 * np.log(quantiles) - log_ratio
  loss_bw = -np.mean(np.array([-1.0, -2.0, -1.5]) * returns)
  loss_fw = np.mean([0.5, 0.7, 0.9])
  assert float(loss) == pytest.approx(0.75 * loss_fw + 0.25 * loss_bw, rel=1e-6)
  assert float(metrics["mean_log_quantile"]) == pytest.approx(np.mean(np.log(quantiles)), rel=1e-6)
  assert float(metrics["kl_policy_ref"]) == pytest.approx(np.mean(log_ratio), abs=1e-6)
  assert float(metrics["reward_mean"]) == pytest.approx(0.5, rel=1e-6)
  assert float(metrics["entropy_estimate"]) == pytest.approx(1.5, rel=1e-6)


def test_reinforce_loss_values():
  policy_logprobs = jnp.array([[-1.0, -2.0], [-0.5, -3.0]])
  ref_logprobs = jnp.array([[-1.5, -1.0], [-0.5, -2.0]])
  rewards = jnp.array([[1.0, 0.0], [2.0, 4.0]])
  loss, metrics = obj.reinforce_loss(policy_logprobs, ref_logprobs, rewards, beta_rl=0.1)
  returns = np.asarray(rewards) - 0.1 * np.asarray(policy_logprobs - ref_logprobs)
  advantage = returns - returns[:, ::-1]  # RLOO with 2 samples: the other sample is the baseline
  assert float(loss) == pytest.approx(-np.mean(np.asarray(policy_logprobs) * advantage), rel=1e-6)
  assert float(metrics["kl_policy_ref"]) == pytest.approx(np.mean(np.asarray(policy_logprobs - ref_logprobs)))


def test_losses_report_their_metrics():
  _, bond = obj.bond_loss(jnp.zeros((4, 1)), jnp.zeros((4, 1)), jnp.zeros((4, 1)), jnp.zeros((4, 2)),
                          jnp.zeros(4), n=2, beta=0.5)
  _, bond_all_k = obj.bond_loss(jnp.zeros((4, 1)), jnp.zeros((4, 1)), jnp.zeros((4, 1)), jnp.zeros((4, 2)),
                                jnp.zeros((4, 2)), n=2, beta=0.5, forward_estimator="all_k",
                                target_base_logprobs=jnp.zeros((4, 2)))
  _, jbond = obj.jbond_loss(*_jbond_example(), beta=0.5, ref_logprobs=jnp.zeros(4))
  _, rloo = obj.reinforce_loss(jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.zeros((2, 2)), beta_rl=0.1)
  assert {"loss_forward", "loss_backward", "kl_policy_ref", "mean_log_quantile", "reward_mean",
          "reward_std"} <= set(bond)
  assert set(bond) | {"kl_base_importance", "importance_weight_max", "weights_ess"} == set(bond_all_k)
  assert float(bond_all_k["kl_base_importance"]) == 0.0 and float(bond_all_k["weights_ess"]) == 1.0
  assert {
      "loss_forward", "loss_backward", "loss_reg", "kl_policy_ref", "kl_policy_anchor", "penalty_rate",
      "reward_mean", "reward_std", "anchor_tie_rate"
  } <= set(jbond)
  assert {"loss_pg", "kl_policy_ref", "reward_mean", "reward_std"} <= set(rloo)
  for metrics in (bond, bond_all_k, jbond, rloo):
    assert all(value.shape == () and value.dtype == jnp.float32 for value in metrics.values())


# ------------------------------------------------------------------------------------------------------
# Anchors.


def test_ema_anchor_update_is_exact():
  rng = np.random.default_rng(7)
  anchor = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": [rng.normal(size=5).astype(np.float32)]}
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": [rng.normal(size=5).astype(np.float32)]}
  eta = 0.3
  updated = obj.ema_anchor_update(anchor, params, eta)
  for new, a, p in zip(jax.tree.leaves(updated), jax.tree.leaves(anchor), jax.tree.leaves(params)):
    expected = np.float32(1.0 - eta) * a + np.float32(eta) * p
    np.testing.assert_allclose(new, expected, rtol=2e-7, atol=1e-7)
    assert new.dtype == np.float32
  for new, a in zip(jax.tree.leaves(obj.ema_anchor_update(anchor, params, 0.0)), jax.tree.leaves(anchor)):
    np.testing.assert_array_equal(new, a)
  for new, p in zip(jax.tree.leaves(obj.ema_anchor_update(anchor, params, 1.0)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(new, p)


def test_hard_anchor_update_and_iterated_best_of():
  anchor, params = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
  refreshed = [float(obj.hard_anchor_update(anchor, params, jnp.int32(s), 3)["w"][0]) for s in range(7)]
  assert refreshed == [0, 0, 0, 1, 0, 0, 1]
  assert best_of_n.iterative_best_of(2, 3) == 8 and best_of_n.iterative_best_of(4, 2) == 16


# ------------------------------------------------------------------------------------------------------
# Validation: one-line messages naming the value and what is allowed.


@pytest.mark.parametrize("call, message", [
    (lambda: obj.validate_hparams(beta=1.5), r"beta=1\.5 .*\[0, 1\]"),
    (lambda: obj.validate_hparams(beta=-0.1), r"beta=-0\.1 .*\[0, 1\]"),
    (lambda: obj.validate_hparams(eta=2), r"eta=2 .*\[0, 1\]"),
    (lambda: obj.validate_hparams(gamma=-1.0), r"gamma=-1\.0 .*>= 0"),
    (lambda: obj.validate_hparams(n=1), r"n=1 .*integer n >= 2"),
    (lambda: obj.validate_hparams(n=2.5), r"n=2\.5 .*integer n >= 2"),
    (lambda: obj.validate_hparams(k=0), r"k=0 .*k >= 1"),
    (lambda: obj.validate_hparams(baseline="mean"), r"baseline='mean' .*none, loo"),
    (lambda: obj.validate_hparams(anchor_period=0), r"anchor_period=0 .*>= 1"),
    (lambda: obj.validate_hparams(forward_estimator="all"), r"forward_estimator='all' .*best_of_n, all_k"),
    (lambda: obj.bond_loss(jnp.zeros((2, 1)), jnp.zeros((2, 1)), jnp.zeros((2, 1)), jnp.zeros(
        (2, 3)), jnp.zeros(2), n=2, beta=0.5, forward_estimator="all_k"), r"all_k' needs target_logprobs"),
    (lambda: obj.bond_loss(jnp.zeros((2, 1)), jnp.zeros((2, 1)), jnp.zeros((2, 1)), jnp.zeros(
        (2, 3)), jnp.zeros(2), n=8, beta=1.2), r"beta=1\.2 "),
    (lambda: obj.jbond_loss(*_jbond_example(), beta=0.5, gamma=-0.5), r"gamma=-0\.5 "),
    (lambda: obj.jbond_loss(*_jbond_example()[:3], jnp.zeros((4, 3)), jnp.zeros(4), beta=0.5), r"needs 2"),
    (lambda: obj.reinforce_loss(jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.zeros(
        (2, 2)), beta_rl=-1), r"beta_rl=-1 "),
    (lambda: obj.ema_anchor_update({}, {}, 1.5), r"eta=1\.5 "),
])
def test_bad_inputs_raise_one_line_errors(call, message):
  with pytest.raises(ValueError, match=message) as info:
    call()
  assert "\n" not in str(info.value)
