"""Scoring given responses: one join into model rows, teacher-forced log-probs, reward-model scores.

Shapes: B prompts, N responses per prompt, P prompt tokens, T response tokens, R rows, L row length
(P + T for joined rows), D d_model, V vocab.

Prompts are LEFT-padded [B, P] (tokens + mask); responses are RIGHT-padded [B, N, T] (as sampling.generate
returns them: EOS included in the mask, pad_id after it). `join` makes rows
[left pads | prompt | response | right pads]. They are valid model inputs as they are: positions count real
tokens only and pads are never attended to, so no re-packing is needed (a row scores exactly like its
left-packed copy).

Log-probs have one implementation, `token_logprobs`: the backbone runs once over the rows, then the LM head
and log-softmax run on `chunk` positions at a time under jax.checkpoint. The [R, L, V] float32 logits are
never held at once (with a 256k vocabulary they would dominate memory), and the backward pass recomputes a
chunk's logits instead of storing them. The update step's `sequence_logprob_fn`, the SFT loss and the
evaluation's `sequence_logprobs` all go through it. Where two models' full next-token laws are compared
at each position (the evaluation's `response_kl`, the update's `sequence_kl_fn`), one helper,
`_position_laws`, reads both models' log-softmax of a chunk and gives the KL and both chosen log-probs.

A prompt's N responses read it once (`_shared_prompt_hidden`): the prompt runs into a KV cache of P + T
slots and its N responses run as continuations of that cache, [B * N, T] tokens instead of [B * N, P + T].
Rewards, the evaluation's log-probs and the update's log-probs of rows grouped by prompt ([B, N, L] with
`response_width`) go that way; a response scores as its joined row does, up to float noise (the products
are batched differently). The LM head runs only on the positions that predict response tokens.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from bond_jax.models import reward, transformer
from bond_jax.models.config import ModelConfig

SequenceLogprobFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


class Rows(NamedTuple):
  """Prompt + response rows, all [B, N, P + T].

  tokens: int32 [left pads | prompt | response | right pads] (pads as the inputs had them).
  attend_mask: bool, True on real tokens (prompt and response): what the model attends to.
  response_mask: bool, True on response tokens only: the tokens whose log-probs a sequence sums.
  """
  tokens: jax.Array
  attend_mask: jax.Array
  response_mask: jax.Array


def join(prompts: jax.Array, prompt_mask: jax.Array, responses: jax.Array, response_mask: jax.Array) -> Rows:
  """Left-padded prompts, prompt_mask [B, P] + right-padded responses, response_mask [B, N, T] -> Rows."""
  batch, num_samples, _ = responses.shape
  per_sample = lambda x: jnp.broadcast_to(x[:, None], (batch, num_samples, x.shape[-1]))
  prompt_mask, response_mask = jnp.asarray(prompt_mask, bool), jnp.asarray(response_mask, bool)
  tokens = jnp.concatenate([per_sample(jnp.asarray(prompts)), jnp.asarray(responses)], axis=-1)
  attend = jnp.concatenate([per_sample(prompt_mask), response_mask], axis=-1)
  response_only = jnp.concatenate([jnp.zeros_like(per_sample(prompt_mask)), response_mask], axis=-1)
  return Rows(tokens, attend, response_only)


def _check_temperature(temperature: float):
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} is not allowed: teacher-forced log-probs need > 0")


def _head_logprobs(model: transformer.Transformer, params: Any, hidden: jax.Array, targets: jax.Array,
                   chunk: int, temperature: float) -> jax.Array:
  """log softmax(logits / temperature)[target] [R, S] float32 of hidden [R, S, D], targets [R, S], computed
  `chunk` positions at a time (the last chunk may be shorter)."""
  if int(chunk) != chunk or chunk < 1:
    raise ValueError(f"chunk={chunk} is not allowed: need an integer >= 1")

  @jax.checkpoint  # backward recomputes a chunk's [R, chunk, V] logits instead of keeping them
  def chunk_logprobs(params, hidden, targets):
    logits = model.apply({"params": params}, hidden, method=transformer.Transformer.logits)
    if temperature != 1.0:
      logits = logits / temperature
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)

  pieces = [
      chunk_logprobs(params, hidden[:, start:start + chunk], targets[:, start:start + chunk])
      for start in range(0, hidden.shape[1], chunk)
  ]
  return jnp.concatenate(pieces, axis=1) if pieces else jnp.zeros(targets.shape, jnp.float32)


def _logprobs_from(cfg: ModelConfig, params: Any, tokens: jax.Array, attend_mask: jax.Array, first: int,
                   chunk: int, temperature: float) -> jax.Array:
  """[R, L - first] log-probs of tokens[:, first:] [R, L] given the tokens before each (first >= 1): the
  LM head runs only on the positions that predict them."""
  model = transformer.Transformer(cfg)
  hidden, _ = model.apply({"params": params}, tokens, attend_mask, method=transformer.Transformer.hidden)
  return _head_logprobs(model, params, hidden[:, first - 1:-1], tokens[:, first:], chunk, temperature)


def _shared_prompt_hidden(model: transformer.Transformer, params: Any, prompts: jax.Array,
                          prompt_attend: jax.Array, responses: jax.Array,
                          response_attend: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Hidden states of prompts [B, P] and of their responses [B, N, T] -> ([B, P, D], [B, N, T, D]).

  The prompt runs once into a cache of P + T slots; the cache is repeated for its N responses, which run
  as its continuation (positions and attention as in the joined row [prompt | response]).
  """
  batch, num_samples, length = responses.shape
  cache = transformer.init_cache(model.cfg, batch, prompts.shape[1] + length)
  prompt_hidden, cache = model.apply({"params": params}, prompts, prompt_attend, cache,
                                     method=transformer.Transformer.hidden)
  repeat = lambda x, axis: jnp.repeat(x, num_samples, axis=axis)  # row b * N + n continues prompt b
  cache = dict(cache, k=repeat(cache["k"], 1), v=repeat(cache["v"], 1), valid=repeat(cache["valid"], 0))
  flat = lambda x: x.reshape(batch * num_samples, length)
  hidden, _ = model.apply({"params": params}, flat(responses), flat(response_attend), cache,
                          method=transformer.Transformer.hidden)
  return prompt_hidden, hidden.reshape(batch, num_samples, length, -1)


