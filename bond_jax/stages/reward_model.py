"""Reward stage: a Bradley-Terry reward model on chitchat preference pairs, initialised from the SFT policy.

    python -m bond_jax.train --config=configs/dialogue.py --workdir=runs/dialogue --until=reward

Loss: -log sigmoid(r(x, chosen) - r(x, rejected)), averaged over pairs (preference_batches). The backbone
starts from the SFT checkpoint of the workdir (the pipeline runs that stage first) or from
config.reference; the scalar
head starts at zero, so every pair starts at a margin of 0.

Reported on three held-out sets of pairs (chitchat.PREFERENCE_SPLITS): 'in_distribution' (the training
topics' held-out conversations, which the distillation stage's in-distribution prompts come from),
'validation' and 'test' (unseen topics): pairwise accuracy (a tie counts 1/2) with a 95% Wilson interval,
beside two baselines on the same pairs (bond_jax/reward_baselines.py): the longer response, and a
bag-of-words Bradley-Terry model fitted on the training pairs. The interval treats pairs as independent
draws; they are not (a split holds few starter prompts, and each conversation appears in several pairs),
so it understates the real uncertainty; the number of distinct prompts is reported with it.

With reward_training.model='bag_of_words' the stage trains no network: the reward model IS the
bag-of-words Bradley-Terry model (fitted once on the same training pairs, in seconds; `fit_bag_of_words`),
saved to <workdir>/reward/bag_of_words.json with its held-out accuracy beside the length baseline. The
distillation stage then scores responses by it on the host (rewards.route). Why a default may want it: on
the embedded task it is the more accurate model of the human ratings, and the one a small policy can learn
to please (docs/results.md).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bond_jax import artifacts, loop, reward_baselines, sharding, update
from bond_jax import workdir as workdir_lib
from bond_jax.data import pipeline
from bond_jax.data.tokenizer import Tokenizer
from bond_jax.models import params as params_lib
from bond_jax.models import reward
from bond_jax.models.config import ModelConfig
from bond_jax.stages.context import Context

STAGE, KIND = "reward", "reward"
NDIMS = {"tokens": 3, "mask": 3, "response_mask": 3}
EVAL_SPLITS = ("in_distribution", "validation", "test")
BASELINES = (("length", "longer response"), ("bow", "bag-of-words"))
Z_95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion (successes may be fractional: ties count 1/2)."""
  if n < 1:
    raise ValueError(f"n={n}: an interval needs at least one trial")
  if not 0 <= successes <= n:
    raise ValueError(f"successes={successes} must lie in [0, n={n}]")
  p = successes / n
  denom = 1 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return max(0.0, center - half), min(1.0, center + half)


def bradley_terry_loss(cfg: ModelConfig):
  """(params, batch) -> (mean -log sigmoid(r_chosen - r_rejected), {accuracy, margin})."""

  def fn(params, batch):
    scores = score_pairs(cfg, params, batch["tokens"], batch["mask"])
    margin = scores[:, 0] - scores[:, 1]
    loss = jnp.mean(jax.nn.softplus(-margin))  # = -log sigmoid(margin), stable for large |margin|
    accuracy = jnp.mean(jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0)))
    return loss, {"accuracy": accuracy, "margin": jnp.mean(margin)}

  return fn


