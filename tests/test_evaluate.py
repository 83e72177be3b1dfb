"""Evaluation against Best-of-N: the order-statistics estimator and the BoN reference lines."""

import math

import numpy as np
import pytest

from bond_jax import evaluate


def test_best_of_n_mean_matches_brute_force_subsets():
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(3, 7))
  for n in (1, 2, 3, 7):
    brute = []
    for row in rewards:  # every n-subset equally likely when drawing without replacement
      import itertools
      brute.append(np.mean([max(c) for c in itertools.combinations(row, n)]))
    np.testing.assert_allclose(evaluate.best_of_n_mean(rewards, n), brute, rtol=1e-12)
  with pytest.raises(ValueError, match="best-of-8 needs 1 <= n <= K=7"):
    evaluate.best_of_n_mean(rewards, 8)


def test_bon_kl_bound_values_from_the_paper():
  assert [round(evaluate.bon_kl_bound(n), 3) for n in (2, 4, 8, 16)] == [0.193, 0.636, 1.204, 1.835]


@pytest.mark.parametrize("n", [1, 4])
def test_a_best_of_n_policy_scores_n_over_n_plus_one(n):
  """A 'policy' whose sample is the best of n fresh reference draws has mean quantile ~ n/(n+1)."""
  rng = np.random.default_rng(n)
  prompts, k = 4000, 100
  reference = rng.normal(size=(prompts, k))
  policy = rng.normal(size=(prompts, n)).max(axis=1)
  out = evaluate.summarize(policy, reference, np.zeros(prompts), np.zeros(prompts), best_of=(1, 2, 4))
  assert abs(out["policy_quantile_mean"] - n / (n + 1)) < 0.015
  assert abs(out["policy_effective_n"] - n) < 0.25 * n
  assert out["best_of_n"]["4"]["reward"] > out["best_of_n"]["2"]["reward"] > out["best_of_n"]["1"]["reward"]
  hist, _ = np.histogram(out["policy_quantiles"], bins=5, range=(0, 1), density=True)
  edges = np.linspace(0, 1, 6)
  expected = (edges[1:]**n - edges[:-1]**n) / 0.2  # Beta(n, 1) mass per bin
  np.testing.assert_allclose(hist, expected, atol=0.15)
  # its law is the nearest Best-of-N law of the table, whatever N it is said to track
  ks = out["quantile_ks_best_of"]
  assert sorted(ks) == ["1", "2", "4"] and min(ks, key=ks.get) == str(n) and ks[str(n)] < 0.03
  assert ks["4"] == evaluate.quantile_ks(np.asarray(out["policy_quantiles"]), k, 4)


def test_ties_count_half_so_the_reference_scores_one_half():
  reference = np.tile(np.array([[0.0, 1.0, 1.0, 2.0]]), (3, 1))
  policy = np.array([1.0, 1.0, 1.0])
  out = evaluate.summarize(policy, reference, np.ones(3), np.zeros(3), best_of=(1,))
  assert out["policy_quantile_mean"] == pytest.approx(0.5)
  assert out["reward_ties_fraction"] == pytest.approx(0.5)
  assert out["kl_policy_ref"] == pytest.approx(1.0)


def test_plots_are_written(tmp_path):
  rng = np.random.default_rng(0)
  out = evaluate.summarize(rng.normal(size=50), rng.normal(size=(50, 16)), np.zeros(50), np.zeros(50),
                           best_of=(1, 2, 4, 8, 16))
  history = [{"step": s, "policy_quantile_mean": 0.5 + s / 100, "kl_policy_ref": s / 50} for s in (0, 10)]
  paths = evaluate.write(out, str(tmp_path), 10, history)
  assert [p.rsplit("/", 1)[1] for p in paths] == ["eval_latest.png", "progress.png"]
  assert all((tmp_path / p.rsplit("/", 1)[1]).stat().st_size > 10_000 for p in paths)
  assert (tmp_path / "eval_000010.json").exists()
  assert math.isfinite(out["policy_log_quantile_mean"])


def test_each_policy_sample_is_ranked_among_its_own_prompts_reference_samples():
  reference = np.array([np.arange(10.0), 100 + np.arange(10.0)])  # prompt 1's samples all beat prompt 0's
  policy = np.array([[5.5, 9.5], [100.5, 200.0]])  # [B=2, M=2]
  out = evaluate.summarize(policy, reference, np.ones((2, 2)), np.zeros((2, 2)), best_of=(1, 2))
  np.testing.assert_allclose(out["policy_quantiles"], [0.6, 1.0, 0.1, 1.0])
  assert out["policy_quantile_mean"] == pytest.approx(0.675)
  assert out["policy_quantile_stderr"] == pytest.approx(np.std([0.6, 1.0, 0.1, 1.0]) / 2)
  assert out["kl_policy_ref"] == pytest.approx(1.0)
  assert out["best_of_n"]["1"]["reward"] == pytest.approx(np.mean(reference))


