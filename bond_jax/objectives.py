"""BOND objectives as pure functions: the BOND / J-BOND / RLOO losses and the anchor updates.

Paper: "BOND: Aligning LLMs with Best-of-N Distillation", Sessa et al. 2024 (arXiv 2407.14622); equation
numbers are the paper's, the derivations and sign traps are in docs/math.md.

Conventions shared by every function here:
  * Every log-probability is SEQUENCE level: the sum over the response tokens of log-softmax(logits) at
    temperature 1 of the distribution the samples were actually drawn from. Token-level values are never
    accepted: a loss fed token log-probs would be silently wrong.
  * `B` is the number of prompts, `M` the number of policy samples per prompt, `k` the number of reference
    (or anchor) samples per prompt used for quantiles.
  * Losses return `(loss, metrics)`; metrics are scalars, already stop-gradiented.
  * Static hyper-parameters (n, beta, gamma, eta, k) are validated in Python, before tracing; a traced value
    skips validation (check it once, where the config is read, with `validate_hparams`).

Leave-one-out baseline (`baseline="loo"`): for returns of shape [B, M] with M >= 2 the baseline of a sample
is the mean return of the OTHER samples of the same prompt (RLOO); with M == 1 (J-BOND's single policy
sample per prompt) it is the mean over the other prompts of the batch, as in the paper.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from bond_jax import best_of_n

Array = jax.Array
Metrics = dict[str, Array]

# J-BOND's penalty for a policy sample worse than both anchor samples: E[r_J] = log p_<= at the median.
JBOND_PENALTY = math.log(16.0)
BASELINES = ("none", "loo")
# BOND's forward-KL estimators (`bond_loss`): the best of the first n base samples (eq. 13), or all k of them
# weighted by their chance to be a Best-of-n, less the policy's importance weight (`weighted_forward_kl_loss`)
FORWARD_ESTIMATORS = ("best_of_n", "all_k")
# The estimator of the KL term in every policy-gradient return (BOND's KL to pi_base, J-BOND's to the
# anchor, RLOO's to pi_ref): the sampled log-ratio (eq. 15), or the exact KL of each position's next-token
# law along the sample (`backward_kl_loss`)
KL_ESTIMATORS = ("sampled", "per_position")

# --------------------------------------------------------------------------------------------------------
# Validation of static hyper-parameters (Python level, never inside jit).


def _check_unit_interval(name: str, value: Any) -> None:
  if best_of_n.is_static_number(value) and not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{name}={value} is out of range: {name} must be in [0, 1]")


def _check_non_negative(name: str, value: Any) -> None:
  if best_of_n.is_static_number(value) and value < 0:
    raise ValueError(f"{name}={value} is negative: {name} must be >= 0")


def _check_baseline(baseline: str) -> None:
  if baseline not in BASELINES:
    raise ValueError(f"baseline={baseline!r} is unknown: allowed are {', '.join(BASELINES)}")


def validate_hparams(*, n: Any = None, beta: Any = None, eta: Any = None, gamma: Any = None, k: Any = None,
                     beta_rl: Any = None, baseline: str | None = None, anchor_period: Any = None,
                     forward_estimator: str | None = None, kl_estimator: str | None = None) -> None:
  """Raises ValueError (one line, naming the value and what is allowed) for an invalid hyper-parameter.

  n: Best-of-n (integer >= 2); beta: Jeffreys mix in [0, 1]; eta: EMA rate in [0, 1]; gamma: anchor-KL
  weight >= 0; k: quantile sample count (integer >= 1); beta_rl: RLHF KL weight >= 0; anchor_period:
  hard anchor period of iterative BOND (integer >= 1); forward_estimator: one of FORWARD_ESTIMATORS;
  kl_estimator: one of KL_ESTIMATORS. None = not given.
  """
  if n is not None:
    best_of_n.check_best_of("n", n)
  if beta is not None:
    _check_unit_interval("beta", beta)
  if eta is not None:
    _check_unit_interval("eta", eta)
  if gamma is not None:
    _check_non_negative("gamma", gamma)
  if beta_rl is not None:
    _check_non_negative("beta_rl", beta_rl)
  if k is not None and (int(k) != k or k < 1):
    raise ValueError(f"k={k} is not allowed: the quantile needs an integer k >= 1 reference samples")
  if baseline is not None:
    _check_baseline(baseline)
  if anchor_period is not None and (int(anchor_period) != anchor_period or anchor_period < 1):
    raise ValueError(f"anchor_period={anchor_period} is not allowed: it must be an integer >= 1")
  if forward_estimator is not None and forward_estimator not in FORWARD_ESTIMATORS:
    raise ValueError(f"forward_estimator={forward_estimator!r} is unknown: allowed are "
                     f"{', '.join(FORWARD_ESTIMATORS)}")
  if kl_estimator is not None and kl_estimator not in KL_ESTIMATORS:
    raise ValueError(f"kl_estimator={kl_estimator!r} is unknown: allowed are {', '.join(KL_ESTIMATORS)}")


def leave_one_out_baseline(returns: Array) -> Array:
  """Mean return of the other samples: per prompt for [B, M >= 2], across the batch for [B, 1] or [B].

  Needs at least 2 samples in the group it averages over (static shapes, checked in Python).
  """
  if returns.ndim == 2 and returns.shape[1] >= 2:
    group = returns.shape[1]
    return (jnp.sum(returns, axis=1, keepdims=True) - returns) / (group - 1)
  count = returns.size
  if count < 2:
    raise ValueError(f"leave-one-out baseline over {count} sample: needs >= 2 (or use baseline='none')")
  return (jnp.sum(returns) - returns) / (count - 1)


def _advantage(returns: Array, baseline: str) -> Array:
  _check_baseline(baseline)
  returns = jax.lax.stop_gradient(returns)
  if baseline == "loo":
    return returns - leave_one_out_baseline(returns)
  return returns


def _policy_gradient_surrogate(policy_logprobs: Array, advantage: Array) -> Array:
  """-mean(log pi(y) * A(y)): its gradient is the REINFORCE estimate of -grad E_pi[A] (A held fixed)."""
  return -jnp.mean(policy_logprobs * jax.lax.stop_gradient(advantage))


def _kl_in_return(policy_logprobs: Array, base_logprobs: Array,
                  position_kl: Array | None) -> tuple[Array, Array, Array, Metrics]:
  """The KL term of a policy-gradient return, by its estimator (`backward_kl_loss` explains both):
  (the sampled log-ratio log pi - log pi_base, the KL term R subtracts, the loss's direct part, metrics);
  all but the direct part constants. Sampled: (log-ratio, log-ratio, 0, {}); per position: (log-ratio,
  K, mean(K), {kl_per_position})."""
  log_ratio = jax.lax.stop_gradient(policy_logprobs - base_logprobs)
  if position_kl is None:
    return log_ratio, log_ratio, jnp.zeros((), log_ratio.dtype), {}
  mean = jnp.mean(position_kl)
  return log_ratio, jax.lax.stop_gradient(position_kl), mean, {"kl_per_position": mean}


def _mean_std(x: Array) -> tuple[Array, Array]:
  return jnp.mean(x), jnp.std(x)


def _stop(metrics: Mapping[str, Array]) -> Metrics:
  return {name: jax.lax.stop_gradient(jnp.asarray(value, jnp.float32)) for name, value in metrics.items()}


# --------------------------------------------------------------------------------------------------------
# BOND: forward KL, backward KL, Jeffreys mix (eqs. 11-15).


def forward_kl_loss(best_logprobs: Array) -> Array:
  """Forward-KL term (eq. 13): NLL of Best-of-N reference samples under the policy.

  Args:
    best_logprobs: [B] log pi(y_best), y_best the best of N samples of pi_ref (or of the anchor).
  Returns:
    scalar loss; its gradient is that of KL(pi_BoN || pi) (up to a constant).
  """
  return -jnp.mean(best_logprobs)


def weighted_forward_kl_loss(target_logprobs: Array, target_base_logprobs: Array,
                             weights: Array) -> tuple[Array, Metrics]:
  """Forward-KL term (eq. 13) on all k samples of pi_base, with the policy's importance weight subtracted.

      loss = -mean_b sum_i (w_i - sg(c_i)) log pi(y_i),   c_i = min(rho_i, k) / k,
      rho_i = pi(y_i) / pi_base(y_i),   y_1..y_k ~ pi_base(.|x),   w = best_of_n_weights

  E[sum_i w_i grad log pi(y_i)] = E_{Best-of-n}[grad log pi] (the U-statistic), and
  E[sum_i rho_i / k grad log pi(y_i)] = E_pi[grad log pi] = 0: the gradient estimates grad KL(pi_BoN || pi)
  as `forward_kl_loss`'s does. Why subtract a term of mean zero: a sequence's score grad log pi(y) is large
  and mostly noise; at the fixed point pi = pi_BoN, rho = n p^(n-1) makes rho_i / k track w_i, so the two
  cancel and the noise vanishes there, where `forward_kl_loss`'s stays that of one sample's score and keeps
  the policy random-walking (spending KL that buys no reward). The cap min(rho, k) (bias only where pi puts
  more than k times pi_base's mass on a sample; Best-of-n's rho never exceeds n <= k) bounds a coefficient
  by 1, as w's. The loss's value is not a KL (its expectation moves with pi): read the metrics.

  Args:
    target_logprobs: [B, k] log pi of the k base samples (differentiable).
    target_base_logprobs: [B, k] log pi_base of the same samples (a constant).
    weights: [B, k] from `best_of_n_weights`.
  Returns:
    (loss, metrics): kl_base_importance (mean over prompts of (1/k) sum_i rho_i log rho_i, an importance
    estimate of KL(pi || pi_base) from the base's samples), importance_weight_max, weights_ess (mean
    1 / sum_i w_i^2).
  """
  k = target_logprobs.shape[-1]
  log_ratio = jax.lax.stop_gradient(target_logprobs - target_base_logprobs)
  # exp of a capped log-ratio: the cap above, and no overflow for a sample pi_base finds very unlikely
  ratio = jnp.exp(jnp.minimum(log_ratio, math.log(k)))
  coefficients = jax.lax.stop_gradient(weights) - ratio / k
  bounded = jnp.minimum(log_ratio, 60.0)  # the metrics' exp stays finite in float32
  loss = -jnp.mean(jnp.sum(coefficients * target_logprobs, axis=-1))
  metrics = {
      "kl_base_importance": jnp.mean(jnp.sum(jnp.exp(bounded) * bounded, axis=-1) / k),
      "importance_weight_max": jnp.exp(jnp.max(bounded)),
      "weights_ess": jnp.mean(1.0 / jnp.sum(jnp.square(weights), axis=-1)),
  }
  return loss, _stop(metrics)


def backward_kl_loss(policy_logprobs: Array, base_logprobs: Array, log_quantiles: Array, n: int,
                     baseline: str = "loo", position_kl: Array | None = None) -> tuple[Array, Metrics]:
  """Backward-KL policy-gradient surrogate (eq. 15) on samples y ~ pi.

      R(y) = (n - 1) * log p_hat(y) - (log pi(y) - log pi_base(y)),   loss = -mean(log pi(y) * sg(R - b))

  Its gradient estimates grad KL(pi || pi_BoN) where pi_BoN = Best-of-n of pi_base (the no-ties form; the
  constant log n cancels in expectation). pi_base is pi_ref for BOND and the anchor for iterative BOND.

  With position_kl (kl_estimator "per_position"): K(y) = sum_t KL(pi(. | h_t) || pi_base(. | h_t)), the
  exact per-position KL along y (scoring.sequence_kl_fn), replaces the sampled log-ratio:

      R(y) = (n - 1) * log p_hat(y) - sg(K(y)),   loss = -mean(log pi(y) * sg(R - b)) + mean(K(y))

  E[K] = KL(pi || pi_base) and grad KL = E[grad log pi * K] + E[sum_t grad KL_t] (the chain rule), so the
  expected gradient is the same; the second part moves every position's whole next-token law back toward
  pi_base's, where the sampled log-ratio pulls only on the one token drawn there and its pull is buried in
  the quantile term's noise (docs/math.md, "The KL term, exactly at each position").

  Args:
    policy_logprobs: [B, M] log pi(y), differentiable.
    base_logprobs: [B, M] log pi_base(y) (treated as a constant).
    log_quantiles: [B, M] log p_hat(y) against samples of pi_base (`empirical_quantile`).
    n: Best-of-n, static >= 2.
    baseline: "loo" or "none".
    position_kl: optional [B, M] K(y), differentiable (see above).
  Returns:
    (loss, metrics) with return_mean, kl_estimate (mean log pi - log pi_base), mean_log_quantile, and
    kl_per_position (mean K) with position_kl.
  """
  best_of_n.check_best_of("n", n)
  log_ratio, kl_term, direct, kl_metrics = _kl_in_return(policy_logprobs, base_logprobs, position_kl)
  returns = (n - 1) * log_quantiles - kl_term
  loss = _policy_gradient_surrogate(policy_logprobs, _advantage(returns, baseline)) + direct
  metrics = {
      "return_mean": jnp.mean(returns),
      "kl_estimate": jnp.mean(log_ratio),
      "mean_log_quantile": jnp.mean(log_quantiles),
      **kl_metrics
  }
  return loss, _stop(metrics)


def bond_loss(policy_logprobs: Array, base_logprobs: Array, policy_rewards: Array, base_rewards: Array,
              target_logprobs: Array, *, n: int, beta: float, baseline: str = "loo",
              ref_logprobs: Array | None = None, forward_estimator: str = "best_of_n",
              target_base_logprobs: Array | None = None,
              position_kl: Array | None = None) -> tuple[Array, Metrics]:
  """Jeffreys BOND loss (eq. 11): (1 - beta) * forward + beta * backward.

  Args:
    policy_logprobs: [B, M] log pi of M samples y ~ pi per prompt (differentiable).
    base_logprobs: [B, M] log pi_base of the same samples (pi_ref; the anchor in iterative BOND).
    policy_rewards: [B, M] r(y).
    base_rewards: [B, k] rewards of k samples of pi_base, for the quantiles (eq. 10).
    target_logprobs: the forward term's samples of pi_base under the policy (differentiable): [B] log pi
      of the best of the first n (forward_estimator "best_of_n", eq. 13), or [B, k] of all k, in
      base_rewards' order ("all_k": `weighted_forward_kl_loss`).
    n, beta: static; n >= 2, beta in [0, 1] (0 = forward KL only, 1 = backward KL only).
    baseline: "loo" or "none" (backward term).
    ref_logprobs: optional [B, M] log pi_ref of the policy samples, for the kl_policy_ref metric when the
      base is an anchor (defaults to base_logprobs).
    forward_estimator: one of FORWARD_ESTIMATORS (static).
    target_base_logprobs: [B, k] log pi_base of the k base samples; "all_k" only.
    position_kl: optional [B, M] exact per-position KL to pi_base along the policy samples, differentiable:
      the backward term's KL estimator "per_position" (`backward_kl_loss`).
  Returns:
    (loss, metrics): loss_forward, loss_backward, kl_policy_base, kl_policy_ref, mean_log_quantile,
    mean_quantile, return_mean, reward_mean, reward_std, entropy_estimate (and "all_k"'s metrics).
  """
  validate_hparams(n=n, beta=beta, baseline=baseline, forward_estimator=forward_estimator)
  quantiles = best_of_n.empirical_quantile(policy_rewards, base_rewards)
  log_quantiles = jnp.log(quantiles)
  forward_metrics = {}
  if forward_estimator == "all_k":
    if target_base_logprobs is None or target_logprobs.shape != base_rewards.shape:
      raise ValueError(f"forward_estimator='all_k' needs target_logprobs of every base sample "
                       f"{tuple(base_rewards.shape)} and their target_base_logprobs")
    loss_forward, forward_metrics = weighted_forward_kl_loss(target_logprobs, target_base_logprobs,
                                                             best_of_n.best_of_n_weights(base_rewards, n))
  else:
    loss_forward = forward_kl_loss(target_logprobs)
  loss_backward, backward_metrics = backward_kl_loss(policy_logprobs, base_logprobs, log_quantiles, n,
                                                     baseline, position_kl)
  loss = (1.0 - beta) * loss_forward + beta * loss_backward
  reward_mean, reward_std = _mean_std(policy_rewards)
  ref = base_logprobs if ref_logprobs is None else ref_logprobs
  metrics = {
      "loss_forward": loss_forward,
      "loss_backward": loss_backward,
      "kl_policy_base": backward_metrics["kl_estimate"],
      "kl_policy_ref": jnp.mean(policy_logprobs - ref),
      "mean_log_quantile": backward_metrics["mean_log_quantile"],
      "mean_quantile": jnp.mean(quantiles),
      "return_mean": backward_metrics["return_mean"],
      "reward_mean": reward_mean,
      "reward_std": reward_std,
      "entropy_estimate": -jnp.mean(policy_logprobs),
      **forward_metrics,
  }
  if "kl_per_position" in backward_metrics:
    metrics["kl_per_position"] = backward_metrics["kl_per_position"]
  return loss, _stop(metrics)


# --------------------------------------------------------------------------------------------------------
# J-BOND (Algorithm 2).


def anchor_kl_regularizer(policy_logprobs: Array, anchor_logprobs: Array,
                          position_kl: Array | None = None) -> Array:
  """loss_reg = mean(log pi(y) * sg(log pi(y) - log pi_anchor(y))), y ~ pi.

  Its gradient is E_pi[grad log pi * (log pi - log pi_anchor)] = grad KL(pi || anchor), so DEscending it
  lowers the KL. (Algorithm 2 as printed has the opposite sign, which would raise the KL; eq. 19 and the
  text want it lowered.) With position_kl K(y) (kl_estimator "per_position", see `backward_kl_loss`):
  mean(log pi(y) * sg(K(y))) + mean(K(y)), the same expected gradient.

  Args:
    policy_logprobs: [B] or [B, M], differentiable.
    anchor_logprobs: same shape, constant.
    position_kl: optional, same shape, differentiable: sum_t KL(pi(. | h_t) || anchor(. | h_t)) along y.
  """
  if position_kl is not None:
    return jnp.mean(policy_logprobs * jax.lax.stop_gradient(position_kl)) + jnp.mean(position_kl)
  log_ratio = jax.lax.stop_gradient(policy_logprobs - anchor_logprobs)
  return jnp.mean(policy_logprobs * log_ratio)


def jbond_loss(policy_logprobs: Array, anchor_logprobs: Array, policy_rewards: Array, anchor_rewards: Array,
               best_anchor_logprobs: Array, *, beta: float, gamma: float = 0.0, baseline: str = "loo",
               penalty: float = JBOND_PENALTY, ref_logprobs: Array | None = None,
               position_kl: Array | None = None) -> tuple[Array, Metrics]:
  """J-BOND loss (Algorithm 2): 1 policy sample and 2 anchor samples per prompt.

      forward:  loss_fw  = -mean(log pi(y'_best)),   y'_best = better of the 2 anchor samples
      backward: r_J(y)   = -penalty if r(y) < min(r(y'_1), r(y'_2)) (strict) else 0
                R(y)     = r_J(y) - (log pi(y) - log pi_anchor(y)),  loss_bw = -mean(log pi(y) sg(R - b))
      regulariser (gamma >= 0): loss_reg = `anchor_kl_regularizer` (lowers KL(pi || anchor))
      loss = (1 - beta) * loss_fw + beta * loss_bw + gamma * loss_reg
  position_kl K(y) = sum_t KL(pi(. | h_t) || anchor(. | h_t)) (kl_estimator "per_position") replaces the
  log-ratio in R and loss_reg, and loss_bw gains mean(K): the same expected gradients (`backward_kl_loss`).

  Args:
    policy_logprobs: [B] log pi(y), y ~ pi (differentiable).
    anchor_logprobs: [B] log pi_anchor(y) of the same samples (constant).
    policy_rewards: [B] r(y).
    anchor_rewards: [B, 2] rewards of the 2 anchor samples.
    best_anchor_logprobs: [B] log pi of the better anchor sample (pick it with `select_best`).
    beta in [0, 1], gamma >= 0: static. penalty: log 16 in the paper.
    baseline: "loo" (mean return of the other prompts) or "none".
    ref_logprobs: optional [B] log pi_ref(y), for the kl_policy_ref metric. position_kl: [B] K(y) or None.
  Returns:
    (loss, metrics): loss_forward, loss_backward, loss_reg, penalty_rate, kl_policy_anchor,
    [kl_policy_ref], anchor_tie_rate, policy_tie_rate, return_mean, reward_mean, reward_std,
    anchor_reward_mean, entropy_estimate.
  """
  validate_hparams(beta=beta, gamma=gamma, baseline=baseline)
  if anchor_rewards.shape[-1] != 2:
    raise ValueError(f"anchor_rewards has {anchor_rewards.shape[-1]} samples per prompt: J-BOND needs 2")
  worst_anchor = jnp.min(anchor_rewards, axis=-1)
  penalized = policy_rewards < worst_anchor
  log_ratio, kl_term, direct, kl_metrics = _kl_in_return(policy_logprobs, anchor_logprobs, position_kl)
  returns = jnp.where(penalized, -penalty, 0.0) - kl_term
  loss_forward = forward_kl_loss(best_anchor_logprobs)
  loss_backward = _policy_gradient_surrogate(policy_logprobs, _advantage(returns, baseline)) + direct
  loss_reg = anchor_kl_regularizer(policy_logprobs, anchor_logprobs, position_kl)
  loss = (1.0 - beta) * loss_forward + beta * loss_backward + gamma * loss_reg
  reward_mean, reward_std = _mean_std(policy_rewards)
  metrics = {
      "loss_forward": loss_forward,
      "loss_backward": loss_backward,
      "loss_reg": loss_reg,
      "penalty_rate": jnp.mean(penalized),
      "kl_policy_anchor": jnp.mean(log_ratio),
      # Ties silence the strict-< penalty (docs/math.md, Ties): report them.
      "anchor_tie_rate": jnp.mean(anchor_rewards[..., 0] == anchor_rewards[..., 1]),
      "policy_tie_rate": jnp.mean(policy_rewards == worst_anchor),
      "return_mean": jnp.mean(returns),
      "reward_mean": reward_mean,
      "reward_std": reward_std,
      "anchor_reward_mean": jnp.mean(anchor_rewards),
      "entropy_estimate": -jnp.mean(policy_logprobs),
      **kl_metrics,
  }
  if ref_logprobs is not None:
    metrics["kl_policy_ref"] = jnp.mean(policy_logprobs - ref_logprobs)
  return loss, _stop(metrics)


# --------------------------------------------------------------------------------------------------------
# REINFORCE / RLOO baseline (section 7).


def reinforce_loss(policy_logprobs: Array, ref_logprobs: Array, rewards: Array, *, beta_rl: float,
                   baseline: str = "loo", position_kl: Array | None = None) -> tuple[Array, Metrics]:
  """REINFORCE on R = r - beta_rl * (log pi - log pi_ref), leave-one-out baseline (RLOO). With position_kl
  K(y) (kl_estimator "per_position", `backward_kl_loss`): R = r - beta_rl * sg(K), plus beta_rl * mean(K).

  Args:
    policy_logprobs: [B, M] log pi(y), y ~ pi (M = 2 in the paper), differentiable.
    ref_logprobs: [B, M] log pi_ref(y), constant.
    rewards: [B, M].
    beta_rl: static >= 0. baseline: "loo" or "none".
    position_kl: optional [B, M] sum_t KL(pi(. | h_t) || pi_ref(. | h_t)) along y, differentiable.
  Returns:
    (loss, metrics): loss_pg, kl_policy_ref, return_mean, reward_mean, reward_std, entropy_estimate.
  """
  validate_hparams(beta_rl=beta_rl, baseline=baseline)
  log_ratio, kl_term, direct, kl_metrics = _kl_in_return(policy_logprobs, ref_logprobs, position_kl)
  returns = rewards - beta_rl * kl_term
  loss = _policy_gradient_surrogate(policy_logprobs, _advantage(returns, baseline)) + beta_rl * direct
  reward_mean, reward_std = _mean_std(rewards)
  metrics = {
      "loss_pg": loss,
      "kl_policy_ref": jnp.mean(log_ratio),
      "return_mean": jnp.mean(returns),
      "reward_mean": reward_mean,
      "reward_std": reward_std,
      "entropy_estimate": -jnp.mean(policy_logprobs),
      **kl_metrics
  }
  return loss, _stop(metrics)


# --------------------------------------------------------------------------------------------------------
# Anchors: EMA (J-BOND) and hard periodic updates (iterative BOND, Algorithm 1).


def ema_anchor_update(anchor_params: Any, params: Any, eta: float) -> Any:
  """theta_anchor <- (1 - eta) * theta_anchor + eta * theta, leaf by leaf (eta in [0, 1]).

  eta = 0 keeps the anchor and eta = 1 copies the policy, bit for bit.
  """
  validate_hparams(eta=eta)
  return jax.tree.map(lambda anchor, theta: ((1.0 - eta) * anchor + eta * theta).astype(anchor.dtype),
                      anchor_params, params)


def hard_anchor_update(anchor_params: Any, params: Any, step: Array, period: int) -> Any:
  """Iterative BOND: the anchor becomes the policy when `step` (updates done so far) hits a multiple of
  `period`, otherwise stays. jit-friendly (step may be traced)."""
  validate_hparams(anchor_period=period)
  refresh = (step > 0) & (step % period == 0)
  return jax.tree.map(lambda anchor, theta: jnp.where(refresh, theta, anchor), anchor_params, params)
