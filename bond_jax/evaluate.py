"""Policy vs Best-of-N of the reference: the evaluation that says whether BOND worked.

On held-out prompts x [B, P]: M policy samples y per prompt, K reference samples y_1..y_K per prompt, all
scored by the reward model. pi_ref is frozen, so its K samples and their rewards are drawn once per run
(reference_pools.py, a fixed seed: a resumed run reads the same ones) and every evaluation reuses them. From
these:
- the policy's reference quantile u = (#{r(y_i) < r(y)} + #{r(y_i) = r(y)} / 2) / K (a BoN-of-N sample has
  u ~ Beta(N, 1):
  density N u^(N-1), mean N/(N+1)); the policy's "effective N" solves N/(N+1) = mean u;
- the mean reward of Best-of-N of the reference for each N, by the unbiased order-statistics estimator
  over the K samples (no resampling noise): E[max of N] = sum_i r_(i) C(i-1, N-1) / C(K, N);
- KL(pi || pi_ref) = mean(log pi(y) - log pi_ref(y)) against BoN's log N - (N - 1)/N. At the policy's
  effective N this is also a floor: no policy whose sample has BoN-of-N's quantile law can be closer to
  pi_ref (the quantile is a function of y, and KL cannot grow under a function), so KL above it is spent on
  changes the reward model does not see;
- for any quantile law, the same floor measured: the KL of the policy's rank law (the count K u) to pi_ref's,
  uniform on {0..K} (`kl_rank_law`, what the reward sees), and the rest of the per-position KL
  (`kl_unseen` = kl_policy_ref_exact - kl_rank_law: what the policy changed that no reward difference
  pays for; Best-of-N's is 0);
- the response length of Best-of-N of the reference (same estimator as its reward), to tell a policy that
  matches BoN from one that found a cheaper route to the same rewards (e.g. longer responses), and the
  fraction of the policy's, pi_ref's and Best-of-N's responses that run into the max_new_tokens budget
  without an EOS (`truncated_fraction`), with the policy's mean quantile on each side of that line;
- the Kolmogorov-Smirnov distance of the policy's quantiles to those of Best-of-N for the N the policy
  tracks (`quantile_ks`). Ranked among K samples, a BoN-of-N sample's count K u is Beta-binomial(K, N, 1)
  (u ~ Beta(N, 1), then Binomial(K, u)), so the distance is taken to that law: against Beta(N, 1) itself a
  perfect BoN-of-N would sit 0.11 away at K = 32 (0.056 at K = 64) from the rank's graininess alone.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from bond_jax import reference_pools, rewards as rewards_lib, rollout, scoring, sharding
from bond_jax.frozen import FrozenModels


def best_of_n_mean(rewards: np.ndarray, n: int, values: np.ndarray | None = None) -> np.ndarray:
  """[B] expectation over n draws without replacement from each row of rewards [B, K] (needs n <= K) of
  the best draw's reward, or of its entry in `values` [B, K] (e.g. its length) when given."""
  k = rewards.shape[1]
  if not 1 <= n <= k:
    raise ValueError(f"best-of-{n} needs 1 <= n <= K={k} reference samples")
  order = np.argsort(rewards, axis=1, kind="stable")
  ordered = np.take_along_axis(np.asarray(rewards if values is None else values, np.float64), order, axis=1)
  # the i-th lowest of K is the best of an n-subset with probability C(i - 1, n - 1) / C(K, n)
  weights = np.array([math.comb(i, n - 1) for i in range(k)], dtype=np.float64) / math.comb(k, n)
  return ordered @ weights


def bon_kl_bound(n: float) -> float:
  """KL(pi_BoN || pi_ref) without ties: log N - (N - 1) / N (Beirami et al. 2024); N >= 1, real N allowed
  (the KL of the quantile law Beta(N, 1) against the uniform)."""
  return math.log(n) - (n - 1) / n


def _rank_counts(quantiles: np.ndarray, num_reference: int) -> np.ndarray:
  """[S] integer counts c = floor(K u) of mid-rank quantiles among K samples (a half-count tie rounds down)."""
  return np.floor(np.asarray(quantiles, np.float64) * num_reference + 1e-9).astype(np.int64)


def quantile_ks(quantiles: np.ndarray, num_reference: int, n: float) -> float:
  """KS distance between quantiles [S] (mid-ranks among K = num_reference samples, in {0, 1/2K, ..., 1})
  and the law of a Best-of-n sample's mid-rank, Beta-binomial(K, n, 1) / K (module doc; n >= 1 real).

  Both are step functions jumping at the integers c = floor(K u) (a half-count tie rounds down), so the
  largest gap is at one of them.
  """
  counts = _rank_counts(quantiles, num_reference)
  support = np.arange(num_reference + 1)
  empirical = np.searchsorted(np.sort(counts), support, side="right") / len(counts)
  law = scipy.stats.betabinom(num_reference, float(n), 1.0).cdf(support)
  return float(np.max(np.abs(empirical - law)))