def score_pairs(cfg: ModelConfig, params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """tokens, mask [B, 2, L] (chosen, rejected; left-padded) -> scores [B, 2]."""
  b, two, length = tokens.shape
  flat = reward.score(cfg, params, tokens.reshape(b * two, length), mask.reshape(b * two, length))
  return flat.reshape(b, two)


def pair_batches(records: Sequence[dict], tokenizer: Tokenizer, batch_size: int,
                 buckets: Sequence[int]) -> list[tuple[dict[str, np.ndarray], int]]:
  """Every pair of `records` in order, as (batch of batch_size pairs, number of real pairs in it): the
  last batch is filled up with copies of its first pair, which callers drop."""
  out = []
  for start in range(0, len(records), batch_size):
    chunk = list(records[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[0]] * (batch_size - real)
    seqs = [
        pipeline.encode_sequence(tokenizer, r["prompt"], r[k], max(buckets)) for r in chunk
        for k in ("chosen", "rejected")
    ]
    tokens, mask = pipeline.pad_batch([s["tokens"] for s in seqs], buckets, tokenizer.pad_id, "left")
    response_mask, _ = pipeline.pad_batch([s["response_mask"] for s in seqs], buckets, 0, "left")
    shape = (batch_size, 2, tokens.shape[-1])
    out.append(({
        "tokens": tokens.reshape(shape),
        "mask": mask.reshape(shape),
        "response_mask": response_mask.astype(bool).reshape(shape)
    }, real))
  return out


def _summary(prefix: str, wins: np.ndarray) -> dict[str, float]:
  low, high = wilson_interval(float(wins.sum()), len(wins))
  return {f"{prefix}accuracy": float(wins.mean()), f"{prefix}ci_low": low, f"{prefix}ci_high": high}


def baseline_metrics(train: Sequence[dict], splits: dict[str, list[dict]],
                     tokenizer: Tokenizer) -> dict[str, float]:
  """Pairs, prompts and both baselines' accuracy per held-out split (they do not depend on the params)."""
  bow = reward_baselines.BagOfWords(train)
  out = {}
  for name, records in splits.items():
    out[f"{name}_pairs"] = float(len(records))
    out[f"{name}_prompts"] = float(len({r["prompt"] for r in records}))
    out.update(_summary(f"{name}_length_", reward_baselines.length_wins(records, tokenizer)))
    out.update(_summary(f"{name}_bow_", bow.wins(records)))
  return out


def make_evaluate(cfg: ModelConfig, mesh, param_shardings, splits: dict[str, list[dict]],
                  fixed: dict[str, float], tokenizer: Tokenizer, batch_size: int, buckets: Sequence[int]):
  """(params, final) -> metrics on the first split, and on every split when final; `fixed` (the
  baselines) joins each split's metrics."""
  score = jax.jit(
      lambda params, b: score_pairs(cfg, params, b["tokens"], b["mask"]), in_shardings=(param_shardings, {
          k: sharding.batch_sharding(mesh, n) for k, n in NDIMS.items()
      }), out_shardings=sharding.replicated(mesh))
  batches = {name: pair_batches(records, tokenizer, batch_size, buckets) for name, records in splits.items()}

  def evaluate(params, final: bool = True) -> dict[str, float]:
    metrics = {}
    for name in splits if final else list(splits)[:1]:
      scores = [(score(params, sharding.shard_batch(b, mesh)), real) for b, real in batches[name]]
      margins = np.concatenate([np.asarray(s)[:real, 0] - np.asarray(s)[:real, 1] for s, real in scores])
      metrics.update(_summary(f"{name}_", reward_baselines.wins(margins)))
      metrics.update({k: v for k, v in fixed.items() if k.startswith(f"{name}_")})
    return metrics

  return evaluate


def _records(source) -> list[dict]:
  getitems = getattr(source, "__getitems__", None)  # one batched read of the array_record file
  records = getitems(list(range(len(source)))) if getitems else [source[i] for i in range(len(source))]
  return [pipeline.decode_texts(r) for r in records]


def initial_params(ctx: Context) -> tuple[Any, ModelConfig]:
  """Reward params whose backbone is the SFT policy's (config.reference, else this workdir's SFT stage,
  which the pipeline ran first) and whose head is zero."""
  policy, cfg = artifacts.load(ctx.config.reference or ctx.workdir, "lm", ctx.mesh)
  rng = jax.random.fold_in(jax.random.key(ctx.config.seed), 1)
  return reward.from_policy(policy, params_lib.init_sharded(cfg, KIND, rng, ctx.mesh)), cfg


def _splits(builder) -> dict[str, list[dict]]:
  """{split: records} of the training split and the held-out splits present."""
  present = builder.info.splits
  if "train" not in present or not any(name in present for name in EVAL_SPLITS):
    raise ValueError(f"preference splits {sorted(present)} lack train or a held-out split; raise "
                     "data.max_conversations (0 = all)")
  meta = builder.info.metadata
  names = ("train", *EVAL_SPLITS)
  if jax.process_index() == 0:
    print(
        f"[{STAGE}] pairs {'/'.join(names)} {'/'.join(str(meta.get(f'pairs_{n}', 0)) for n in names)} over "
        f"{'/'.join(str(meta.get(f'prompts_{n}', 0)) for n in names)} starter prompts", flush=True)
  return {name: _records(builder.as_data_source(name)) for name in names if name in present}


def build(ctx: Context) -> loop.Stage:
  """The reward stage of `ctx.workdir`: Bradley-Terry from the SFT backbone on the preference pairs."""
  config, tokenizer, mesh, c = ctx.config, ctx.tokenizer, ctx.mesh, ctx.config.reward_training
  params, cfg = initial_params(ctx)
  builder = ctx.preferences
  splits = _splits(builder)
  fixed = baseline_metrics(splits.pop("train"), splits, tokenizer)
  pcount, buckets = jax.process_count(), tuple(c.buckets)
  batches = pipeline.preference_batches(builder.as_data_source("train"), tokenizer,
                                        batch_size=c.batch_size // pcount, buckets=buckets, seed=config.seed,
                                        process_index=jax.process_index(), process_count=pcount)
  optimizer = update.make_optimizer(update.OptimizerConfig.from_section(c, c.steps))
  state = update.new_state(params, optimizer, mesh)
  loss = bradley_terry_loss(cfg)
  step = update.build_update_step(lambda params, anchor, ref, batch: loss(params, batch), optimizer,
                                  mesh=mesh, state_sharding=sharding.shardings_of(state))
  # Evaluation batches are global (every process scores every pair), rows split over the mesh.
  evaluate = make_evaluate(cfg, mesh, sharding.shardings_of(state.params), splits, fixed, tokenizer,
                           c.batch_size, buckets)
  return loop.Stage(
      name=STAGE, kind=KIND, mesh=mesh, model=cfg, schedule=loop.Schedule.from_section(c), state=state,
      step=lambda state, batch: step(state, None, batch), batches=batches, prepare=lambda batch, state, step:
      (sharding.shard_batch(batch, mesh), {
          "tokens": float(batch["mask"].sum())
      }), evaluate=lambda state, step, final: evaluate(state.params, final))


def finished(config, workdir: str) -> dict[str, Any] | None:
  """The final metrics of the workdir's reward stage of this config's model, if it finished; else None."""
  if not workdir_lib.is_bag_of_words(config):
    return loop.finished(workdir, STAGE, config.reward_training.steps)
  try:
    with open(workdir_lib.bag_of_words_path(workdir)) as f:
      return dict(json.load(f)["metrics"])
  except (OSError, ValueError, KeyError):
    return None


def fit_bag_of_words(ctx: Context) -> dict[str, Any]:
  """The stage with reward_training.model='bag_of_words': fit the Bradley-Terry bag-of-words model on the
  training pairs, measure it on every held-out split beside the length baseline, and save both (one file,
  written atomically: a killed fit leaves nothing behind). Returns the metrics `report` prints."""
  splits = _splits(ctx.preferences)
  train = splits.pop("train")
  model = reward_baselines.BagOfWords(train)
  metrics = {"step": 0, "model": "bag_of_words", "words": len(model.index)}
  for name, records in splits.items():
    metrics[f"{name}_pairs"] = float(len(records))
    metrics[f"{name}_prompts"] = float(len({r["prompt"] for r in records}))
    metrics.update(_summary(f"{name}_", model.wins(records)))
    metrics.update(_summary(f"{name}_length_", reward_baselines.length_wins(records, ctx.tokenizer)))
  path = workdir_lib.bag_of_words_path(ctx.workdir)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model.save(path, metrics=metrics, train_pairs=len(train))
  return metrics


def report(m: dict[str, Any]) -> str:
  what = (f"bag-of-words model ({m['words']} words)"
          if m.get("model") == "bag_of_words" else f"step {m['step']}")
  lines = [
      f"[{STAGE}] {what}: held-out pairwise accuracy (95% Wilson interval; pairs share "
      "starter prompts, so the interval is optimistic)"
  ]
  interval = lambda p: f"{m[f'{p}accuracy']:.3f} [{m[f'{p}ci_low']:.3f}, {m[f'{p}ci_high']:.3f}]"
  for name in (n for n in EVAL_SPLITS if f"{n}_accuracy" in m):
    baselines = "; ".join(
        f"{label} {interval(f'{name}_{key}_')}" for key, label in BASELINES if f"{name}_{key}_accuracy" in m)
    lines.append(f"  {name}: {interval(f'{name}_')} on {m[f'{name}_pairs']:.0f} pairs / "
                 f"{m[f'{name}_prompts']:.0f} prompts; {baselines}")
  return "\n".join(lines)
