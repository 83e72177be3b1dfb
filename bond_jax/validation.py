"""The whole run config, checked once before anything is written or computed.

`validate(config, until)` is what the pipeline (and the plan CLI) calls first: every error is one line
naming the full config key, its value and what is allowed. It builds no model and reads no dataset but
the user's prompt files: the model shapes come from the preset (or, for given models, from their
config.json / checkpoint metadata), so a bad value is reported in seconds, before the tokenizer, the
datasets or any stage is built.
What it checks, by section:
  model, mesh      the preset exists; the mesh fits the devices and divides the model's sharded dims;
  data             the task, turns, prompt buckets; prompt bucket + sampling.max_new_tokens fit the context;
  sft, reward_training, train
                   steps / log_every / eval_every / checkpoint_every / keep_checkpoints / max_bad_steps
                   >= 1; batch sizes divide over processes and the mesh's batch axes (with grad_accum_steps);
  sft, reward_training, optimizer
                   learning_rate > 0, warmup_steps >= 0, schedule, b1 / b2 in [0, 1), eps > 0, weight_decay >= 0,
                   clip_norm >= 0, grad_accum_steps >= 1;
  bond, sampling   the algorithm and its hyperparameters; training samples at temperature 1 (BOND's
                   losses need samples of pi itself);
  eval             sample counts and the Best-of-N list;
  paths            reference, reward_model and data.tokenizer exist and hold what they must; a given
                   reference and reward model agree on the vocabulary, unless the reward model directory
                   holds its own tokenizer (then its responses are re-encoded: rewards.py);
  prompts, rewards (task 'prompts', or a reward_fn) the prompt files are read and encoded (a missing, empty
                   or unknown source, a field no record has, chat prompts without a chat template, no usable
                   record: data/prompt_files.py), and a reward function is imported and CALLED once on two
                   probe responses (its shape and finiteness can only be seen by calling it).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import ml_collections

from bond_jax import algorithms, checkpoint, sharding, update
from bond_jax import workdir as workdir_lib
from bond_jax.data import hf_tokenizer, prepare
from bond_jax.models import lora as lora_lib
from bond_jax.models import presets
from bond_jax.models.config import ModelConfig

UNTIL = ("sft", "reward", "bond")  # the stages a run can stop after (the pipeline's order)
_SCHEDULE_KEYS = ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps")
TASKS = ("chitchat", "summarization", "prompts")


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _positive_int(key: str, value: Any) -> None:
  _require(
      isinstance(value, int) and not isinstance(value, bool) and value >= 1,
      f"{key}={value!r} must be an integer >= 1")


def _pool_dir(key: str, value: Any) -> None:
  """A directory that pi_ref's pools are kept in (reference_pools.py): '' or a path that is not a file."""
  _require(isinstance(value, str), f"{key}={value!r} must be a directory path ('' = the default)")
  _require(not value or not os.path.exists(value) or os.path.isdir(value),
           f"{key}={value!r} is a file; allowed: a directory (made if missing) or ''")


def _schedule(name: str, section: ml_collections.ConfigDict) -> None:
  for key in _SCHEDULE_KEYS:
    _positive_int(f"{name}.{key}", section[key])


def _optimizer(name: str, section: ml_collections.ConfigDict) -> None:
  o = section
  _require(o.learning_rate > 0 and math.isfinite(o.learning_rate),
           f"{name}.learning_rate={o.learning_rate} must be > 0 and finite")
  _require(
      isinstance(o.warmup_steps, int) and o.warmup_steps >= 0,
      f"{name}.warmup_steps={o.warmup_steps!r} must be an integer >= 0")
  _require(o.schedule in update.SCHEDULES,
           f"{name}.schedule={o.schedule!r}; allowed: {', '.join(update.SCHEDULES)}")
  _require(0 <= o.end_lr_fraction <= 1, f"{name}.end_lr_fraction={o.end_lr_fraction} must lie in [0, 1]")
  for key in ("b1", "b2"):
    _require(0 <= o[key] < 1, f"{name}.{key}={o[key]} must lie in [0, 1)")
  _require(o.eps > 0 and math.isfinite(o.eps), f"{name}.eps={o.eps} must be > 0 and finite")
  _require(o.weight_decay >= 0, f"{name}.weight_decay={o.weight_decay} must be >= 0")
  _require(o.clip_norm >= 0, f"{name}.clip_norm={o.clip_norm} must be >= 0 (0 = no clipping)")
  _positive_int(f"{name}.grad_accum_steps", o.grad_accum_steps)