def test_kl_error_bar_bon_floor_at_effective_n_and_best_of_n_length():
  reference = np.array([[0.0, 1.0, 2.0, 3.0]])  # rewards of 4 reference samples of one prompt
  lengths = np.array([[10.0, 40.0, 20.0, 30.0]])  # their lengths: 10, 40, 20, 30 in reward order
  policy = np.array([[2.5, 0.5]])  # quantiles 3/4 and 1/4 -> mean 1/2, N_eff 1
  out = evaluate.summarize(policy, reference, np.array([[1.0, 3.0]]), np.zeros((1, 2)), best_of=(1, 2, 4),
                           reference_lengths=lengths)
  assert out["kl_policy_ref"] == pytest.approx(2.0)
  assert out["kl_policy_ref_stderr"] == pytest.approx(1.0 / np.sqrt(2))  # std of (1, 3) over sqrt(2)
  assert out["kl_bon_at_effective_n"] == pytest.approx(0.0)
  # Best-of-2 of 4 without replacement: the i-th lowest reward is the max of a pair with prob (i-1)/C(4,2)
  assert out["best_of_n"]["1"]["response_length"] == pytest.approx(25.0)
  assert out["best_of_n"]["2"]["response_length"] == pytest.approx((40 * 1 + 20 * 2 + 30 * 3) / 6)
  assert out["best_of_n"]["4"]["response_length"] == pytest.approx(30.0)
  # the floor at a real-valued N: the KL of Beta(N, 1) against the uniform, log N - (N - 1) / N
  out = evaluate.summarize(np.array([[3.5, 3.5, 3.5, 0.5]]), reference, np.zeros((1, 4)), np.zeros((1, 4)),
                           best_of=(1,))
  n = 0.8125 / 0.1875  # mean quantile (1 + 1 + 1 + 1/4) / 4
  assert out["kl_bon_at_effective_n"] == pytest.approx(math.log(n) - (n - 1) / n)


def test_quantile_ks_is_small_for_best_of_n_and_large_for_another_n():
  # mid-ranks of true Best-of-4 samples among K = 32 reference samples: u ~ Beta(4, 1), count ~ Bin(32, u)
  rng = np.random.default_rng(0)
  quantiles = rng.binomial(32, rng.beta(4, 1, 4000)) / 32
  assert evaluate.quantile_ks(quantiles, 32, 4) < 0.03
  assert evaluate.quantile_ks(quantiles, 32, 1) > 0.4
  assert evaluate.quantile_ks(quantiles, 32, 2) > 0.15
  # the exact law's own CDF steps: every sample at the top count -> distance 1 - P(count < K)
  top = np.ones(10)
  assert evaluate.quantile_ks(top, 4, 1) == pytest.approx(0.8)


def test_rank_law_kl_is_zero_for_pi_ref_and_the_rank_laws_kl_for_best_of_n():
  """Counts of fresh pi_ref samples are uniform on {0..K}: ~0 after the bias correction; Best-of-4's count
  is Beta-binomial(K, 4, 1): its exact KL to the uniform (0.593 at K = 32, under Best-of-4's 0.636)."""
  import scipy.stats
  rng = np.random.default_rng(0)
  k, s = 32, 4000
  assert abs(evaluate.rank_law_kl(rng.integers(0, k + 1, s) / k, k)) < 0.005
  pmf = scipy.stats.betabinom(k, 4, 1).pmf(np.arange(k + 1))
  exact = float(np.sum(pmf * np.log(pmf * (k + 1))))
  assert exact == pytest.approx(0.593, abs=1e-3)
  assert evaluate.rank_law_kl(rng.binomial(k, rng.beta(4, 1, s)) / k, k) == pytest.approx(exact, abs=0.02)
  # all mass on one count (every sample tied with all K: u = 1/2, count 16): log(K + 1), no bias term
  assert evaluate.rank_law_kl(np.full(10, 0.5), k) == pytest.approx(math.log(k + 1), rel=1e-12)