def _response_logprobs(cfg: ModelConfig, params: Any, prompts: jax.Array, prompt_attend: jax.Array,
                       responses: jax.Array, response_attend: jax.Array, chunk: int,
                       temperature: float) -> jax.Array:
  """[B, N, T] float32 log-probs of responses [B, N, T] after prompts [B, P] (entries off the response
  mask are garbage: the caller masks them). One response per prompt runs as its joined row; N > 1 share
  the prompt's forward (_shared_prompt_hidden)."""
  batch, num_samples, length = responses.shape
  if num_samples == 1:
    rows = join(prompts, prompt_attend, responses, response_attend)
    flat = lambda x: x[:, 0]
    chosen = _logprobs_from(cfg, params, flat(rows.tokens), flat(rows.attend_mask), prompts.shape[1], chunk,
                            temperature)
    return chosen[:, None]
  model = transformer.Transformer(cfg)
  # response token t is predicted at the position before it: the prompt's last one for t = 0
  predicting = _predicting_hidden(model, params, prompts, prompt_attend, responses, response_attend)
  rows = batch * num_samples
  chosen = _head_logprobs(model, params, predicting.reshape(rows, length, -1),
                          responses.reshape(rows, length), chunk, temperature)
  return chosen.reshape(batch, num_samples, length)