def rank_law_kl(quantiles: np.ndarray, num_reference: int) -> float:
  """KL of the law of the rank count c = floor(K u) of quantiles [S] (as quantile_ks counts them) to pi_ref's
  own, uniform on {0, ..., K} (Beta-binomial(K, 1, 1)): the plug-in sum_c p_c log(p_c (K + 1)) less its
  Miller-Madow bias (m - 1) / 2S (m: the counts seen), so S samples of pi_ref itself average ~0.

  A lower bound on KL(pi || pi_ref): c is a function of the response given the pool, the pool and the
  prompt are drawn alike under both, and KL cannot grow under a function or a mixture.
  """
  counts = _rank_counts(quantiles, num_reference)
  p = np.bincount(counts, minlength=num_reference + 1) / len(counts)
  seen = p > 0
  plug_in = float(np.sum(p[seen] * np.log(p[seen] * (num_reference + 1))))
  return plug_in - (int(np.sum(seen)) - 1) / (2 * len(counts))


def _best_of_n_table(reference_rewards: np.ndarray, best_of: Sequence[int]) -> dict[str, dict[str, float]]:
  """{N: reward, quantile_mean, win_rate_vs_ref, kl_bound} of Best-of-N of pi_ref for each N."""
  return {
      str(n): {
          "reward": float(np.mean(best_of_n_mean(reference_rewards, n))),
          "quantile_mean": n / (n + 1),
          "win_rate_vs_ref": n / (n + 1),
          "kl_bound": bon_kl_bound(n)
      } for n in best_of
  }


def summarize(policy_rewards: np.ndarray, reference_rewards: np.ndarray, policy_logprobs: np.ndarray,
              ref_logprobs: np.ndarray, best_of: Sequence[int], reference_lengths: np.ndarray | None = None,
              tracked_n: float | None = None) -> dict[str, Any]:
  """Metrics from policy_rewards [B] or [B, M], reference_rewards [B, K] and the policy samples' sequence
  log-probs under pi and pi_ref ([B] or [B, M]); see the module doc. Each policy sample is ranked among
  the K reference samples of its own prompt. reference_lengths [B, K] (optional) adds Best-of-N's
  response length; tracked_n (the Best-of-N the policy aims at; default its effective N) the KS distance
  of its quantiles to that Best-of-N's."""
  policy_rewards = np.asarray(policy_rewards).reshape(len(reference_rewards), -1)  # [B, M]
  below = np.mean(reference_rewards[:, None, :] < policy_rewards[:, :, None], axis=-1)
  ties = np.mean(reference_rewards[:, None, :] == policy_rewards[:, :, None], axis=-1)
  # Mid-rank: a tie counts half, so one more sample of pi_ref scores exactly 1/2 on average even when
  # identical responses tie (as N/(N+1) says for N = 1); without ties it is p_<= (docs/math.md, Evaluation).
  quantile = (below + 0.5 * ties).ravel()
  mean_u = float(np.mean(quantile))
  effective_n = mean_u / max(1.0 - mean_u, 1e-6)
  log_ratio = (np.asarray(policy_logprobs) - np.asarray(ref_logprobs)).ravel()
  out = {
      "policy_reward":
          float(np.mean(policy_rewards)),
      "policy_reward_stderr":
          float(np.std(policy_rewards) / np.sqrt(policy_rewards.size)),
      "policy_quantile_mean":
          mean_u,
      "policy_quantile_stderr":
          float(np.std(quantile) / np.sqrt(len(quantile))),
      "policy_log_quantile_mean":
          float(np.mean(np.log(np.maximum(quantile, 1.0 / reference_rewards.shape[1])))),
      "policy_win_rate_vs_ref":
          mean_u,
      "policy_effective_n":
          effective_n,
      "kl_policy_ref":
          float(np.mean(log_ratio)),
      "kl_policy_ref_stderr":
          float(np.std(log_ratio) / np.sqrt(len(log_ratio))),
      "kl_bon_at_effective_n":
          bon_kl_bound(max(effective_n, 1.0)),
      "reward_ties_fraction":
          float(np.mean(ties)),
      "reference_reward":
          float(np.mean(reference_rewards)),
      "best_of_n":
          _best_of_n_table(reference_rewards, best_of),
      "policy_quantiles":
          quantile.tolist(),
      "tracked_n":
          float(tracked_n or max(effective_n, 1.0)),
  }
  out["quantile_ks"] = quantile_ks(quantile, reference_rewards.shape[1], out["tracked_n"])
  out["kl_rank_law"] = rank_law_kl(quantile, reference_rewards.shape[1])
  # and to each Best-of-N law of the table: which one the policy's sample follows, whatever it aims at
  out["quantile_ks_best_of"] = {str(n): quantile_ks(quantile, reference_rewards.shape[1], n) for n in best_of}
  if reference_lengths is not None:
    for n in best_of:
      out["best_of_n"][str(n)]["response_length"] = float(
          np.mean(best_of_n_mean(reference_rewards, n, values=reference_lengths)))
  return out