def _rows_divide(key: str, batch: int, accum: int, rows: int) -> None:
  _require(
      batch % (accum * rows) == 0,
      f"{key}={batch} must be divisible by grad_accum_steps * data * fsdp = {accum} * {rows} = "
      f"{accum * rows} (the update's rows are split over those mesh axes)")
  _require(batch % jax.process_count() == 0,
           f"{key}={batch} must be divisible by the {jax.process_count()} processes")


def _data(config: ml_collections.ConfigDict) -> None:
  d = config.data
  _require(d.task in TASKS, f"data.task={d.task!r}; allowed: {', '.join(TASKS)}")
  buckets = tuple(d.prompt_buckets)
  _require(
      bool(buckets) and all(isinstance(b, int) and b >= 2 for b in buckets) and
      list(buckets) == sorted(set(buckets)),
      f"data.prompt_buckets={buckets} must be increasing prompt widths >= 2")
  if d.task == "chitchat":
    _positive_int("data.response_turns", d.response_turns)
    _require(
        isinstance(d.prompt_turns, int) and d.prompt_turns >= 0,
        f"data.prompt_turns={d.prompt_turns!r} must be an integer >= 0")
    _require(
        isinstance(d.context_turns, int) and d.context_turns >= 0,
        f"data.context_turns={d.context_turns!r} must be an integer >= 0")
    _require(d.max_conversations >= 0, f"data.max_conversations={d.max_conversations} must be >= 0 (0 = all)")
  if d.tokenizer:
    _require(
        os.path.isfile(d.tokenizer) or
        (os.path.isdir(d.tokenizer) and hf_tokenizer.has_tokenizer(d.tokenizer)),
        f"data.tokenizer={d.tokenizer!r} is not a file (a SentencePiece .model) or a directory with "
        "tokenizer.json or tokenizer.model")
  elif d.task == "prompts":
    _require(
        bool(prepare.tokenizer_source(config)), f"data.tokenizer is empty and reference={config.reference!r} "
        "holds no tokenizer.json or tokenizer.model; give --config.data.tokenizer")
  elif d.task not in prepare.TASKS_WITH_STAGES:
    raise ValueError(f"data.tokenizer is empty: the {d.task!r} task trains no tokenizer; give the policy's "
                     "tokenizer.model")
  elif not config.reference:
    _require(d.vocab_size >= 16, f"data.vocab_size={d.vocab_size} must be >= 16 for a tokenizer trained here")


def _model_of(source: str, kind: str, key: str) -> ModelConfig:
  """The ModelConfig a given model directory holds, read from its metadata only (no weights)."""
  from bond_jax import artifacts, hf  # deferred: artifacts imports Orbax-restore paths only used here
  _require(
      os.path.isdir(source), f"{key}={source!r} is not a directory (a workdir, a stage checkpoint "
      "directory or a Hugging Face model directory)")
  if artifacts.is_hf_dir(source):
    try:
      hf.check_kind(source, kind)
    except ValueError as error:
      raise ValueError(f"{key}={source!r}: {error}") from None
    return hf.load_config(source)[0]
  directory = artifacts.stage_checkpoints(source, kind)
  _require(directory is not None, f"{key}={source!r} holds no {kind!r} checkpoint and no Hugging Face model")
  meta, _ = checkpoint.read_meta(directory)
  _require(
      meta.get("kind") == kind, f"{key}={source!r} holds a {meta.get('kind')!r} checkpoint; need {kind!r}")
  return ModelConfig.from_dict(meta["model"])