def test_the_share_at_the_length_cap_of_the_policy_pi_ref_and_best_of_n():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from bond_jax import reference_pools, sharding
  from bond_jax.frozen import FrozenModels
  from bond_jax.models import reward, transformer
  from bond_jax.models.config import ModelConfig
  cfg = ModelConfig(vocab_size=16, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_dim=64, max_seq_len=32)
  params = nn.unbox(transformer.init_boxed(cfg, jax.random.key(0)))
  rm_params = {**nn.unbox(reward.init_boxed(cfg, jax.random.key(1))), "head": jnp.ones((cfg.d_model,))}
  frozen = FrozenModels(policy_cfg=cfg, reference_params=params, reward_cfg=cfg, reward_params=rm_params,
                        eos_ids=(1, 2), pad_id=0, mesh=sharding.make_mesh({},
                                                                          jax.devices()[:1]))
  prompts = np.random.default_rng(0).integers(3, 16, (6, 4)).astype(np.int32)
  mask = np.ones_like(prompts, bool)
  pool = reference_pools.draw(frozen, prompts, mask, jax.random.key(2), num_samples=8, max_new_tokens=6)
  out = evaluate.evaluate(frozen, params, prompts, mask, jax.random.key(3), pool, best_of=(1, 2, 8),
                          policy_samples=4, max_new_tokens=6, tracked_n=2, with_best_of_n_kl=True)
  cut = lambda tokens, mask: ~np.any(np.asarray(mask) & np.isin(np.asarray(tokens), (1, 2)), axis=-1)
  reference_cut = cut(pool.tokens, pool.mask)
  assert 0 < reference_cut.mean() < 1  # both kinds of response in the pool (2 of 16 ids end one)
  assert out["reference_truncated_fraction"] == pytest.approx(reference_cut.mean())
  assert out["best_of_n"]["1"]["truncated_fraction"] == pytest.approx(reference_cut.mean())
  best = np.take_along_axis(reference_cut, np.argmax(pool.rewards, axis=1)[:, None], 1)  # Best-of-K = top
  assert out["best_of_n"]["8"]["truncated_fraction"] == pytest.approx(best.mean())
  assert np.all(np.asarray(pool.lengths)[reference_cut] == 6)  # no EOS: the whole budget
  # the policy (= pi_ref here) split by the cap: the two sides' quantiles average to the whole
  share = out["policy_truncated_fraction"]
  assert 0 < share < 1
  whole = share * out["policy_quantile_truncated"] + (1 - share) * out["policy_quantile_ended"]
  assert whole == pytest.approx(out["policy_quantile_mean"])
  # The KLs to Best-of-2 with their SEs: the policy is pi_ref, so E_BoN[log pi - log pi_ref] = 0 on every
  # prompt (KL(BoN || pi) is the bound, SE ~0), and KL(pi || BoN) = KL(pi || ref) - log 2 - E[log F].
  assert out["kl_bon_to_policy"] == pytest.approx(evaluate.bon_kl_bound(2), abs=1e-5)
  assert out["kl_bon_to_policy_stderr"] < 1e-5
  expected = out["kl_policy_ref"] - math.log(2) - out["policy_log_quantile_mean"]
  assert out["kl_policy_to_bon"] == pytest.approx(expected, abs=1e-12)
  assert 0 < out["kl_policy_to_bon_stderr"] < 1
  assert out["kl_policy_ref_exact"] == 0 and out["kl_stopping"] == 0  # pi = pi_ref at every position
  # Another policy: the per-position KL and its stopping part are scoring.response_kl's on the evaluation's
  # own samples (rollout.sample with its key), and estimate what the sampled log-ratio does.
  from bond_jax import rollout, scoring
  other = nn.unbox(transformer.init_boxed(cfg, jax.random.key(5)))
  out = evaluate.evaluate(frozen, other, prompts, mask, jax.random.key(3), pool, best_of=(1, 2),
                          policy_samples=4, max_new_tokens=6)
  samples = rollout.sample(frozen, other, prompts, mask, jax.random.key(3), 4, 6)
  kl, stopping, _ = scoring.response_kl(cfg, other, params, prompts, mask, samples.tokens, samples.mask,
                                        (1, 2))
  assert out["kl_policy_ref_exact"] == pytest.approx(float(jnp.mean(kl)), rel=1e-5)
  assert out["kl_stopping"] == pytest.approx(float(jnp.mean(stopping)), rel=1e-5)
  assert 0 < out["kl_stopping"] < out["kl_policy_ref_exact"]
  assert abs(out["kl_policy_ref_exact"] - out["kl_policy_ref"]) < 4 * out["kl_policy_ref_stderr"]
  # what the reward sees: the rank law's KL from the evaluation's own quantiles; the rest is unseen
  assert out["kl_rank_law"] == evaluate.rank_law_kl(np.asarray(out["policy_quantiles"]), 8)
  assert out["kl_unseen"] == pytest.approx(out["kl_policy_ref_exact"] - out["kl_rank_law"], abs=1e-12)