def _host(x) -> np.ndarray:
  return np.asarray(sharding.to_host(x), np.float64)  # rows may live on other processes' devices


def best_of_n_kl(frozen: FrozenModels, policy_params: Any, prompts: jax.Array, prompt_mask: jax.Array,
                 reference: reference_pools.ReferencePool, policy_log_ratio: np.ndarray,
                 quantiles: np.ndarray, n: float) -> dict[str, float]:
  """Both KLs between the policy and Best-of-n of pi_ref (n an integer <= K), with their SEs, from the pool
  and the policy's samples (policy_log_ratio = log pi(y) - log pi_ref(y) and their quantiles, [S]):

      KL(pi_BoN || pi) = log n - (n - 1)/n - E_BoN[log pi(y) - log pi_ref(y)]    (E_BoN[log F] = -1/n)
      KL(pi || pi_BoN) = E_pi[log pi(y) - log pi_ref(y) - (n - 1) log F(r(y))] - log n

  E_BoN by the order-statistics weights over the pool's K samples (`best_of_n_mean`), one estimate per
  prompt (the first SE is over prompts); F(r(y)) by the policy sample's quantile among them, floored at 1/K
  (a small upward bias of the second KL where quantiles are 0; its SE is over the samples).
  """
  _, policy_on_pool = scoring.sequence_logprobs(frozen.policy_cfg, policy_params, prompts, prompt_mask,
                                                reference.tokens, reference.mask)
  log_ratio = _host(policy_on_pool) - _host(reference.ref_logprobs)  # [B, K]
  n = int(n)
  e_bon = best_of_n_mean(reference.rewards, n, values=log_ratio)  # [B]
  log_f = np.log(np.maximum(np.asarray(quantiles, np.float64), 1.0 / reference.rewards.shape[1]))
  backward = np.asarray(policy_log_ratio, np.float64).ravel() - (n - 1) * log_f.ravel()  # [S]
  stderr = lambda x: float(np.std(x) / np.sqrt(x.size))
  return {
      "kl_bon_to_policy": math.log(n) - (n - 1) / n - float(np.mean(e_bon)),
      "kl_bon_to_policy_stderr": stderr(e_bon),
      "kl_policy_to_bon": float(np.mean(backward)) - math.log(n),
      "kl_policy_to_bon_stderr": stderr(backward),
  }


def _ran_to_the_cap(frozen: FrozenModels, tokens: jax.Array, mask: jax.Array) -> np.ndarray:
  """[B, N] float: 1 where a response [B, N, T] has no EOS, i.e. it ran into the max_new_tokens budget."""
  eos = jnp.zeros((frozen.policy_cfg.vocab_size,), bool).at[jnp.asarray(frozen.eos_ids, jnp.int32)].set(True)
  return 1.0 - _host(jnp.any(mask & eos[tokens], axis=-1))


def _at_the_cap(frozen: FrozenModels, policy_tokens, policy_mask, reference: reference_pools.ReferencePool,
                quantiles: np.ndarray, best_of: Sequence[int], best_of_n: dict[str, Any]) -> dict[str, float]:
  """How much of the policy, pi_ref and Best-of-N of pi_ref runs into the response budget (a reward model
  that prefers length prefers those), and the policy's mean quantile on each side of it. Best-of-N's
  fraction goes into best_of_n[N] (order-statistics estimator, as its length)."""
  policy_cut = _ran_to_the_cap(frozen, policy_tokens, policy_mask).ravel()
  reference_cut = _ran_to_the_cap(frozen, reference.tokens, reference.mask)
  for n in best_of:
    best_of_n[str(n)]["truncated_fraction"] = float(
        np.mean(best_of_n_mean(reference.rewards, n, values=reference_cut)))
  out = {
      "policy_truncated_fraction": float(np.mean(policy_cut)),
      "reference_truncated_fraction": float(np.mean(reference_cut))
  }
  for name, where in (("truncated", policy_cut == 1), ("ended", policy_cut == 0)):
    if where.any():  # absent where no sample is on that side
      out[f"policy_quantile_{name}"] = float(np.mean(quantiles[where]))
  return out


