"""Jitted update steps for BOND, iterative BOND, J-BOND and the RLOO baseline, generic over the policy.

The policy enters only through `sequence_logprob_fn(params, tokens, mask) -> [B, N]` of tokens [B, N, T]
(and, for bond.kl_estimator "per_position", `sequence_kl_fn`, which also returns the per-position KL to a
base model along each row: scoring.sequence_kl_fn):
the SEQUENCE log-prob of each response (sum over the response tokens where mask is 1 of log-softmax at
temperature 1). The N rows of a prompt b come together, so that a prompt's forward can serve all of them
(scoring.sequence_logprob_fn with response_width): the losses group every set of rows that shares a
prompt (J-BOND: the policy sample and the best anchor sample) into one call. A tabular
autoregressive policy (tests) and the transformer (teacher-forced, scoring.sequence_logprob_fn) plug in
the same way. The caller samples; a step only scores the samples it is given.

Batches are typed pytrees (below) whose leading axis is the prompt axis B (sharded over the mesh's batch
axes); rollout.py makes them. T is a row's length (prompt + response: scoring.join).
  BondBatch       BOND / iterative BOND
  JBondBatch      J-BOND
  ReinforceBatch  RLOO
A step is `step(state, ref_params, batch) -> (state, metrics)`; ref_params may be None where the loss does
not need pi_ref (J-BOND then reports no kl_policy_ref). The same step builder serves the SFT and reward
stages with their own losses (every stage gets the non-finite guard).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from bond_jax import best_of_n, objectives, sharding

Array = jax.Array
SequenceLogprobFn = Callable[[Any, Array, Array], Array]
# (params, base_params, tokens, mask) -> (log pi, log pi_base, sum_t KL_t) [B, N]: scoring.sequence_kl_fn
SequenceKLFn = Callable[[Any, Any, Array, Array], tuple[Array, Array, Array]]
LossFn = Callable[[Any, Any, Any, dict], tuple[Array, dict]]


@flax.struct.dataclass
class TrainState:
  """params and anchor_params share one structure; anchor_params is None for plain BOND / RLOO.

  With LoRA (models/lora.py) params and anchor_params are the ADAPTERS (and, for a reward model, its head):
  the frozen base is not part of the state (the step gets it as ref_params and build_update_step's
  params_view attaches them), so the optimizer's moments and the anchor's EMA cover the adapters only.

  step counts applied updates; skipped_steps counts updates dropped by the non-finite guard.
  """
  params: Any
  opt_state: Any
  anchor_params: Any
  step: Array
  skipped_steps: Array


@flax.struct.dataclass
class BondBatch:
  """policy_tokens, policy_mask [B, M, T]: M policy samples; policy_rewards [B, M]; base_rewards [B, k]: k
  samples of pi_ref (or of the anchor) for the quantiles; target_tokens, target_mask [B, R, T]: the
  forward-KL term's base samples, R = 1 (the best of the first n) or k (all of them, in base_rewards'
  order: objectives.FORWARD_ESTIMATORS)."""
  policy_tokens: Array
  policy_mask: Array
  policy_rewards: Array
  base_rewards: Array
  target_tokens: Array
  target_mask: Array


@flax.struct.dataclass
class JBondBatch:
  """policy_tokens, policy_mask [B, T]: one policy sample; policy_rewards [B]; anchor_tokens, anchor_mask
  [B, 2, T]: two anchor samples; anchor_rewards [B, 2]."""
  policy_tokens: Array
  policy_mask: Array
  policy_rewards: Array
  anchor_tokens: Array
  anchor_mask: Array
  anchor_rewards: Array


@flax.struct.dataclass
class ReinforceBatch:
  """policy_tokens, policy_mask [B, M, T]: M policy samples; policy_rewards [B, M]."""
  policy_tokens: Array
  policy_mask: Array
  policy_rewards: Array


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Adam(W) with linear warm-up, then a constant / cosine / linear schedule, and global-norm clipping.

  decay_steps counts the steps AFTER warm-up over which the schedule falls to end_lr_fraction * lr.
  max_grad_norm <= 0 disables clipping; weight_decay > 0 makes it AdamW.
  """
  learning_rate: float = 3e-6
  warmup_steps: int = 0
  schedule: str = "constant"
  decay_steps: int = 0
  end_lr_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0

  @classmethod
  def from_section(cls, section: Any, total_steps: int) -> "OptimizerConfig":
    """The optimizer of a config section (config.sft, config.reward_training or config.optimizer: each has
    learning_rate, warmup_steps, schedule, end_lr_fraction, b1, b2, eps, weight_decay, clip_norm). The schedule
    decays over the steps after warm-up; warm-up is capped at the stage's steps."""
    warmup = min(int(section.warmup_steps), total_steps)
    return cls(learning_rate=section.learning_rate, warmup_steps=warmup, schedule=section.schedule,
               decay_steps=max(total_steps - warmup,
                               0), end_lr_fraction=section.end_lr_fraction, b1=section.b1, b2=section.b2,
               eps=section.eps, weight_decay=section.weight_decay, max_grad_norm=section.clip_norm)


SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
  if config.schedule not in SCHEDULES:
    raise ValueError(f"schedule={config.schedule!r} is unknown: allowed are {', '.join(SCHEDULES)}")
  if config.learning_rate <= 0 or config.warmup_steps < 0:
    raise ValueError(f"learning_rate={config.learning_rate}, warmup_steps={config.warmup_steps}: "
                     "need learning_rate > 0 and warmup_steps >= 0")
  peak = config.learning_rate
  if config.schedule == "constant" or config.decay_steps <= 0:
    after = optax.constant_schedule(peak)
  elif config.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, config.decay_steps, alpha=config.end_lr_fraction)
  else:
    after = optax.linear_schedule(peak, peak * config.end_lr_fraction, config.decay_steps)
  if config.warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
  return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """clip_by_global_norm -> adam(w) with `make_schedule(config)`."""
  schedule = make_schedule(config)
  adam = (optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)
          if config.weight_decay > 0 else optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps))
  if config.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adam)
  return adam


def init_train_state(params: Any, optimizer: optax.GradientTransformation,
                     anchor_params: Any = None) -> TrainState:
  """A fresh state. The anchor is copied, so donating the state never donates one buffer twice; params
  are not (a model's worth of memory): once a donating step has run, the caller's params are gone."""
  anchor = None if anchor_params is None else jax.tree.map(jnp.copy, anchor_params)
  return TrainState(params=params, opt_state=optimizer.init(params), anchor_params=anchor, step=jnp.zeros(
      (), jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))


def new_state(params: Any, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
              anchor_params: Any = None) -> TrainState:
  """init_train_state with every leaf on `mesh`: params keep their layout (the optimizer moments follow
  them), scalars made on one device (step counters, Adam's count) become replicated."""
  with jax.set_mesh(mesh):
    return sharding.on_mesh(init_train_state(params, optimizer, anchor_params), mesh)


# --------------------------------------------------------------------------------------------------------
# Losses over batches (policy-generic), built from objectives.


def _grouped_logprobs(sequence_logprob_fn: SequenceLogprobFn, params: Any, tokens: Array,
                      mask: Array) -> Array:
  """Sequence log-probs [B, N] of rows tokens [B, N, T] grouped by prompt ([B, T]: one row each -> [B])."""
  grouped = tokens.ndim == 2
  tokens, mask = (x[:, None] if grouped else x for x in (tokens, mask))
  out = sequence_logprob_fn(params, tokens, mask)
  return out[:, 0] if grouped else out


def _constant_logprobs(fn: SequenceLogprobFn, params: Any, tokens: Array, mask: Array) -> Array:
  return jax.lax.stop_gradient(_grouped_logprobs(fn, params, tokens, mask))


def _with_targets(fn: SequenceLogprobFn, params: Any, tokens: Array, mask: Array, target_tokens: Array,
                  target_mask: Array) -> tuple[Array, Array]:
  """(log pi of tokens [B, M, T] -> [B, M], of target_tokens [B, R, T] -> [B, R]) in ONE call: the targets
  answer the same prompts, so the policy's forward of each prompt serves both."""
  rows = lambda x, targets: jnp.concatenate([x, targets], axis=1)
  both = _grouped_logprobs(fn, params, rows(tokens, target_tokens), rows(mask, target_mask))
  return both[:, :tokens.shape[1]], both[:, tokens.shape[1]:]


