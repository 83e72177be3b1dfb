"""Tests of bond_jax.update on a tabular autoregressive policy whose response space is enumerated.

Responses are all 3**4 = 81 token sequences; a policy is a table of logits per prefix, so every KL below is
EXACT (a sum over the 81 sequences) while training uses only the sampled estimators, as on a real model.
Compilation dominates the cost here, so each trainer is compiled once (module fixtures, vmap over seeds
and betas) and whole training runs are lax.scan loops.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from bond_jax import best_of_n
from bond_jax import objectives as obj
from bond_jax import update as upd
from configs import dialogue

VOCAB, LENGTH = 3, 4
ALL_SEQUENCES = jnp.asarray(list(itertools.product(range(VOCAB), repeat=LENGTH)), jnp.int32)  # [81, 4]
NUM_SEQUENCES = ALL_SEQUENCES.shape[0]
NUM_PREFIXES = sum(VOCAB**t for t in range(LENGTH))  # one logits row per prefix of length 0..LENGTH-1

_rng = np.random.default_rng(0)
REF_TABLE = jnp.asarray(_rng.normal(size=(NUM_PREFIXES, VOCAB)) * 0.7, jnp.float32)
REWARDS = jnp.asarray(_rng.normal(size=NUM_SEQUENCES), jnp.float32)  # distinct


def prefix_rows(tokens):
  """[..., T] tokens -> [..., T] row of the logits table used to sample token t (its prefix's index)."""
  code = jnp.zeros(tokens.shape[:-1], jnp.int32)
  rows = []
  for t in range(tokens.shape[-1]):
    rows.append((VOCAB**t - 1) // (VOCAB - 1) + code)  # prefixes of length t start after shorter ones
    code = code * VOCAB + tokens[..., t]
  return jnp.stack(rows, axis=-1)


def tabular_logprob(table, tokens, mask):
  """sequence_logprob_fn of the tabular policy: sum_t mask * log softmax(table[prefix_t])[token_t]."""
  token_logprobs = jax.nn.log_softmax(table, axis=-1)[prefix_rows(tokens), tokens]
  return jnp.sum(token_logprobs * mask, axis=-1)


def tabular_kl(table, base_table, tokens, mask):
  """sequence_kl_fn of the tabular policy: (log pi(y), log base(y), sum_t KL(pi(. | y_<t) || base(. | y_<t)))."""
  rows = prefix_rows(tokens)
  laws = [jax.nn.log_softmax(t, axis=-1)[rows] for t in (table, jax.lax.stop_gradient(base_table))]
  chosen = [jnp.take_along_axis(law, tokens[..., None], axis=-1)[..., 0] for law in laws]
  kl = jnp.sum(jnp.exp(laws[0]) * (laws[0] - laws[1]), axis=-1)
  return tuple(jnp.sum(x * mask, axis=-1) for x in (*chosen, kl))


def all_logprobs(table):
  return tabular_logprob(table, ALL_SEQUENCES, jnp.ones(ALL_SEQUENCES.shape, jnp.float32))


def sample_sequences(key, table, shape):
  """Exact samples of the autoregressive policy, drawn at sequence level by inverse CDF (cheap on CPU)."""
  cdf = jnp.cumsum(jnp.exp(all_logprobs(table)))
  u = jax.random.uniform(key, shape) * cdf[-1]
  return jnp.minimum(jnp.searchsorted(cdf, u), NUM_SEQUENCES - 1)


def exact_kl(logp, logq):
  return jnp.sum(jnp.exp(logp) * (logp - logq))


REF_LOGPROBS = all_logprobs(REF_TABLE)


def bond_batch(key, params, base_table, n, k, prompts, forward_estimator="best_of_n"):
  """M = 1 policy sample per prompt and k base samples. best_of_n: one pool shared by all prompts (they are
  all the same prompt here) for the quantiles, and the best of n fresh base samples per prompt as the
  forward target; all_k: k base samples per prompt, both the quantiles' pool and the targets."""
  policy_key, pool_key, best_key = jax.random.split(key, 3)
  policy = sample_sequences(policy_key, params, (prompts, 1))
  if forward_estimator == "all_k":
    pool = sample_sequences(pool_key, base_table, (prompts, k))
    targets = pool
  else:
    pool = jnp.broadcast_to(sample_sequences(pool_key, base_table, (1, k)), (prompts, k))
    candidates = sample_sequences(best_key, base_table, (prompts, n))
    best_index, _ = best_of_n.select_best(REWARDS[candidates])
    targets = jnp.take_along_axis(candidates, best_index[:, None], axis=1)
  return upd.BondBatch(policy_tokens=ALL_SEQUENCES[policy], policy_mask=jnp.ones(
      (prompts, 1, LENGTH)), policy_rewards=REWARDS[policy], base_rewards=REWARDS[pool],
                       target_tokens=ALL_SEQUENCES[targets], target_mask=jnp.ones(targets.shape + (LENGTH,)))


def jbond_batch(key, params, anchor_table, prompts):
  policy_key, anchor_key = jax.random.split(key)
  policy = sample_sequences(policy_key, params, (prompts,))
  anchor = sample_sequences(anchor_key, anchor_table, (prompts, 2))
  return upd.JBondBatch(policy_tokens=ALL_SEQUENCES[policy], policy_mask=jnp.ones(
      (prompts, LENGTH)), policy_rewards=REWARDS[policy], anchor_tokens=ALL_SEQUENCES[anchor],
                        anchor_mask=jnp.ones((prompts, 2, LENGTH)), anchor_rewards=REWARDS[anchor])


# ------------------------------------------------------------------------------------------------------
# BOND with sampled estimators converges to the exact Best-of-N law.

BOND_N, BOND_STEPS, BOND_PROMPTS, BOND_LR = 8, 600, 256, 0.1


def bond_trainer(k, forward_estimator="best_of_n", prompts=BOND_PROMPTS, kl_estimator="sampled"):
  """jit(vmap(train)) over (beta, key): returns the exact log pi over all sequences after training."""
  optimizer = upd.make_optimizer(
      upd.OptimizerConfig(learning_rate=BOND_LR, warmup_steps=10, schedule="cosine", decay_steps=BOND_STEPS,
                          end_lr_fraction=0.02, max_grad_norm=0.0))

  def train(beta, key):
    # beta is traced (vmapped), so validation is skipped here; it is checked in test_step_builders_validate.
    step = upd.make_bond_step(tabular_logprob, optimizer, n=BOND_N, beta=beta, donate=False,
                              forward_estimator=forward_estimator,
                              sequence_kl_fn=tabular_kl if kl_estimator == "per_position" else None)

    def body(state, key):
      return step(state, REF_TABLE,
                  bond_batch(key, state.params, REF_TABLE, BOND_N, k, prompts, forward_estimator))

    state, _ = jax.lax.scan(body, upd.init_train_state(REF_TABLE, optimizer),
                            jax.random.split(key, BOND_STEPS))
    return all_logprobs(state.params)

  return jax.jit(jax.vmap(train))


def _kl_summary(policy_logprobs, bon_logprobs):
  return (float(exact_kl(bon_logprobs, policy_logprobs)), float(exact_kl(policy_logprobs, bon_logprobs)),
          float(exact_kl(policy_logprobs, REF_LOGPROBS) - exact_kl(bon_logprobs, REF_LOGPROBS)))


@pytest.fixture(scope="module")
def bond_runs():
  """k = 512: betas 0, 0.5, 1 and two more beta = 1 seeds (for the k table); k = 16 and 4: beta = 1."""
  betas = jnp.array([0.0, 0.5, 1.0, 1.0, 1.0])
  large_k = bond_trainer(512)(betas, jax.random.split(jax.random.key(1), 5))
  small_k = {k: bond_trainer(k)(jnp.ones(3), jax.random.split(jax.random.key(2), 3)) for k in (16, 4)}
  return {"by_beta": dict(zip([0.0, 0.5, 1.0], large_k[:3])), "by_k": {512: large_k[2:], **small_k}}


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bond_matches_exact_best_of_n(bond_runs, beta):
  bon = best_of_n.best_of_n_log_density(REF_LOGPROBS, REWARDS, BOND_N)
  forward, backward, kl_ref_gap = _kl_summary(bond_runs["by_beta"][beta], bon)
  print(f"beta={beta}: KL(BoN||pi)={forward:.4f} KL(pi||BoN)={backward:.4f} "
        f"KL(pi||ref)-KL(BoN||ref)={kl_ref_gap:+.4f}")
  assert forward < 0.05 and backward < 0.05
  assert abs(kl_ref_gap) < 0.05


def test_quantile_sample_count_bias(bond_runs):
  """Backward-only BOND (beta = 1): fewer reference samples k -> a worse fit (Monte-Carlo quantile bias)."""
  bon = best_of_n.best_of_n_log_density(REF_LOGPROBS, REWARDS, BOND_N)
  table = {}
  print("\n   k  KL(BoN||pi)  KL(pi||BoN)  KL(pi||ref)-KL(BoN||ref)   (beta=1, N=8, mean of 3 seeds)")
  for k in (512, 16, 4):
    rows = np.array([_kl_summary(logprobs, bon) for logprobs in bond_runs["by_k"][k]])
    table[k] = rows.mean(axis=0)
    print(f"{k:4d}  {table[k][0]:11.4f}  {table[k][1]:11.4f}  {table[k][2]:+24.4f}")
  assert table[4][1] > table[512][1] + 0.005 and table[4][1] > table[16][1]
  assert table[16][1] > table[512][1] - 0.002  # monotone-ish: the k = 16 bias is small at N = 8
  # The floor biases p_hat up for low-reward samples, so small k under-optimises: KL(pi||ref) falls short.
  assert table[4][2] < table[512][2] - 0.05


# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def all_k_runs():
  """forward_estimator all_k, k = 16 samples per prompt, a quarter of the prompts: beta 0 and 0.5."""
  betas = jnp.array([0.0, 0.5])
  runs = bond_trainer(16, "all_k", BOND_PROMPTS // 4)(betas, jax.random.split(jax.random.key(3), 2))
  return dict(zip([0.0, 0.5], runs))


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_bond_all_k_matches_exact_best_of_n(all_k_runs, beta):
  """The weighted forward term (16 samples of pi_ref per prompt, 64 prompts a step) fits Best-of-8 as the
  best-of-n one does from 256 prompts (test_bond_matches_exact_best_of_n); at beta 0.5 the backward
  term's k = 16 quantiles leave their small bias (test_quantile_sample_count_bias)."""
  bon = best_of_n.best_of_n_log_density(REF_LOGPROBS, REWARDS, BOND_N)
  forward, backward, kl_ref_gap = _kl_summary(all_k_runs[beta], bon)
  print(f"all_k beta={beta}: KL(BoN||pi)={forward:.4f} KL(pi||BoN)={backward:.4f} "
        f"KL(pi||ref)-KL(BoN||ref)={kl_ref_gap:+.4f}")
  assert forward < 0.01 and backward < 0.02 and abs(kl_ref_gap) < 0.05


# ------------------------------------------------------------------------------------------------------
# The backward term's KL estimated exactly at each position (kl_estimator "per_position").


def test_per_position_kl_gradient_is_the_kl_gradient_with_less_noise():
  """backward_kl_loss's KL part (log p_hat = 0) on samples of an autoregressive policy: the sampled
  log-ratio and the exact per-position KL (direct gradient + its sum as the return) both average to
  d KL(pi || pi_ref) / d table (exact, by enumeration); the per-position one with a fraction of the noise."""
  table = REF_TABLE + 0.4 * jax.random.normal(jax.random.key(30), REF_TABLE.shape)
  draws = 40_000
  samples = ALL_SEQUENCES[sample_sequences(jax.random.key(31), table, (draws,))]
  ones = jnp.ones((LENGTH,))

  def per_sample_grad(kl_estimator):

    def loss(th, tokens):
      logp, base_logp, kl = tabular_kl(th, REF_TABLE, tokens[None, None], ones[None, None])
      position_kl = kl if kl_estimator == "per_position" else None
      return obj.backward_kl_loss(logp, base_logp, jnp.zeros_like(logp), 2, "none", position_kl)[0]

    return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(table, samples)

  exact = jax.grad(lambda th: exact_kl(all_logprobs(th), REF_LOGPROBS))(table)
  scale = float(jnp.max(jnp.abs(exact)))
  noise = {}
  for kl_estimator in obj.KL_ESTIMATORS:
    grads = per_sample_grad(kl_estimator)
    error = float(jnp.max(jnp.abs(jnp.mean(grads, axis=0) - exact)))
    noise[kl_estimator] = float(jnp.sum(jnp.var(grads, axis=0)))
    print(
        f"{kl_estimator:12s}: max |mean - exact| {error:.4f} (of {scale:.3f}), noise {noise[kl_estimator]:.4f}"
    )
    assert error < 0.05 * scale
  assert noise["per_position"] < 0.5 * noise["sampled"]


def test_bond_with_per_position_kl_matches_exact_best_of_n():
  """Backward-only BOND with the per-position KL estimator reaches the exact Best-of-8, as the sampled one
  does (test_bond_matches_exact_best_of_n)."""
  (logprobs,) = bond_trainer(512, kl_estimator="per_position")(jnp.ones(1),
                                                               jax.random.split(jax.random.key(1), 1))
  bon = best_of_n.best_of_n_log_density(REF_LOGPROBS, REWARDS, BOND_N)
  forward, backward, kl_ref_gap = _kl_summary(logprobs, bon)
  print(f"per_position beta=1: KL(BoN||pi)={forward:.4f} KL(pi||BoN)={backward:.4f} "
        f"KL(pi||ref)-KL(BoN||ref)={kl_ref_gap:+.4f}")
  assert forward < 0.05 and backward < 0.05 and abs(kl_ref_gap) < 0.05


# ------------------------------------------------------------------------------------------------------
# Iterative BOND: m hard anchor periods of Best-of-2 give Best-of-2^m.

ITER_PERIOD, ITER_PROMPTS, ITER_LR = 250, 256, 0.1


@pytest.fixture(scope="module")
def iterative_runs():
  # A cosine cycle per anchor period, so each period ends with a small learning rate.
  cosine = lambda count: 0.5 * (1 + jnp.cos(jnp.pi * (count % ITER_PERIOD) / ITER_PERIOD))
  schedule = lambda count: ITER_LR * (0.02 + 0.98 * cosine(count))
  optimizer = optax.adam(schedule)
  step = upd.make_bond_step(tabular_logprob, optimizer, n=2, beta=0.5, anchor_period=ITER_PERIOD,
                            donate=False)

  @jax.jit
  def one_period(state, key):

    def body(state, key):
      return step(state, REF_TABLE, bond_batch(key, state.params, state.anchor_params, 2, 512, ITER_PROMPTS))

    state, metrics = jax.lax.scan(body, state, jax.random.split(key, ITER_PERIOD))
    return state, metrics

  state = upd.init_train_state(jnp.copy(REF_TABLE), optimizer, anchor_params=REF_TABLE)
  results = []
  for period in (1, 2, 3):
    state, metrics = one_period(state, jax.random.key(10 + period))
    results.append((int(state.step), all_logprobs(state.params), all_logprobs(state.anchor_params), metrics))
  return results


@pytest.mark.parametrize("periods", [1, 2, 3])
def test_iterative_bond_reaches_best_of_2_to_the_m(iterative_runs, periods):
  step, policy_logprobs, anchor_logprobs, metrics = iterative_runs[periods - 1]
  assert step == periods * ITER_PERIOD
  np.testing.assert_array_equal(policy_logprobs, anchor_logprobs)  # the anchor just moved to the policy
  bon = best_of_n.best_of_n_log_density(REF_LOGPROBS, REWARDS, best_of_n.iterative_best_of(2, periods))
  forward, backward, kl_ref_gap = _kl_summary(policy_logprobs, bon)
  print(f"m={periods}: KL(Bo{2**periods}||pi)={forward:.4f} KL(pi||Bo{2**periods})={backward:.4f}")
  assert forward < 0.05 and backward < 0.05 and abs(kl_ref_gap) < 0.05
  # kl_policy_ref is measured against pi_ref even though the base is the anchor (pi_ref in period 1).
  kl_ref, kl_base = float(metrics["kl_policy_ref"][-1]), float(metrics["kl_policy_base"][-1])
  assert kl_ref == pytest.approx(kl_base, abs=1e-5) if periods == 1 else kl_ref > kl_base + 0.05


# ------------------------------------------------------------------------------------------------------
# J-BOND with an EMA anchor.

JBOND_CHUNK, JBOND_CHUNKS, JBOND_PROMPTS, JBOND_ETA = 50, 6, 256, 0.02


@pytest.fixture(scope="module")
def jbond_curve():
  optimizer = upd.make_optimizer(upd.OptimizerConfig(learning_rate=0.05, warmup_steps=10, max_grad_norm=0.0))
  step = upd.make_jbond_step(tabular_logprob, optimizer, beta=0.5, gamma=0.5, eta=JBOND_ETA, donate=False)
  _, ref_quantile = best_of_n.exact_quantiles(REF_LOGPROBS, REWARDS)

  @jax.jit
  def chunk(state, key):

    def body(state, key):
      return step(state, REF_TABLE, jbond_batch(key, state.params, state.anchor_params, JBOND_PROMPTS))

    state, metrics = jax.lax.scan(body, state, jax.random.split(key, JBOND_CHUNK))
    logprobs = all_logprobs(state.params)
    mean_quantile = jnp.sum(jnp.exp(logprobs) * ref_quantile)  # exact E_pi[p_<=(y)] against pi_ref
    return state, jax.tree.map(jnp.mean, metrics), mean_quantile, exact_kl(logprobs, REF_LOGPROBS)

  state = upd.init_train_state(jnp.copy(REF_TABLE), optimizer, anchor_params=REF_TABLE)
  curve = [(0, float(jnp.sum(jnp.exp(REF_LOGPROBS) * ref_quantile)), 0.0, None)]
  for index in range(JBOND_CHUNKS):
    state, metrics, mean_quantile, kl_ref = chunk(state, jax.random.key(100 + index))
    curve.append((int(state.step), float(mean_quantile), float(kl_ref), metrics))
  return curve


def test_jbond_raises_quantile_and_kl_grows_smoothly(jbond_curve):
  print("\nstep  E_pi[p_<=]  KL(pi||ref)  penalty_rate  KL(pi||anchor)   BoN-2^(eta*T) quantile")
  for step, quantile, kl_ref, metrics in jbond_curve[1:]:
    target = 2**(JBOND_ETA * step)
    print(f"{step:4d}  {quantile:10.4f}  {kl_ref:11.4f}  {float(metrics['penalty_rate']):12.3f}  "
          f"{float(metrics['kl_policy_anchor']):14.4f}   {target / (target + 1):.4f}")
  quantiles = np.array([point[1] for point in jbond_curve])
  kls = np.array([point[2] for point in jbond_curve])
  assert np.all(np.diff(quantiles) > 0.002), quantiles  # up at every evaluation point
  kl_steps = np.diff(kls)
  assert np.all(kl_steps > 0.0) and np.all(kl_steps < 1.0), kls
  assert np.all(np.abs(np.diff(kl_steps)) < 0.4), kls  # no jumps
  metrics = [point[3] for point in jbond_curve[1:]]
  assert all(float(m["penalty_rate"]) < 1 / 3 for m in metrics)  # 1/3 when pi = anchor; falls as pi improves
  assert float(metrics[-1]["penalty_rate"]) < float(metrics[0]["penalty_rate"])
  assert all(0.0 < float(m["kl_policy_anchor"]) < 0.3 for m in metrics)
  assert float(metrics[-1]["kl_policy_ref"]) == pytest.approx(kls[-1], abs=0.3)  # sampled vs exact


@pytest.mark.parametrize("kl_estimator", ["sampled", "per_position"])
def test_jbond_gamma_step_lowers_kl_to_anchor(kl_estimator):
  """One SGD step of the full J-BOND update, gamma = 5 versus gamma = 0 on the same batch, with either
  estimator of the KL to the anchor."""
  policy_table = REF_TABLE + 0.5 * jax.random.normal(jax.random.key(20), REF_TABLE.shape)
  batch = jbond_batch(jax.random.key(21), policy_table, REF_TABLE, 4096)
  kl_fn = tabular_kl if kl_estimator == "per_position" else None

  @jax.jit
  def kl_after_step(gamma):
    step = upd.make_jbond_step(tabular_logprob, optax.sgd(0.5), beta=0.5, gamma=gamma, eta=0.0, donate=False,
                               sequence_kl_fn=kl_fn)
    state = upd.init_train_state(policy_table, optax.sgd(0.5), anchor_params=REF_TABLE)
    state, _ = step(state, None, batch)
    return exact_kl(all_logprobs(state.params), REF_LOGPROBS)

  without, with_gamma = jax.vmap(kl_after_step)(jnp.array([0.0, 5.0]))
  assert float(with_gamma) < float(without) - 0.01


def test_jbond_step_without_pi_ref_is_the_same_update_less_its_kl_metric():
  """measure_ref=False (the distillation stage's unlogged steps) skips pi_ref's forward: the same new state,
  bitwise, and the same metrics but kl_policy_ref."""
  policy_table = REF_TABLE + 0.3 * jax.random.normal(jax.random.key(22), REF_TABLE.shape)
  batch = jbond_batch(jax.random.key(23), policy_table, REF_TABLE, 256)
  results = []
  for measure_ref in (True, False):
    step = upd.make_jbond_step(tabular_logprob, optax.adam(0.1), beta=0.5, gamma=0.5, eta=0.1,
                               measure_ref=measure_ref, donate=False)
    state = upd.init_train_state(policy_table, optax.adam(0.1), anchor_params=policy_table * 0.9)
    results.append(step(state, REF_TABLE, batch))
  (measured, with_kl), (unmeasured, without_kl) = results
  for x, y in zip(jax.tree.leaves(measured), jax.tree.leaves(unmeasured)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert set(with_kl) - set(without_kl) == {"kl_policy_ref"}
  for name, value in without_kl.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(with_kl[name]), err_msg=name)


# ------------------------------------------------------------------------------------------------------
# Sharding, accumulation, non-finite guard, optimizer, validation.

SMALL_OPTIMIZER = upd.OptimizerConfig(learning_rate=0.05, warmup_steps=2, schedule="cosine", decay_steps=10,
                                      eps=1e-3, max_grad_norm=1.0)


def test_sharded_step_equals_single_device_step():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  optimizer = upd.make_optimizer(SMALL_OPTIMIZER)
  batches = [jbond_batch(jax.random.key(30 + i), REF_TABLE, REF_TABLE, 16) for i in range(3)]
  outputs = []
  for sharded in (False, True):
    options = {"mesh": mesh, "batch_sharding": NamedSharding(mesh, PartitionSpec("data"))} if sharded else {}
    step = upd.make_jbond_step(tabular_logprob, optimizer, beta=0.5, gamma=0.5, eta=0.1, **options)
    state = upd.init_train_state(jnp.copy(REF_TABLE), optimizer, anchor_params=REF_TABLE)
    for batch in batches:
      if sharded:
        batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
      state, metrics = step(state, REF_TABLE, batch)
    if sharded:
      assert len(state.params.sharding.device_set) == 8 and metrics["loss"].sharding.is_fully_replicated
    outputs.append((state, metrics))
  (single, single_metrics), (multi, multi_metrics) = outputs
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
  for name in single_metrics:
    np.testing.assert_allclose(single_metrics[name], multi_metrics[name], atol=1e-5, rtol=1e-5)
  assert int(multi.step) == 3 and float(jnp.max(jnp.abs(multi.params - REF_TABLE))) > 1e-3


def test_microbatched_gradient_equals_full_batch():
  optimizer = upd.make_optimizer(SMALL_OPTIMIZER)
  batch = bond_batch(jax.random.key(40), REF_TABLE, REF_TABLE, 4, 16, 32)
  results = []
  for microbatches in (1, 4):
    # No baseline: the loss is then a plain mean, exactly split by microbatches (LOO is per microbatch).
    step = upd.make_bond_step(tabular_logprob, optimizer, n=4, beta=0.5, baseline="none",
                              num_microbatches=microbatches)
    state = upd.init_train_state(jnp.copy(REF_TABLE), optimizer)
    results.append(step(state, REF_TABLE, batch))
  (full, full_metrics), (micro, micro_metrics) = results
  np.testing.assert_allclose(full.params, micro.params, atol=1e-5, rtol=0)
  for name in ("loss", "grad_norm", "loss_forward", "loss_backward", "kl_policy_ref", "mean_log_quantile"):
    np.testing.assert_allclose(full_metrics[name], micro_metrics[name], rtol=1e-5, atol=1e-6)


def test_non_finite_guard_skips_the_step():
  optimizer = upd.make_optimizer(upd.OptimizerConfig(learning_rate=0.05, eps=1e-3))  # no warm-up: lr > 0 now
  step = upd.make_reinforce_step(tabular_logprob, optimizer, beta_rl=0.1, donate=False)
  indices = sample_sequences(jax.random.key(50), REF_TABLE, (8, 2))
  good = upd.ReinforceBatch(policy_tokens=ALL_SEQUENCES[indices], policy_mask=jnp.ones((8, 2, LENGTH)),
                            policy_rewards=REWARDS[indices])
  bad = good.replace(policy_rewards=good.policy_rewards.at[3, 1].set(jnp.nan))
  state = upd.init_train_state(jnp.copy(REF_TABLE), optimizer)
  skipped, metrics = step(state, REF_TABLE, bad)
  assert not np.isfinite(float(metrics["loss"]))
  assert float(metrics["step_skipped"]) == 1.0 and int(skipped.skipped_steps) == 1 and int(skipped.step) == 0
  for before, after in zip(jax.tree.leaves((state.params, state.opt_state)),
                           jax.tree.leaves((skipped.params, skipped.opt_state))):
    np.testing.assert_array_equal(before, after)
  stepped, metrics = step(skipped, REF_TABLE, good)
  assert float(metrics["step_skipped"]) == 0.0 and int(stepped.step) == 1 and int(stepped.skipped_steps) == 1
  assert float(jnp.max(jnp.abs(stepped.params - REF_TABLE))) > 0


def test_jbond_hard_anchor_stays_until_its_period_then_becomes_the_policy():
  optimizer = upd.make_optimizer(upd.OptimizerConfig(learning_rate=0.05))
  step = upd.make_jbond_step(tabular_logprob, optimizer, beta=0.5, gamma=0.0, eta=0.5, anchor_period=3,
                             donate=False)
  state = upd.init_train_state(jnp.copy(REF_TABLE), optimizer, anchor_params=REF_TABLE)
  for index in range(3):
    state, _ = step(state, REF_TABLE,
                    jbond_batch(jax.random.key(70 + index), state.params, state.anchor_params, 8))
    if index < 2:  # eta is ignored: no EMA between refreshes
      np.testing.assert_array_equal(state.anchor_params, REF_TABLE)
  assert int(state.step) == 3 and float(jnp.max(jnp.abs(state.params - REF_TABLE))) > 0
  np.testing.assert_array_equal(state.anchor_params, state.params)


def test_nan_reward_that_leaves_the_loss_finite_still_skips_the_step():
  """J-BOND compares rewards, and comparisons with NaN are False: the loss stays finite. The guard must
  look at the inputs too, or a broken reward model would silently train the policy."""
  optimizer = upd.make_optimizer(upd.OptimizerConfig(learning_rate=0.05))
  step = upd.make_jbond_step(tabular_logprob, optimizer, beta=0.5, gamma=0.0, eta=0.1, donate=False)
  batch = jbond_batch(jax.random.key(60), REF_TABLE, REF_TABLE, 8)
  batch = batch.replace(anchor_rewards=batch.anchor_rewards.at[2, 0].set(jnp.nan))
  state = upd.init_train_state(jnp.copy(REF_TABLE), optimizer, anchor_params=REF_TABLE)
  new_state, metrics = step(state, REF_TABLE, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert float(metrics["step_skipped"]) == 1.0 and int(new_state.step) == 0
  np.testing.assert_array_equal(new_state.params, state.params)


def test_optimizer_schedule_and_clipping():
  config = upd.OptimizerConfig(learning_rate=1.0, warmup_steps=4, schedule="linear", decay_steps=10,
                               end_lr_fraction=0.1, max_grad_norm=0.5)
  schedule = upd.make_schedule(config)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 4, 9, 14, 20)], [0, 0.5, 1, 0.55, 0.1, 0.1],
                             atol=1e-6)
  clip_only = upd.make_optimizer(upd.OptimizerConfig(learning_rate=1.0, max_grad_norm=0.5))
  grads = {"w": jnp.array([3.0, 4.0])}
  state = clip_only.init(grads)
  # Adam's first step is lr * g / |g| per entry, whatever the clipping; the clipped norm shows in mu.
  _, state = clip_only.update(grads, state, grads)
  mu = state[1][0].mu["w"]
  np.testing.assert_allclose(mu, 0.1 * np.array([0.3, 0.4]), rtol=1e-5)  # (1 - b1) * g * 0.5 / 5


@pytest.mark.parametrize("build, message", [
    (lambda o: upd.make_jbond_step(tabular_logprob, o, eta=1.5), r"eta=1\.5 .*\[0, 1\]"),
    (lambda o: upd.make_jbond_step(tabular_logprob, o, beta=2.0), r"beta=2\.0 .*\[0, 1\]"),
    (lambda o: upd.make_jbond_step(tabular_logprob, o, gamma=-1.0), r"gamma=-1\.0 .*>= 0"),
    (lambda o: upd.make_bond_step(tabular_logprob, o, n=1, beta=0.5), r"n=1 .*>= 2"),
    (lambda o: upd.make_bond_step(tabular_logprob, o, n=2, beta=0.5, anchor_period=0), r"anchor_period=0 "),
    (lambda o: upd.make_reinforce_step(tabular_logprob, o, beta_rl=-0.1), r"beta_rl=-0\.1 "),
    (lambda o: upd.make_reinforce_step(tabular_logprob, o, beta_rl=0.1, num_microbatches=0),
     r"num_microbatches=0 "),
    (lambda o: upd.make_optimizer(upd.OptimizerConfig(schedule="step")), r"schedule='step' .*cosine"),
])
def test_step_builders_validate(build, message):
  with pytest.raises(ValueError, match=message):
    build(optax.sgd(0.1))


@pytest.mark.parametrize("eps,expected", [(1e-8, -0.1), (1e-3, -0.05)])
def test_a_config_sections_eps_is_adams_denominator_floor(eps, expected):
  """Adam's first step is -lr g / (|g| + eps): at eps = |g| it halves (momentum SGD's regime)."""
  section = dialogue.get_config().optimizer
  section.update(learning_rate=0.1, warmup_steps=0, eps=eps)
  optimizer = upd.make_optimizer(upd.OptimizerConfig.from_section(section, total_steps=10))
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.full(3, 1e-3)}  # under clip_norm: clipping leaves it alone
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-4)