def _kl_parts(parts: scoring.ResponseKL) -> dict[str, float]:
  """KL(pi || pi_ref) from the full next-token laws along the policy's samples (scoring.response_kl: the
  lower-variance estimate of what kl_policy_ref samples) and the part of it spent on where to stop: how
  much of the KL buys length."""
  kl, stopping = _host(parts.kl).ravel(), _host(parts.stopping).ravel()
  return {
      "kl_policy_ref_exact": float(np.mean(kl)),
      "kl_policy_ref_exact_stderr": float(np.std(kl) / np.sqrt(kl.size)),
      "kl_stopping": float(np.mean(stopping)),
  }


def evaluate(frozen: FrozenModels, policy_params: Any, prompts: jax.Array, prompt_mask: jax.Array,
             rng: jax.Array, reference: reference_pools.ReferencePool, *, best_of: Sequence[int],
             policy_samples: int, max_new_tokens: int, tracked_n: float | None = None,
             with_best_of_n_kl: bool = False) -> dict[str, Any]:
  """Sample M = policy_samples responses of the policy per prompt [B, P], score them, rank them against
  the `reference` pool of the same prompts, then `summarize` (and `best_of_n_kl` at the tracked N when
  asked: it scores the pool's K samples under the policy, ~K / M times the cost of the sampling)."""
  if max(best_of) > reference.rewards.shape[1]:
    raise ValueError(f"best_of={tuple(best_of)} needs at least {max(best_of)} reference samples per prompt; "
                     f"the pool has {reference.rewards.shape[1]}")
  policy = rollout.sample(frozen, policy_params, prompts, prompt_mask, rng, policy_samples, max_new_tokens)
  policy_rewards = rewards_lib.score(frozen, prompts, prompt_mask, policy.tokens, policy.mask)
  # one pi_ref forward serves the sampled log-ratio (log pi_ref(y)) and the per-position KL
  parts = scoring.response_kl(frozen.policy_cfg, policy_params, frozen.reference_params, prompts, prompt_mask,
                              policy.tokens, policy.mask, frozen.eos_ids)
  policy_logprobs = jnp.sum(policy.model_logprobs, axis=-1)
  out = summarize(_host(policy_rewards), reference.rewards, _host(policy_logprobs), _host(parts.ref_logprobs),
                  best_of=best_of, reference_lengths=reference.lengths, tracked_n=tracked_n)
  out.update(_kl_parts(parts))
  out["kl_unseen"] = out["kl_policy_ref_exact"] - out["kl_rank_law"]
  out["policy_response_length"] = float(jnp.mean(policy.lengths))
  out["reference_response_length"] = float(np.mean(reference.lengths))
  out.update(
      _at_the_cap(frozen, policy.tokens, policy.mask, reference, np.asarray(out["policy_quantiles"]), best_of,
                  out["best_of_n"]))
  if with_best_of_n_kl:
    log_ratio = _host(policy_logprobs) - _host(parts.ref_logprobs)
    out.update(
        best_of_n_kl(frozen, policy_params, prompts, prompt_mask, reference, log_ratio,
                     np.asarray(out["policy_quantiles"]), out["tracked_n"]))
  return out


def write(result: dict[str, Any], out_dir: str, step: int, history: Sequence[dict[str, Any]] = (),
          others: dict[str, dict[str, Any]] | None = None) -> list[str]:
  """Write eval_<step>.json (`result` and, under their names, the `others` sets' results) and PNG plots
  (BoN curve, quantile histogram, progress over training)."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"eval_{step:06d}.json"), "w") as f:
    json.dump({"step": step, **result, **(others or {})}, f, indent=1)
  return plot(result, out_dir, step, history, others)


def plot(result: dict[str, Any], out_dir: str, step: int, history: Sequence[dict[str, Any]],
         others: dict[str, dict[str, Any]] | None = None) -> list[str]:
  """eval_latest.png (reward vs N, the quantile histogram, KL vs N), eval_latest_<name>.png for each of
  `others` and, given a history, progress.png."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = [os.path.join(out_dir, "eval_latest.png")]
  _plot_evaluation(plt, result, step, paths[0])
  for name, other in (others or {}).items():
    paths.append(os.path.join(out_dir, f"eval_latest_{name}.png"))
    _plot_evaluation(plt, other, step, paths[-1], f" ({name.replace('_', ' ')})")
  if history:
    paths.append(os.path.join(out_dir, "progress.png"))
    _plot_progress(plt, history, paths[-1])
  return paths