def bond_loss_fn(sequence_logprob_fn: SequenceLogprobFn, *, n: int, beta: float, baseline: str = "loo",
                 use_anchor: bool = False, forward_estimator: str = "best_of_n",
                 sequence_kl_fn: SequenceKLFn | None = None) -> LossFn:
  """Jeffreys BOND on a batch; the Best-of-n base is pi_ref, or the anchor when use_anchor (iterative).
  forward_estimator "all_k" needs the batch's target rows to be all k base samples (rollout.bond).
  sequence_kl_fn (scoring.sequence_kl_fn): the backward term's KL to the base is the exact per-position KL
  along the policy's samples (objectives.KL_ESTIMATORS "per_position"); None: the sampled log-ratio."""
  objectives.validate_hparams(n=n, beta=beta, baseline=baseline, forward_estimator=forward_estimator)
  all_k = forward_estimator == "all_k"

  def loss_fn(params, anchor_params, ref_params, batch):
    base_params = anchor_params if use_anchor else ref_params
    if base_params is None:
      raise ValueError("BOND needs ref_params (or an anchor in the state for iterative BOND)")
    tokens, mask = batch.policy_tokens, batch.policy_mask
    position_kl = None
    if sequence_kl_fn is None:
      policy_logprobs, target_logprobs = _with_targets(sequence_logprob_fn, params, tokens, mask,
                                                       batch.target_tokens, batch.target_mask)
    else:  # the policy's rows read both models' full laws; the targets only need log pi
      policy_logprobs, policy_base_logprobs, position_kl = sequence_kl_fn(params, base_params, tokens, mask)
      target_logprobs = _grouped_logprobs(sequence_logprob_fn, params, batch.target_tokens, batch.target_mask)
    target_base_logprobs = None
    if all_k:  # the base's forward of each prompt serves its policy samples and its own k samples
      base_logprobs, target_base_logprobs = jax.lax.stop_gradient(
          _with_targets(sequence_logprob_fn, base_params, tokens, mask, batch.target_tokens,
                        batch.target_mask))
    else:
      base_logprobs = (_constant_logprobs(sequence_logprob_fn, base_params, tokens, mask)
                       if position_kl is None else policy_base_logprobs)
      target_logprobs = target_logprobs[:, 0]
    ref_logprobs = None
    if use_anchor and ref_params is not None:
      ref_logprobs = _constant_logprobs(sequence_logprob_fn, ref_params, tokens, mask)
    return objectives.bond_loss(policy_logprobs, base_logprobs, batch.policy_rewards, batch.base_rewards,
                                target_logprobs, n=n, beta=beta, baseline=baseline, ref_logprobs=ref_logprobs,
                                forward_estimator=forward_estimator,
                                target_base_logprobs=target_base_logprobs, position_kl=position_kl)

  return loss_fn