def _models(config: ml_collections.ConfigDict) -> tuple[ModelConfig, ModelConfig | None]:
  """(policy config, reward-model config or None when it is trained here)."""
  if config.reference:
    policy = _model_of(config.reference, "lm", "reference")
  else:
    _require(config.model.preset in presets.PRESETS,
             f"model.preset={config.model.preset!r}; allowed: {', '.join(presets.PRESETS)}")
    vocab = None if config.data.tokenizer else config.data.vocab_size
    policy = presets.from_config(config.model, vocab)
  bag_of_words = config.reward_model and os.path.exists(workdir_lib.bag_of_words_path(config.reward_model))
  rm = _model_of(config.reward_model, "reward",
                 "reward_model") if config.reward_model and not bag_of_words else None
  if rm is not None and not hf_tokenizer.has_tokenizer(config.reward_model):
    _require(
        rm.vocab_size == policy.vocab_size,
        f"reward_model={config.reward_model!r} has vocab_size={rm.vocab_size} but the policy has "
        f"{policy.vocab_size} and the directory holds no tokenizer of its own (tokenizer.json or "
        "tokenizer.model): it would score the policy's token ids, so the vocabularies must be the same")
  if prepare.tokenizer_source(config):
    pieces = hf_tokenizer.load(prepare.tokenizer_source(config)).vocab_size
    _require(
        pieces <= policy.vocab_size,
        f"tokenizer {prepare.tokenizer_source(config)!r} has {pieces} pieces but the "
        f"policy's vocab_size is {policy.vocab_size}; give the policy's own "
        "tokenizer")
  return policy, rm


def _mesh(config: ml_collections.ConfigDict, policy: ModelConfig) -> int:
  """The mesh fits the devices and divides the sharded dims; returns data * fsdp (the row split)."""
  try:
    mesh = sharding.make_mesh(config.mesh.to_dict())
  except ValueError as error:
    raise ValueError(f"mesh: {error}") from None
  from bond_jax.models import params as params_lib  # deferred: builds abstract params
  for kind in ("lm", "reward"):
    try:
      sharding.check_divisible(params_lib.shapes(policy, kind), params_lib.logical_axes(policy, kind), mesh)
    except ValueError as error:
      raise ValueError(f"mesh={dict(mesh.shape)}: {error}") from None
  return mesh.shape["data"] * mesh.shape["fsdp"]


def validate(config: ml_collections.ConfigDict, until: str = "bond") -> ModelConfig:
  """Every check above for a run that stops after stage `until`; returns the policy's ModelConfig."""
  _require(until in UNTIL, f"--until={until!r}; allowed: {', '.join(UNTIL)}")
  _require(isinstance(config.seed, int), f"seed={config.seed!r} must be an integer")
  _data(config)
  _require(
      config.data.task == "chitchat" or (config.reference and
                                         (config.reward_model or config.get("reward_fn"))),
      f"data.task={config.data.task!r} has no SFT / reward stages; give reference and reward_model "
      "(or reward_fn)")
  policy, rm = _models(config)
  rows = _mesh(config, policy)
  for name, section in (("sft", config.sft), ("reward_training", config.reward_training)):
    _schedule(name, section)
    _optimizer(name, section)
    _rows_divide(f"{name}.batch_size", section.batch_size, 1, rows)
  _require(config.sft.seq_len >= 2, f"sft.seq_len={config.sft.seq_len} must be >= 2")
  rt = config.reward_training
  _require(
      workdir_lib.reward_model_kind(config) in workdir_lib.REWARD_MODELS,
      f"reward_training.model={rt.get('model')!r}; allowed: {', '.join(workdir_lib.REWARD_MODELS)}")
  _require(
      max(rt.buckets) == rt.max_len, f"reward_training.buckets={tuple(rt.buckets)} must end at "
      f"reward_training.max_len={rt.max_len}")
  if until == "bond":
    _distill(config, policy, rows)
    _prompts_and_rewards(config, rm)
  return policy