def token_logprobs(cfg: ModelConfig, params: Any, tokens: jax.Array, attend_mask: jax.Array,
                   target_mask: jax.Array | None = None, *, chunk: int = 128,
                   temperature: float = 1.0) -> jax.Array:
  """Teacher-forced per-token log-probs of rows; traceable (jit / grad it in the caller).

  Args:
    cfg, params: the decoder LM.
    tokens: [R, L] int32 rows (left- or right-padded).
    attend_mask: [R, L] bool, True on the real tokens the model attends to.
    target_mask: optional [R, L] bool (e.g. SFT's loss_mask, a response mask): entries whose target
      tokens[:, t + 1] is not in it are 0.
    chunk: positions per LM-head chunk (memory vs. kernel size; does not change the result).
    temperature: > 0; log-softmax of logits / temperature (1 = log pi).
  Returns:
    [R, L - 1] float32: entry t is log p(tokens[:, t + 1] | tokens[:, :t + 1]). The SFT loss is
    -sum(out) / sum(target_mask[:, 1:]) with target_mask = loss_mask.
  """
  _check_temperature(temperature)
  logp = _logprobs_from(cfg, params, tokens, attend_mask, 1, chunk, temperature)
  return logp if target_mask is None else jnp.where(target_mask[:, 1:], logp, 0.0)


def sequence_logprob_fn(cfg: ModelConfig, pad_id: int, chunk: int = 128,
                        response_width: int | None = None) -> SequenceLogprobFn:
  """The update steps' `sequence_logprob_fn(params, tokens, response_mask) -> log pi`: tokens and
  response_mask [R, L] -> [R], or [B, N, L] -> [B, N].

  Rows are `join`'s tokens and response_mask; the attention mask is rebuilt as
  `(tokens != pad_id) | response_mask`, so the pad id must never be produced for real text (our
  SentencePiece models reserve it). Temperature 1: BOND's math needs log pi of the sampled law.
  response_width: T when every response lies in the last T columns (join's rows of T-token responses):
  the LM head then runs on those positions only, and rows [B, N, L] are read as N responses to ONE prompt
  per b (tokens[:, n, :L - T] the same for every n, as join makes them), whose prompt runs once.
  """

  def fn(params: Any, tokens: jax.Array, response_mask: jax.Array) -> jax.Array:
    attend = (tokens != pad_id) | response_mask
    if response_width is None:
      rows = lambda x: x.reshape(-1, x.shape[-1])
      per_token = token_logprobs(cfg, params, rows(tokens), rows(attend), rows(response_mask), chunk=chunk)
      return jnp.sum(per_token, axis=-1).reshape(tokens.shape[:-1])
    grouped = lambda x: x if x.ndim == 3 else x[:, None]
    tokens_3d, attend_3d, mask_3d = (grouped(x) for x in (tokens, attend, response_mask))
    prompt_width = tokens.shape[-1] - response_width
    chosen = _response_logprobs(cfg, params, tokens_3d[:, 0, :prompt_width], attend_3d[:, 0, :prompt_width],
                                tokens_3d[..., prompt_width:], attend_3d[..., prompt_width:], chunk, 1.0)
    total = jnp.sum(jnp.where(mask_3d[..., prompt_width:], chosen, 0.0), axis=-1)
    return total.reshape(tokens.shape[:-1])

  return fn


class SequenceKL(NamedTuple):
  """`sequence_kl_fn`'s [B, N] (or [R]) float32 sums over each response's positions."""
  logprobs: jax.Array  # log pi(y), differentiable in pi's params
  ref_logprobs: jax.Array  # log ref(y), a constant
  kl: jax.Array  # sum_t KL(pi(. | h_t) || ref(. | h_t)), differentiable in pi's params