def jbond_loss_fn(sequence_logprob_fn: SequenceLogprobFn, *, beta: float, gamma: float, baseline: str = "loo",
                  penalty: float = objectives.JBOND_PENALTY, measure_ref: bool = True,
                  sequence_kl_fn: SequenceKLFn | None = None) -> LossFn:
  """J-BOND on a batch: selects the better anchor sample (lowest index on ties) and scores it.
  measure_ref: also run pi_ref on the policy's sample for the kl_policy_ref metric (the loss never needs
  pi_ref: without it a step skips one of its four forwards; the distillation stage measures on the steps
  it logs). sequence_kl_fn: the KL to the anchor in the return and the regulariser is the exact
  per-position KL along the policy's sample (as in bond_loss_fn)."""
  objectives.validate_hparams(beta=beta, gamma=gamma, baseline=baseline)

  def loss_fn(params, anchor_params, ref_params, batch):
    if anchor_params is None:
      raise ValueError("J-BOND needs anchor_params in the TrainState (init_train_state(anchor_params=...))")
    tokens, mask = batch.policy_tokens, batch.policy_mask
    best_index, _ = best_of_n.select_best(batch.anchor_rewards)
    pick = lambda x: jnp.take_along_axis(x, best_index[:, None, None], axis=1)
    position_kl = None
    if sequence_kl_fn is None:
      policy_logprobs, best_logprobs = _with_targets(sequence_logprob_fn, params, tokens[:, None], mask[:,
                                                                                                        None],
                                                     pick(batch.anchor_tokens), pick(batch.anchor_mask))
      policy_logprobs, best_logprobs = policy_logprobs[:, 0], best_logprobs[:, 0]
      anchor_logprobs = _constant_logprobs(sequence_logprob_fn, anchor_params, tokens, mask)
    else:  # the policy's sample reads both models' full laws; the best anchor sample only needs log pi
      policy_logprobs, anchor_logprobs, position_kl = sequence_kl_fn(params, anchor_params, tokens, mask)
      best_logprobs = _grouped_logprobs(sequence_logprob_fn, params, pick(batch.anchor_tokens),
                                        pick(batch.anchor_mask))[:, 0]
    ref_logprobs = (None if ref_params is None or not measure_ref else _constant_logprobs(
        sequence_logprob_fn, ref_params, tokens, mask))
    return objectives.jbond_loss(policy_logprobs, anchor_logprobs, batch.policy_rewards, batch.anchor_rewards,
                                 best_logprobs, beta=beta, gamma=gamma, baseline=baseline, penalty=penalty,
                                 ref_logprobs=ref_logprobs, position_kl=position_kl)

  return loss_fn


def reinforce_loss_fn(sequence_logprob_fn: SequenceLogprobFn, *, beta_rl: float, baseline: str = "loo",
                      sequence_kl_fn: SequenceKLFn | None = None) -> LossFn:
  """RLOO with a beta_rl KL penalty to pi_ref (the paper's baseline); sequence_kl_fn as in bond_loss_fn."""
  objectives.validate_hparams(beta_rl=beta_rl, baseline=baseline)

  def loss_fn(params, anchor_params, ref_params, batch):
    del anchor_params
    if ref_params is None:
      raise ValueError("REINFORCE needs ref_params for its KL penalty")
    tokens, mask = batch.policy_tokens, batch.policy_mask
    position_kl = None
    if sequence_kl_fn is None:
      policy_logprobs = _grouped_logprobs(sequence_logprob_fn, params, tokens, mask)
      ref_logprobs = _constant_logprobs(sequence_logprob_fn, ref_params, tokens, mask)
    else:
      policy_logprobs, ref_logprobs, position_kl = sequence_kl_fn(params, ref_params, tokens, mask)
    return objectives.reinforce_loss(policy_logprobs, ref_logprobs, batch.policy_rewards, beta_rl=beta_rl,
                                     baseline=baseline, position_kl=position_kl)

  return loss_fn


# --------------------------------------------------------------------------------------------------------
# The generic step: gradient accumulation, non-finite guard, anchor update, jit with shardings.


def _loss_and_grads(loss_fn: LossFn, params, anchor_params, ref_params, batch, num_microbatches: int):
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_microbatches == 1:
    (loss, metrics), grads = grad_fn(params, anchor_params, ref_params, batch)
    return loss, metrics, grads

  def split(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(f"batch of {x.shape[0]} prompts does not split into {num_microbatches} microbatches")
    return x.reshape(num_microbatches, x.shape[0] // num_microbatches, *x.shape[1:])

  def accumulate(carry, microbatch):
    (loss, metrics), grads = grad_fn(params, anchor_params, ref_params, microbatch)
    return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

  # Shapes of one microbatch's outputs give the zero carry without running the loss twice.
  first = jax.tree.map(lambda x: split(x)[0], batch)
  (loss_shape, metrics_shape), grads_shape = jax.eval_shape(grad_fn, params, anchor_params, ref_params, first)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, metrics_shape, grads_shape))
  total, _ = jax.lax.scan(accumulate, zeros, jax.tree.map(split, batch))
  # Each microbatch loss is a mean, so the mean of the microbatch gradients is the full-batch gradient
  # (leave-one-out baselines are formed within each microbatch).
  return jax.tree.map(lambda x: x / num_microbatches, total)