def _prompts_and_rewards(config: ml_collections.ConfigDict, rm: ModelConfig | None) -> None:
  """Prompt files (read and encoded: bad sources and records are reported here) and the reward route
  (a reward function is called once on probe responses: the only way to see what it returns)."""
  from bond_jax import rewards  # deferred: imports the scoring path
  from bond_jax.data import prompt_files, prompts as prompts_lib
  source = prepare.tokenizer_source(config)
  tok = hf_tokenizer.load(source) if source else None
  probe_prompts = []
  if config.data.task == "prompts":
    train, held_out = prompt_files.load_splits(config, tok)
    _require(
        bool(prompts_lib.eos_ids(config, tok)), f"tokenizer {source!r} has no eos_token and no chat "
        "template end of turn: nothing would end a sampled response")
    _require(
        bool(held_out.records) or not config.eval.num_prompts,
        f"eval.num_prompts={config.eval.num_prompts} needs held-out prompts: set data.held_out or "
        "data.held_out_fraction > 0 (or eval.num_prompts=0)")
    probe_prompts = [r["prompt"] for r in train.records[:2]]
  rewards.validate(config, tok, rm, probe_prompts)


def _distill(config: ml_collections.ConfigDict, policy: ModelConfig, rows: int) -> None:
  _schedule("train", config.train)
  _optimizer("optimizer", config.optimizer)
  _rows_divide("train.batch_size", config.train.batch_size, config.optimizer.grad_accum_steps, rows)
  algorithms.validate(config.bond)
  lora = lora_lib.from_section(config.get("lora"))
  if lora is not None:
    lora.validate(policy)
  s = config.sampling
  _require((s.temperature, s.top_k, s.top_p) == (1.0, 0, 1.0),
           f"sampling temperature={s.temperature}, top_k={s.top_k}, top_p={s.top_p}: BOND's losses need "
           "samples from pi itself; allowed for training: 1.0, 0, 1.0")
  _positive_int("sampling.max_new_tokens", s.max_new_tokens)
  widest = max(config.data.prompt_buckets)
  _require(
      widest + s.max_new_tokens <= policy.max_seq_len,
      f"data.prompt_buckets up to {widest} + sampling.max_new_tokens={s.max_new_tokens} = "
      f"{widest + s.max_new_tokens} exceeds the model's context max_seq_len={policy.max_seq_len}")
  _pool_dir("bond.pool_dir", config.bond.get("pool_dir", ""))
  e = config.eval
  _pool_dir("eval.pool_dir", e.get("pool_dir", ""))
  _positive_int("eval.policy_samples", e.policy_samples)
  _positive_int("eval.quantile_samples", e.quantile_samples)
  _require(
      isinstance(e.num_prompts, int) and e.num_prompts >= 0,
      f"eval.num_prompts={e.num_prompts!r} must be an integer >= 0 (0 turns evaluation off)")
  _require(
      bool(e.best_of) and all(1 <= n <= e.quantile_samples for n in e.best_of),
      f"eval.best_of={tuple(e.best_of)}: each N must be in [1, eval.quantile_samples={e.quantile_samples}]")
  if e.get("best_of_n_kl"):
    tracked = algorithms.get(config.bond.algorithm).target_best_of(config.bond, config.train.steps)
    _require(
        tracked is not None and tracked <= e.quantile_samples,
        f"eval.best_of_n_kl=True needs an algorithm that aims at a Best-of-N <= eval.quantile_samples="
        f"{e.quantile_samples}; bond.algorithm={config.bond.algorithm!r} aims at {tracked}")