def sequence_kl_fn(
    cfg: ModelConfig, pad_id: int, chunk: int = 32,
    response_width: int | None = None) -> Callable[[Any, Any, jax.Array, jax.Array], SequenceKL]:
  """`fn(params, ref_params, tokens, response_mask) -> SequenceKL` of rows as `sequence_logprob_fn` reads
  them (tokens, response_mask [R, L] or [B, N, L]; response_width as there): besides log pi(y), the exact
  per-position KL of pi's next-token law to ref's along each response, summed, and log ref(y).

  For y ~ pi, E[sum_t KL_t] = KL(pi || ref) (the chain rule), and its gradient is
  E[sum_t grad KL_t] + E[grad log pi(y) * sum_t KL_t]: the first part, through every position's full law, is
  what the sampled log-ratio log pi(y) - log ref(y) only reaches through the one token sampled there
  (objectives.backward_kl_loss, kl_estimator "per_position"). Both models' [rows, chunk, V] logits are live
  at once, recomputed on the backward pass (jax.checkpoint), so `chunk` bounds the memory.
  """
  if int(chunk) != chunk or chunk < 1:
    raise ValueError(f"chunk={chunk} is not allowed: need an integer >= 1")
  model = transformer.Transformer(cfg)

  @jax.checkpoint
  def laws(params, ref_params, hidden, ref_hidden, targets):
    kl, _, chosen, chosen_ref = _position_laws(model, params, ref_params, hidden, ref_hidden, targets, None)
    return kl, chosen, jax.lax.stop_gradient(chosen_ref)

  def chunked(params, ref_params, hidden, ref_hidden, targets, on):
    pieces = [
        laws(params, ref_params, *(x[:, i:i + chunk] for x in (hidden, ref_hidden, targets)))
        for i in range(0, targets.shape[1], chunk)
    ]
    kl, chosen, chosen_ref = (jnp.concatenate(parts, axis=1) for parts in zip(*pieces))
    total = lambda x: jnp.sum(jnp.where(on, x, 0.0), axis=-1)
    return SequenceKL(total(chosen), total(chosen_ref), total(kl))

  def fn(params: Any, ref_params: Any, tokens: jax.Array, response_mask: jax.Array) -> SequenceKL:
    attend = (tokens != pad_id) | response_mask
    ref_params = jax.lax.stop_gradient(ref_params)
    if response_width is None:
      rows = lambda x: x.reshape(-1, x.shape[-1])
      flat_tokens, flat_attend = rows(tokens), rows(attend)
      hidden = [
          model.apply({"params": p}, flat_tokens, flat_attend,
                      method=transformer.Transformer.hidden)[0][:, :-1] for p in (params, ref_params)
      ]
      out = chunked(params, ref_params, *hidden, flat_tokens[:, 1:], rows(response_mask)[:, 1:])
      return SequenceKL(*(x.reshape(tokens.shape[:-1]) for x in out))
    grouped = lambda x: x if x.ndim == 3 else x[:, None]
    tokens_3d, attend_3d, mask_3d = (grouped(x) for x in (tokens, attend, response_mask))
    width = tokens.shape[-1] - response_width
    batch, num_samples = tokens_3d.shape[:2]
    prompts, prompt_attend = tokens_3d[:, 0, :width], attend_3d[:, 0, :width]
    responses, response_attend = tokens_3d[..., width:], attend_3d[..., width:]
    flat = lambda x: x.reshape(batch * num_samples, *x.shape[2:])
    hidden = [
        flat(_predicting_hidden(model, p, prompts, prompt_attend, responses, response_attend))
        for p in (params, ref_params)
    ]
    out = chunked(params, ref_params, *hidden, flat(responses), flat(mask_3d[..., width:]))
    return SequenceKL(*(x.reshape(tokens.shape[:-1]) for x in out))

  return fn


def _predicting_hidden(model: transformer.Transformer, params: Any, prompts: jax.Array,
                       prompt_attend: jax.Array, responses: jax.Array,
                       response_attend: jax.Array) -> jax.Array:
  """[B, N, T, D]: the hidden state that predicts each response token (the prompt's last one for t = 0)."""
  prompt_hidden, hidden = _shared_prompt_hidden(model, params, prompts, prompt_attend, responses,
                                                response_attend)
  batch, num_samples = responses.shape[:2]
  last = jnp.broadcast_to(prompt_hidden[:, None, -1:], (batch, num_samples, 1, hidden.shape[-1]))
  return jnp.concatenate([last, hidden[:, :, :-1]], axis=2)


class ResponseKL(NamedTuple):
  """`response_kl`'s [B, N] float32 sums over each response's positions."""
  kl: jax.Array  # sum_t KL(pi(. | h_t) || ref(. | h_t))
  stopping: jax.Array  # its part on stop / go on
  ref_logprobs: jax.Array  # log ref(y): what sequence_logprobs gives, from the same forward