AnchorUpdate = Callable[[Any, Any, Array], Any]  # (anchor, new_params, new_step) -> anchor
ParamsView = Callable[[Any, Any], Any]  # (frozen base, trainable params) -> the model's params tree


def _viewed(loss_fn: LossFn, params_view: ParamsView | None) -> LossFn:
  """loss_fn on the models' params trees when the state holds only what trains (LoRA: adapters): the
  policy and the anchor are params_view(base, theirs), with the base passed as ref_params (it is pi_ref
  too). Gradients reach the trainable leaves only; the base is a constant of the step."""
  if params_view is None:
    return loss_fn

  def viewed(params, anchor_params, base, batch):
    anchor = None if anchor_params is None else params_view(base, anchor_params)
    return loss_fn(params_view(base, params), anchor, base, batch)

  return viewed


def build_update_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                      anchor_update: AnchorUpdate | None = None, num_microbatches: int = 1,
                      mesh: jax.sharding.Mesh | None = None, state_sharding: Any = None,
                      batch_sharding: Any = None, ref_sharding: Any = None, donate: bool = True,
                      params_view: ParamsView | None = None):
  """jit(step(state, ref_params, batch) -> (state, metrics)) for any loss_fn.

  params_view: with LoRA, (base, adapters) -> the model's params (see _viewed); ref_params is the base.

  Gradients are averaged over `num_microbatches` slices of the batch (lax.scan, one optimizer update per
  call). If the loss, a gradient, an update or a float input of the batch is non-finite, the update is
  dropped: params, optimizer state, anchor and step are returned unchanged, skipped_steps grows by 1 and
  metrics['step_skipped'] is 1.

  Shardings: with a mesh (or any sharding given) the step is compiled with explicit in/out shardings:
  a state or ref sharding not given is replicated over the mesh, a batch sharding not given splits every
  batch array's rows over ('data', 'fsdp'); with neither, jit infers them from the arguments.
  Metrics always come back replicated. The state (argument 0) is donated unless donate=False.
  """
  if int(num_microbatches) != num_microbatches or num_microbatches < 1:
    raise ValueError(f"num_microbatches={num_microbatches} is not allowed: need an integer >= 1")
  loss_fn = _viewed(loss_fn, params_view)

  def step(state: TrainState, ref_params: Any, batch: dict) -> tuple[TrainState, dict]:
    loss, metrics, grads = _loss_and_grads(loss_fn, state.params, state.anchor_params, ref_params, batch,
                                           num_microbatches)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    # A norm is non-finite if any leaf is. Non-finite inputs (e.g. a broken reward model's NaN scores,
    # which comparisons silently turn into finite losses) and non-finite updates are refused too.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates)) &
              _floats_finite(batch))
    params = optax.apply_updates(state.params, updates)
    new_step = state.step + 1
    anchor = state.anchor_params
    if anchor_update is not None:
      anchor = anchor_update(anchor, params, new_step)
    candidate = (params, opt_state, anchor, new_step)
    current = (state.params, state.opt_state, state.anchor_params, state.step)
    params, opt_state, anchor, new_step = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                                       candidate, current)
    skipped = (~finite).astype(jnp.int32)
    new_state = TrainState(params=params, opt_state=opt_state, anchor_params=anchor, step=new_step,
                           skipped_steps=state.skipped_steps + skipped)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, step_skipped=skipped.astype(jnp.float32),
                   skipped_steps=new_state.skipped_steps.astype(jnp.float32))
    return new_state, metrics

  return _jit_step(step, mesh, (state_sharding, ref_sharding, batch_sharding), donate)


