"""LoRA (models/lora.py) in the forward and the fused decode step: zero adapters are the base exactly,
trained ones run the same function unmerged (forward, per-step decode) and merged (the sampler's
default), and the update steps train the adapters only on one frozen base."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bond_jax import objectives, sampling, scoring, sharding, update
from bond_jax.models import lora, params as params_lib
from bond_jax.models.config import ModelConfig
from test_decode import CASES, FORWARD, WIDTH, _decode_logits, _inputs  # the decode test's harness

# the step's layouts: fused / unfused, unrolled / scanned, q/k norms, windows and soft caps
NAMES = ["llama", "qwen3_unfused_scanned", "gemma2"]
LORA = lora.LoraConfig(rank=4, alpha=8.0)


def _model(name, seed=0, noise=0.1):
  """(cfg, fuse, N, T, base params, random adapters): A random, B random too (as after training)."""
  cfg, fuse, num_samples, length = CASES[name]
  base = nn.unbox(jax.jit(lambda r: params_lib.init_boxed(cfg, "lm", r))(jax.random.key(seed)))
  adapters = lora.init(cfg, LORA, base, jax.random.key(seed + 1))
  trained = jax.tree_util.tree_map_with_path(
      lambda p, x: x + noise * jax.random.normal(jax.random.key(len(jax.tree_util.keystr(p))), x.shape),
      adapters)
  return cfg, fuse, num_samples, length, base, adapters, trained


def _rows(cfg, num_samples, length):
  prompts, mask, fed = _inputs(cfg, num_samples, length)
  rows = np.concatenate([np.repeat(prompts, num_samples, 0), fed], 1)
  row_mask = np.concatenate([np.repeat(mask, num_samples, 0), np.ones_like(fed, bool)], 1)
  return prompts, mask, fed, rows, row_mask


@pytest.mark.parametrize("name", NAMES)
def test_zero_adapters_are_the_base_and_trained_ones_agree_merged_and_unmerged(name):
  cfg, fuse, n, length, base, zero, trained = _model(name)
  prompts, mask, fed, rows, row_mask = _rows(cfg, n, length)
  at_zero = lora.attach(base, zero, LORA)
  # zero B: the forward and both decode paths give the base's logits bit for bit
  np.testing.assert_array_equal(FORWARD(cfg, at_zero, rows, row_mask), FORWARD(cfg, base, rows, row_mask))
  base_decoded = np.asarray(_decode_logits(cfg, base, prompts, mask, fed, n, fuse))
  for params in (at_zero, lora.merge(at_zero)):
    np.testing.assert_array_equal(_decode_logits(cfg, params, prompts, mask, fed, n, fuse), base_decoded)

  attached = lora.attach(base, trained, LORA)
  unmerged = np.asarray(FORWARD(cfg, attached, rows, row_mask))
  assert np.abs(unmerged - np.asarray(FORWARD(cfg, base, rows, row_mask))).max() > 0.1  # adapters bite
  merged = lora.merge(attached)
  assert not lora.has_adapters(merged) and jax.tree.structure(merged) == jax.tree.structure(base)
  assert np.abs(np.asarray(FORWARD(cfg, merged, rows, row_mask)) - unmerged).max() <= 1e-5
  # the decode step with the product applied every step, and on merged weights, vs the unmerged forward
  for params in (attached, merged):
    decoded = np.asarray(_decode_logits(cfg, params, prompts, mask, fed, n, fuse))
    assert np.abs(decoded - unmerged[:, WIDTH - 1:]).max() <= 1e-5


def test_generate_draws_the_same_samples_merging_per_call_or_per_step_on_the_mesh():
  cfg, _, _, _, base, _, trained = _model("llama")
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  axes = params_lib.logical_axes(cfg, "lm")
  base = jax.device_put(base, sharding.tree_shardings(axes, mesh))
  trained = jax.device_put(trained, sharding.tree_shardings(lora.logical_axes(cfg, LORA, axes), mesh))
  prompts, mask, _ = _inputs(cfg, 1, 2)
  prompts, mask = np.repeat(prompts, 8, 0)[:8], np.repeat(mask, 8, 0)[:8]
  attached = lora.attach(base, trained, LORA)
  draw = lambda params, merge: sampling.generate(cfg, params, prompts, mask, jax.random.key(3), num_samples=2,
                                                 max_new_tokens=12, merge_adapters=merge)
  merged, per_step, plain = draw(attached, True), draw(attached, False), draw(base, True)
  np.testing.assert_array_equal(merged.tokens, per_step.tokens)
  assert np.abs(np.asarray(merged.model_logprobs - per_step.model_logprobs)).max() <= 1e-5
  assert not np.array_equal(merged.tokens, plain.tokens)


def _step_inputs(cfg, rng, batch=8, length=12):
  tokens = jax.random.randint(rng, (batch, 3, length), 1, cfg.vocab_size)
  mask = jnp.broadcast_to(jnp.arange(length) >= 4, tokens.shape)
  rewards = jax.random.normal(jax.random.fold_in(rng, 1), (batch, 3))
  return tokens, mask, rewards


@pytest.mark.parametrize("algorithm", ["jbond", "bond", "iterative_bond", "reinforce"])
def test_every_algorithm_trains_the_adapters_only_on_a_frozen_base(algorithm):
  cfg = CASES["micro_unfused"][0]
  base = nn.unbox(jax.jit(lambda r: params_lib.init_boxed(cfg, "lm", r))(jax.random.key(0)))
  adapters = lora.init(cfg, LORA, base, jax.random.key(1))
  before = jax.tree.map(np.asarray, base)
  optimizer = optax.adam(1e-2)
  eta = 0.1
  options = dict(params_view=lambda b, a: lora.attach(b, a, LORA), donate=False)
  fn = scoring.sequence_logprob_fn(cfg, pad_id=0)
  tokens, mask, rewards = _step_inputs(cfg, jax.random.key(2))
  if algorithm == "jbond":
    step = update.make_jbond_step(fn, optimizer, eta=eta, **options)
    batch = update.JBondBatch(tokens[:, 0], mask[:, 0], rewards[:, 0], tokens[:, 1:], mask[:, 1:],
                              rewards[:, 1:])
  elif algorithm == "reinforce":
    step = update.make_reinforce_step(fn, optimizer, beta_rl=0.1, **options)
    batch = update.ReinforceBatch(tokens[:, :2], mask[:, :2], rewards[:, :2])
  else:
    period = 1 if algorithm == "iterative_bond" else None
    step = update.make_bond_step(fn, optimizer, n=2, beta=0.5, anchor_period=period, **options)
    batch = update.BondBatch(tokens[:, :2], mask[:, :2], rewards[:, :2], rewards, tokens[:, 2:3], mask[:,
                                                                                                       2:3])
  uses_anchor = algorithm in ("jbond", "iterative_bond")
  state = update.init_train_state(adapters, optimizer, adapters if uses_anchor else None)
  new, metrics = step(state, base, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["step_skipped"]) == 0
  # the state holds adapters only: params, anchor and both Adam moments have the adapters' structure
  assert jax.tree.structure(new.params) == jax.tree.structure(adapters)
  adam = new.opt_state[0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(adam.nu) == jax.tree.structure(adapters)
  moved = [
      float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(new.params), jax.tree.leaves(adapters))
  ]
  assert max(moved) > 1e-3  # B leaves from zero
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(x), y)  # the base is untouched
  if algorithm == "jbond":  # the anchor is the EMA of the adapters: (1 - eta) old + eta new, leaf by leaf
    expected = objectives.ema_anchor_update(adapters, new.params, eta)
    for x, y in zip(jax.tree.leaves(new.anchor_params), jax.tree.leaves(expected)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-7)
  elif algorithm == "iterative_bond":  # a hard anchor update every step: the anchor is the new adapters
    jax.tree.map(np.testing.assert_array_equal, new.anchor_params, new.params)


def test_bad_lora_settings_are_one_line_errors():
  cfg = ModelConfig(num_layers=2, scan_layers=True)
  for changes, message in [(dict(rank=0), "lora.rank=0 must be"),
                           (dict(targets=("q", "wq")), "lora.targets="),
                           (dict(layers=(2,)), "layer 2 is not in 0..1"), (dict(layers=(0,)), "scan_layers"),
                           (dict(decode="fast"), "lora.decode='fast'")]:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
      lora.LoraConfig(**changes).validate(cfg)