def _plot_evaluation(plt, result: dict[str, Any], step: int, path: str, where: str = "") -> None:
  ns = sorted(int(n) for n in result["best_of_n"])
  bon = [result["best_of_n"][str(n)] for n in ns]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  ax = axes[0]
  ax.plot(ns, [b["reward"] for b in bon], "o-", label="Best-of-N of pi_ref")
  ax.axhline(result["policy_reward"], color="C3",
             label=f"policy, 1 sample (N_eff={result['policy_effective_n']:.2f})")
  ax.set(xscale="log", xlabel="N", ylabel="mean reward", title=f"reward, step {step}{where}")
  _integer_ticks(ax, ns)
  ax.legend(fontsize=8)
  ax = axes[1]
  u = np.asarray(result["policy_quantiles"])
  ax.hist(u, bins=10, range=(0, 1), density=True, alpha=0.5, color="C3", label="policy")
  grid = np.linspace(0, 1, 101)
  for n in (1, 2, 4):
    ax.plot(grid, n * grid**(n - 1), label=f"BoN-{n}: {n} u^{n - 1}")
  if "tracked_n" in result:
    n = result["tracked_n"]
    ax.plot(grid, n * grid**(n - 1), "k:", label=f"tracked BoN-{n:.2f} (KS {result['quantile_ks']:.3f})")
  ax.set(xlabel="reference quantile u", ylabel="density", title="quantile of the policy's sample")
  ax.legend(fontsize=8)
  ax = axes[2]
  grid_n = np.geomspace(1, max(ns), 100)
  ax.plot(grid_n, [bon_kl_bound(n) for n in grid_n], "-", color="C0", label="BoN: log N - (N-1)/N")
  ax.plot(ns, [b["kl_bound"] for b in bon], "o", color="C0")
  ax.errorbar([max(result["policy_effective_n"], 1.0)], [result["kl_policy_ref"]],
              yerr=[2 * result.get("kl_policy_ref_stderr", 0.0)], fmt="o", color="C3", zorder=3,
              label="policy at its N_eff (+-2 SE)")
  ax.set(xscale="log", xlabel="N", ylabel="KL(. || pi_ref) nats", title="KL")
  _integer_ticks(ax, ns)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _plot_progress(plt, history: Sequence[dict[str, Any]], path: str) -> None:
  steps = [h["step"] for h in history]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  axes[0].errorbar(steps, [h["policy_quantile_mean"] for h in history],
                   yerr=[2 * h.get("policy_quantile_stderr", 0.0) for h in history], fmt="o-", color="C3",
                   label="policy (+-2 SE)")
  has_target = all("target_best_of" in h for h in history)
  if has_target:
    axes[0].plot(steps, [h["target_best_of"] / (h["target_best_of"] + 1) for h in history], ":", color="C2",
                 label="the Best-of-N the algorithm aims at")
  axes[0].legend(fontsize=8)
  for n in (1, 2, 4):
    axes[0].axhline(n / (n + 1), ls="--", color="gray")
    axes[0].text(steps[0], n / (n + 1), f" BoN-{n}", va="bottom", fontsize=8)
  axes[0].set(xlabel="step", ylabel="mean reference quantile", title="policy vs Best-of-N")
  axes[1].errorbar(steps, [h["kl_policy_ref"] for h in history],
                   yerr=[2 * h.get("kl_policy_ref_stderr", 0.0) for h in history], fmt="o-", color="C3",
                   label="policy (+-2 SE)")
  if has_target:
    axes[1].plot(steps, [bon_kl_bound(h["target_best_of"]) for h in history], ":", color="C2",
                 label="the Best-of-N the algorithm aims at")
  if all("kl_bon_at_effective_n" in h for h in history):
    axes[1].plot(steps, [h["kl_bon_at_effective_n"] for h in history], "s--", color="C0",
                 label="BoN at the policy's N_eff")
  axes[1].legend(fontsize=8)
  for n in (2, 4):
    axes[1].axhline(bon_kl_bound(n), ls="--", color="gray")
    axes[1].text(steps[0], bon_kl_bound(n), f" BoN-{n} KL", va="bottom", fontsize=8)
  axes[1].set(xlabel="step", ylabel="KL(pi || pi_ref) nats", title="KL to the reference")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _integer_ticks(ax, ns):
  from matplotlib.ticker import NullFormatter
  ax.set_xticks(ns, [str(n) for n in ns])
  ax.xaxis.set_minor_formatter(NullFormatter())