def _floats_finite(tree: Any) -> jax.Array:
  """Whether every float array of `tree` is finite (a bool [])."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.array(checks or [True]))


def _jit_step(step: Callable, mesh: jax.sharding.Mesh | None, shardings: tuple[Any, Any, Any], donate: bool):
  """jax.jit of step(state, ref_params, batch) with the shardings build_update_step documents."""
  donate_argnums = (0,) if donate else ()
  if mesh is None and all(s is None for s in shardings):
    return jax.jit(step, donate_argnums=donate_argnums)
  if mesh is None:
    mesh = next(s for s in jax.tree.leaves(shardings) if isinstance(s, NamedSharding)).mesh
  replicated = NamedSharding(mesh, PartitionSpec())
  state_in, ref_in = (replicated if s is None else s for s in shardings[:2])
  jit = lambda batch_in: jax.jit(step, in_shardings=(state_in, ref_in, batch_in), out_shardings=(
      state_in, replicated), donate_argnums=donate_argnums)
  if shardings[2] is not None:
    return jit(shardings[2])
  # Rows over the batch axes: the shardings follow the batch's own structure and ranks, so the step is
  # compiled at its first call (a batch of another structure would be a bug, and jit would say so).
  compiled = []

  def call(state, ref_params, batch):
    if not compiled:
      compiled.append(jit(jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), batch)))
    return compiled[0](state, ref_params, batch)

  return call


def make_bond_step(sequence_logprob_fn: SequenceLogprobFn, optimizer: optax.GradientTransformation, *, n: int,
                   beta: float, baseline: str = "loo", anchor_period: int | None = None,
                   forward_estimator: str = "best_of_n", sequence_kl_fn: SequenceKLFn | None = None,
                   **step_options):
  """BOND (anchor_period=None: Best-of-n of pi_ref) or iterative BOND (Algorithm 1: Best-of-n of the
  anchor, which becomes the policy after every `anchor_period` updates). sequence_kl_fn: see
  `bond_loss_fn`. step_options: see `build_update_step`."""
  objectives.validate_hparams(anchor_period=anchor_period)
  use_anchor = anchor_period is not None
  anchor_update = functools.partial(_hard_update, period=anchor_period) if use_anchor else None
  loss_fn = bond_loss_fn(sequence_logprob_fn, n=n, beta=beta, baseline=baseline, use_anchor=use_anchor,
                         forward_estimator=forward_estimator, sequence_kl_fn=sequence_kl_fn)
  return build_update_step(loss_fn, optimizer, anchor_update=anchor_update, **step_options)


def _hard_update(anchor, params, step, *, period):
  return objectives.hard_anchor_update(anchor, params, step, period)


def make_jbond_step(sequence_logprob_fn: SequenceLogprobFn, optimizer: optax.GradientTransformation, *,
                    beta: float = 0.5, gamma: float = 0.0, eta: float = 0.02, baseline: str = "loo",
                    penalty: float = objectives.JBOND_PENALTY, anchor_period: int | None = None,
                    measure_ref: bool = True, sequence_kl_fn: SequenceKLFn | None = None, **step_options):
  """J-BOND (Algorithm 2) with the EMA anchor update theta_a <- (1 - eta) theta_a + eta theta after
  every applied update, or (anchor_period given, the paper's Fig. 5 comparison) a hard anchor update: the
  anchor becomes the policy every anchor_period updates. The state must carry anchor_params (start them at
  pi_ref). measure_ref, sequence_kl_fn: see jbond_loss_fn."""
  objectives.validate_hparams(eta=eta, anchor_period=anchor_period)
  loss_fn = jbond_loss_fn(sequence_logprob_fn, beta=beta, gamma=gamma, baseline=baseline, penalty=penalty,
                          measure_ref=measure_ref, sequence_kl_fn=sequence_kl_fn)
  if anchor_period is not None:
    anchor_update = functools.partial(_hard_update, period=anchor_period)
  else:
    anchor_update = lambda anchor, params, step: objectives.ema_anchor_update(anchor, params, eta)
  return build_update_step(loss_fn, optimizer, anchor_update=anchor_update, **step_options)


def make_reinforce_step(sequence_logprob_fn: SequenceLogprobFn, optimizer: optax.GradientTransformation, *,
                        beta_rl: float, baseline: str = "loo", sequence_kl_fn: SequenceKLFn | None = None,
                        **step_options):
  """RLOO baseline: REINFORCE on r - beta_rl * (log pi - log pi_ref); sequence_kl_fn: see bond_loss_fn."""
  loss_fn = reinforce_loss_fn(sequence_logprob_fn, beta_rl=beta_rl, baseline=baseline,
                              sequence_kl_fn=sequence_kl_fn)
  return build_update_step(loss_fn, optimizer, **step_options)