def _position_laws(model: transformer.Transformer, params: Any, ref_params: Any, hidden: jax.Array,
                   ref_hidden: jax.Array, targets: jax.Array,
                   stops: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Both models' next-token laws at hidden [R, S, D] (pi's) and ref_hidden [R, S, D] (pi_ref's), compared.

  Returns [R, S] float32: (KL(pi(. | h) || ref(. | h)) over the full vocabulary, its part on stop / go on
  (0 when stops is None), log pi(target), log ref(target)). Differentiable in params (the training loss
  reads it); the [R, S, V] logits of both models are live at once, so callers pass a chunk of positions.
  """
  lp = jax.nn.log_softmax(model.apply({"params": params}, hidden, method=transformer.Transformer.logits), -1)
  lr = jax.nn.log_softmax(
      model.apply({"params": ref_params}, ref_hidden, method=transformer.Transformer.logits), -1)
  total = jnp.sum(jnp.exp(lp) * (lp - lr), axis=-1)
  chosen = lambda l: jnp.take_along_axis(l, targets[..., None], axis=-1)[..., 0]
  if stops is None:
    return total, jnp.zeros_like(total), chosen(lp), chosen(lr)
  # the binary decision stop / go on: KL between the two models' P(EOS) at this position
  mass = lambda l, where: jax.nn.logsumexp(jnp.where(where, l, -jnp.inf), axis=-1)
  stop_p, stop_r, go_p, go_r = mass(lp, stops), mass(lr, stops), mass(lp, ~stops), mass(lr, ~stops)
  stopping = jnp.exp(stop_p) * (stop_p - stop_r) + jnp.exp(go_p) * (go_p - go_r)
  return total, stopping, chosen(lp), chosen(lr)


@functools.partial(jax.jit, static_argnums=(0, 7, 8))
def _response_kl(cfg, params, ref_params, prompts, prompt_mask, responses, response_mask, eos_ids, chunk):
  model = transformer.Transformer(cfg)
  hidden = [
      _predicting_hidden(model, p, prompts, prompt_mask, responses, response_mask)
      for p in (params, ref_params)
  ]
  stops = jnp.zeros(
      (cfg.vocab_size,), bool).at[jnp.asarray(eos_ids, jnp.int32)].set(True) if eos_ids else None

  def one_sample(xs):  # ([B, T, D], [B, T, D], tokens [B, T]) -> per-position (KL, stopping, log ref) [B, T]
    pieces = [
        _position_laws(model, params, ref_params, *(x[:, i:i + chunk] for x in xs), stops)
        for i in range(0, xs[0].shape[1], chunk)
    ]
    kl, stopping, _, chosen_ref = (jnp.concatenate(parts, axis=1) for parts in zip(*pieces))
    return kl, stopping, chosen_ref

  # one sample index at a time: the [B, chunk, V] logits of two models are what this holds at once
  per_position = jax.lax.map(one_sample, tuple(x.swapaxes(0, 1) for x in (*hidden, responses)))
  on = response_mask.swapaxes(0, 1)
  return ResponseKL(*(jnp.sum(jnp.where(on, x, 0.0), axis=-1).swapaxes(0, 1) for x in per_position))


def response_kl(cfg: ModelConfig, params: Any, ref_params: Any, prompts: jax.Array, prompt_mask: jax.Array,
                responses: jax.Array, response_mask: jax.Array, eos_ids: Sequence[int] = (),
                chunk: int = 16) -> ResponseKL:
  """KL(pi || pi_ref) along sampled responses, exactly at each position, and the part of it spent on
  deciding where to stop.

      KL_t     = sum_v pi(v | h_t) (log pi(v | h_t) - log ref(v | h_t))        (the full next-token law)
      stop_t   = KL(Bernoulli(pi(EOS | h_t)) || Bernoulli(ref(EOS | h_t)))     (stop here, or go on)
      returns  (sum_t KL_t, sum_t stop_t, log ref(y)) over each response's positions (EOS included)

  For responses y ~ pi, E[sum_t KL_t] = KL(pi || pi_ref) of the response law (the chain rule): the same
  quantity as the sampled log-ratio log pi(y) - log ref(y), with lower variance. sum_t stop_t is the part
  a change of length costs: the rest is what the word choices cost (KL_t - stop_t >= 0).

  Args:
    cfg: the policy's shape (pi_ref's too). params, ref_params: pi's and pi_ref's params.
    prompts, prompt_mask: [B, P] left-padded; responses, response_mask: [B, N, T] (as generate returns).
    eos_ids: the tokens that end a response; () = no stopping decision (its part is 0).
    chunk: positions per LM-head call (memory: 2 x [B, chunk, V] float32 logits at once).
  Returns:
    ResponseKL: kl, stopping, and ref_logprobs (log pi_ref(y), the sequence_logprobs sum, read from the
    same pi_ref forward) [B, N] float32.
  """
  if jnp.shape(prompts)[1] < 1:
    raise ValueError("prompts of width 0 are not allowed: teacher forcing needs a prompt token")
  if int(chunk) != chunk or chunk < 1:
    raise ValueError(f"chunk={chunk} is not allowed: need an integer >= 1")
  return _response_kl(cfg, params, ref_params, jnp.asarray(prompts), jnp.asarray(prompt_mask, bool),
                      jnp.asarray(responses), jnp.asarray(response_mask, bool),
                      tuple(sorted(int(i) for i in eos_ids)), int(chunk))


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _sequence_logprobs(cfg, params, prompts, prompt_mask, responses, response_mask, temperature, chunk):
  chosen = _response_logprobs(cfg, params, prompts, prompt_mask, responses, response_mask, chunk, temperature)
  per_token = jnp.where(response_mask, chosen, 0.0)
  return per_token, jnp.sum(per_token, axis=-1)


def sequence_logprobs(cfg: ModelConfig, params: Any, prompts: jax.Array, prompt_mask: jax.Array,
                      responses: jax.Array, response_mask: jax.Array, temperature: float = 1.0,
                      chunk: int = 128) -> tuple[jax.Array, jax.Array]:
  """Teacher-forced log-probs of responses under a model (policy, anchor or reference), jitted.

  Args:
    prompts, prompt_mask: [B, P] left-padded. responses, response_mask: [B, N, T] right-padded (as
      `sampling.generate` returns them; EOS included in the mask).
    temperature: > 0; log-softmax of logits / temperature, no truncation (1 = log pi, what BOND uses).
    chunk: positions per LM-head chunk (see `token_logprobs`).
  Returns:
    (per_token [B, N, T] float32, 0 on padding; summed [B, N] float32 sequence log-probs).
  """
  _check_temperature(temperature)
  if jnp.shape(prompts)[1] < 1:  # the first response token is predicted from the last prompt position
    raise ValueError("prompts of width 0 are not allowed: teacher forcing needs a prompt token")
  return _sequence_logprobs(cfg, params, jnp.asarray(prompts), jnp.asarray(prompt_mask, bool),
                            jnp.asarray(responses), jnp.asarray(response_mask, bool), float(temperature),
                            int(chunk))


@functools.partial(jax.jit, static_argnums=0)
def _rewards(cfg_rm, rm_params, prompts, prompt_mask, responses, response_mask):
  backbone = transformer.Transformer(cfg_rm, with_lm_head=False)
  prompt_hidden, hidden = _shared_prompt_hidden(backbone, rm_params["backbone"], prompts, prompt_mask,
                                                responses, response_mask)
  # the row's last real token: the response's, or the prompt's last (left-padded: its last column) when the
  # response is empty
  last = jnp.take_along_axis(hidden, reward.last_real_index(response_mask)[..., None, None], axis=2)[:, :, 0]
  last = jnp.where(jnp.any(response_mask, axis=-1)[..., None], last, prompt_hidden[:, None, -1])
  return reward.read_head(rm_params["head"], last)


def rewards(cfg_rm: ModelConfig, rm_params: Any, prompts: jax.Array, prompt_mask: jax.Array,
            responses: jax.Array, response_mask: jax.Array) -> jax.Array:
  """Reward-model scores [B, N] float32 of prompt + response, read at the response's last real token (e.g.
  its EOS). prompts, prompt_mask [B, P] left-padded; responses, response_mask [B, N, T] right-padded. Each
  prompt's forward runs once for its N responses (_shared_prompt_hidden)."""
  return _rewards(cfg_rm, rm_params, jnp.asarray(prompts), jnp.asarray(prompt_mask, bool),
                  jnp.asarray(responses), jnp.asarray(response_mask, bool))
