"""Rewards of sampled responses, by one of three routes (`score` is what rollouts and evaluation call):

1. a reward model that shares the policy's tokenizer: scoring.rewards on device, on the policy's ids (or,
   where the workdir's reward stage fitted a bag-of-words model, reward_training.model='bag_of_words',
   that model on the decoded prompts and responses, on the host as route 3);
2. a reward model with its OWN tokenizer and chat template (another family, another vocabulary): the
   policy's responses are decoded to text, the conversation is rendered with the reward model's template
   (prompt turns + the response as the assistant turn; without a template, prompt text + response) and
   encoded with its tokenizer, left-padded to a bucketed width (`bucket`) and scored on device;
3. a Python function `--config.reward_fn=package.module:function`: fn(prompts, responses) -> one float per
   response. prompts are the prompt records' values (a string, or a chat messages list), responses the
   decoded texts. It is the user's code, run in the training process.
Routes 2 and 3 run on the host between sampling and the update (`TextRewards`): every process computes the
same rewards from the all-gathered samples. Their cost is in BENCHMARKS.md.

`probe` calls a reward function once on two probe responses during validation, before anything is
compiled: a wrong shape or a non-finite value is found there, not after the first rollout.
`tie_rate` measures how often a prompt's rewards tie: BOND's quantiles need continuous rewards.
Shapes: B prompts, N responses per prompt, P prompt tokens, T response tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bond_jax import reward_baselines, scoring, sharding
from bond_jax.models import reward as reward_lib

TIED_WARNING = 0.5  # tie rate above which a run is warned that its rewards give BOND little signal
PROBE_RESPONSES = ("Hello!", "Sure. Here is a longer answer, with a number: 42.")


def import_function(spec: str, key: str = "reward_fn") -> Callable:
  """The callable `package.module:function` names (ValueError naming `key` when it cannot be had)."""
  module_name, sep, name = spec.partition(":")
  if not sep or not module_name or not name:
    raise ValueError(f"{key}={spec!r} must be 'package.module:function'")
  try:
    fn = functools.reduce(getattr, name.split("."), importlib.import_module(module_name))
  except Exception as error:  # ImportError, AttributeError, or whatever the module raises on import
    raise ValueError(f"{key}={spec!r} cannot be imported: {type(error).__name__}: {error}") from None
  if not callable(fn):
    raise ValueError(f"{key}={spec!r} is a {type(fn).__name__}, not a function")
  return fn


def checked(values: Any, count: int, key: str, finite: bool = True) -> np.ndarray:
  """values as float32 [count], or ValueError naming `key` for another shape or (finite=True) a non-finite
  value."""
  try:
    array = np.asarray(values, np.float64)
  except (TypeError, ValueError) as error:
    raise ValueError(f"{key} returned {type(values).__name__} that is not floats: {error}") from None
  if array.shape != (count,):
    raise ValueError(
        f"{key} returned shape {array.shape} for {count} responses; it must return one float per "
        "response (a list or 1-D array)")
  if finite and not np.all(np.isfinite(array)):
    raise ValueError(f"{key} returned non-finite values {array.tolist()}; rewards must be finite floats")
  return array.astype(np.float32)


def probe(fn: Callable, prompts: Sequence[Any], key: str = "reward_fn") -> np.ndarray:
  """fn on two probe responses to the first prompts (validation: before any compute)."""
  chosen = [prompts[i % len(prompts)] for i in range(len(PROBE_RESPONSES))]
  try:
    values = fn(chosen, list(PROBE_RESPONSES))
  except Exception as error:
    raise ValueError(f"{key} failed on the probe responses: {type(error).__name__}: {error}") from None
  return checked(values, len(PROBE_RESPONSES), key)


def place(tree: Any, mesh) -> Any:
  """Host arrays [R, ...] (the same on every process) on the mesh: rows split over (data, fsdp) when they
  divide, else replicated (an evaluation batch of a few prompts)."""
  rows = jax.tree.leaves(tree)[0].shape[0]
  if rows % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0:
    return sharding.global_batch(tree, mesh)
  return jax.device_put(tree, sharding.replicated(mesh))


def bucket(length: int) -> int:
  """The row width for `length` tokens: a multiple of a quarter of the power of two below it (at least 16),
  so at most 4 widths (compilations) per octave and, from 64 tokens on, at most 25% padding."""
  quarter = max(16, 1 << max(0, length.bit_length() - 3))
  return -(-length // quarter) * quarter


class ModelTexts:
  """A reward model with its own tokenizer: (prompts, responses) -> scores [len(responses)] float32."""

  def __init__(self, cfg, params, tokenizer, mesh):
    self.cfg, self.params, self.tokenizer, self.mesh = cfg, params, tokenizer, mesh
    self._score = jax.jit(reward_lib.score, static_argnums=0)

  def ids(self, prompt: Any, response: str) -> list[int]:
    """The reward model's ids of one conversation: its chat template when it has one."""
    tok = self.tokenizer
    if tok.chat is not None:
      messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
      text = tok.chat.render([*messages, {
          "role": "assistant",
          "content": response
      }], add_generation_prompt=False)
      return tok.encode_rendered(text)
    return tok.encode_plain_prompt(prompt + response)

  def __call__(self, prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
    seqs = [self.ids(p, r)[-self.cfg.max_seq_len:] for p, r in zip(prompts, responses)]
    width = min(bucket(max(len(s) for s in seqs)), self.cfg.max_seq_len)
    tokens = np.full((len(seqs), width), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for row, seq in enumerate(seqs):
      tokens[row, width - len(seq):], mask[row, width - len(seq):] = seq, True
    placed = place({"tokens": tokens, "mask": mask}, self.mesh)
    return np.asarray(sharding.to_host(self._score(self.cfg, self.params, placed["tokens"], placed["mask"])))


class TextRewards:
  """Routes 2 and 3: samples -> (prompt values, response texts) -> scorer -> rewards [B, N] on the mesh.

  prompt_of: {prompt ids (a tuple, no padding): the record's prompt value} of the run's prompts; a prompt
  not in it (a record read from TFDS) is the policy tokenizer's decoding of its ids. digest: what the
  scorer computes, hashed, where it is known (a fitted model's contents; None for a user's function):
  pools of pi_ref's rewards can then be kept (reference_pools.can_keep)."""

  def __init__(self, scorer: Callable, policy_tokenizer, prompt_of: dict[tuple[int, ...], Any],
               eos_ids: Sequence[int], mesh, key: str, digest: str | None = None):
    self.scorer, self.tokenizer, self.prompt_of = scorer, policy_tokenizer, prompt_of
    self.eos_ids, self.mesh, self.key = set(int(i) for i in eos_ids), mesh, key
    self.digest = digest

  def texts(self, prompts, prompt_mask, responses, response_mask) -> tuple[list[Any], list[str]]:
    prompts, prompt_mask, responses, response_mask = sharding.to_host(
        (prompts, prompt_mask, responses, response_mask))
    values, texts = [], []
    for b in range(responses.shape[0]):
      ids = tuple(int(i) for i in prompts[b][prompt_mask[b]])
      value = self.prompt_of.get(ids)
      value = self.tokenizer.decode(ids) if value is None else value
      for n in range(responses.shape[1]):
        response = [int(i) for i in responses[b, n][response_mask[b, n]]]
        if response and response[-1] in self.eos_ids:
          response = response[:-1]  # the end of turn is the template's to write
        values.append(value)
        texts.append(self.tokenizer.decode(response))
    return values, texts

  def __call__(self, prompts, prompt_mask, responses, response_mask) -> jax.Array:
    values, texts = self.texts(prompts, prompt_mask, responses, response_mask)
    # a non-finite reward in training is the update's non-finite guard's to drop, as a reward model's is
    scores = checked(self.scorer(values, texts), len(texts), self.key,
                     finite=False).reshape(responses.shape[:2])
    return place(scores, self.mesh)


def score(frozen, prompts, prompt_mask, responses, response_mask) -> jax.Array:
  """Rewards [B, N] float32 of responses [B, N, T] to prompts [B, P], by the run's route."""
  if frozen.text_rewards is not None:
    return frozen.text_rewards(prompts, prompt_mask, responses, response_mask)
  return scoring.rewards(frozen.reward_cfg, frozen.reward_params, prompts, prompt_mask, responses,
                         response_mask)


def tie_rate(rewards: Any) -> jax.Array:
  """The fraction of a prompt's response pairs whose rewards are equal, over rewards [B, M] (M >= 2): a
  float32 [] (traceable: the trainer computes it on device)."""
  rewards = jnp.asarray(rewards).reshape(len(rewards), -1)
  m = rewards.shape[1]
  if m < 2:
    return jnp.zeros((), jnp.float32)
  equal = rewards[:, :, None] == rewards[:, None, :]
  return ((jnp.sum(equal) - rewards.size) / (len(rewards) * m * (m - 1))).astype(jnp.float32)


def batch_tie_rate(batch: Any) -> jax.Array:
  """tie_rate over every `*_rewards` field of an update batch ([B] or [B, M] each), joined per prompt."""
  fields = [getattr(batch, f.name) for f in dataclasses.fields(batch) if f.name.endswith("rewards")]
  return tie_rate(jnp.concatenate([f.reshape(len(f), -1) for f in fields], axis=1))


def own_tokenizer(config, policy_tokenizer):
  """The reward model directory's own tokenizer when it differs from the policy's (route 2), else None."""
  from bond_jax.data import hf_tokenizer
  directory = config.reward_model
  if not directory or not os.path.isdir(directory) or not hf_tokenizer.has_tokenizer(directory):
    return None
  tok = hf_tokenizer.load(directory)
  same = all(tok.files.get(n) == policy_tokenizer.files.get(n) for n in ("tokenizer.json", "tokenizer.model"))
  return None if same else tok


def prompt_lookup(records: Any) -> dict[tuple[int, ...], Any]:
  """{prompt ids: prompt value} of records that carry their ids (prompt files); {} for a lazy source."""
  if not isinstance(records, list):
    return {}
  return {tuple(int(i) for i in r["tokens"]): r["prompt"] for r in records if "tokens" in r}


class Route(NamedTuple):
  """The reward model (cfg, params on the mesh; None for a function) and the host route, or None."""
  cfg: Any
  params: Any
  text: TextRewards | None


def route(config, policy_tokenizer, workdir: str, mesh, records: Any, eos_ids: Sequence[int]) -> Route:
  """The run's reward route: config.reward_fn, or the reward model (given, or this workdir's) on the
  policy's ids or, when it has its own tokenizer, on text."""
  lookup = prompt_lookup(records)
  if config.get("reward_fn"):
    fn = import_function(config.reward_fn)
    return Route(None, None, TextRewards(fn, policy_tokenizer, lookup, eos_ids, mesh, "reward_fn"))
  from bond_jax import workdir as workdir_lib
  bag_of_words = workdir_lib.bag_of_words_path(config.reward_model or workdir)
  if os.path.exists(bag_of_words):  # that workdir's reward stage fitted a bag-of-words model
    model = reward_baselines.BagOfWords.load(bag_of_words)
    return Route(
        None, None,
        TextRewards(model.scores, policy_tokenizer, lookup, eos_ids, mesh,
                    f"the bag-of-words reward {bag_of_words}", digest=model.digest()))
  from bond_jax import artifacts  # deferred: artifacts reads checkpoints and Hugging Face directories
  params, cfg = artifacts.load(config.reward_model or workdir, "reward", mesh)
  own = own_tokenizer(config, policy_tokenizer)
  if own is None:
    return Route(cfg, params, None)
  scorer = ModelTexts(cfg, params, own, mesh)
  return Route(
      cfg, params,
      TextRewards(scorer, policy_tokenizer, lookup, eos_ids, mesh, f"reward_model={config.reward_model!r}"))


def validate(config, policy_tokenizer, rm_cfg, prompts: Sequence[Any]) -> None:
  """The reward settings, before any compute: one of reward_model / reward_fn; a reward model whose
  vocabulary differs from the policy's holds its own tokenizer (with a chat template for chat prompts);
  a reward function imports and gives finite floats of the right shape on two probe responses."""
  fn = config.get("reward_fn", "")
  if fn and config.reward_model:
    raise ValueError(f"reward_model={config.reward_model!r} and reward_fn={fn!r} are both set; give one")
  if fn:
    probe(import_function(fn), prompts or ["Say something kind."])
    return
  if rm_cfg is None or policy_tokenizer is None:
    return
  own = own_tokenizer(config, policy_tokenizer)
  if own is None:
    if rm_cfg.vocab_size < policy_tokenizer.vocab_size:
      raise ValueError(
          f"reward_model={config.reward_model!r} has vocab_size={rm_cfg.vocab_size} but the policy has "
          f"{policy_tokenizer.vocab_size} tokens and the directory holds no tokenizer of its own "
          "(tokenizer.json or tokenizer.model): it would score the policy's token ids")
    return
  if own.vocab_size > rm_cfg.vocab_size:
    raise ValueError(
        f"reward_model={config.reward_model!r}: its tokenizer has {own.vocab_size} tokens but the "
        f"model's vocab_size is {rm_cfg.vocab_size}")
  if any(isinstance(p, list) for p in prompts) and own.chat is None:
    raise ValueError(f"reward_model={config.reward_model!r}: the prompts are chat messages and its tokenizer "
                     "has no chat template to render them with the response")


def records_of(*sources: Any) -> list[dict[str, Any]]:
  """The records of in-memory prompt sources (lists) joined; a lazy source (TFDS) adds none."""
  return [r for source in sources if isinstance(source, list) for r in source]
