"""Reward stage: a Bradley-Terry reward model on chitchat preference pairs, initialised from the SFT policy.

    python -m bond_jax.reward_training --config=configs/dialogue.py --workdir=runs/dialogue

Loss: -log sigmoid(r(x, chosen) - r(x, rejected)), averaged over pairs (preference_batches). The backbone
starts from the SFT checkpoint of the workdir (run first, cached) or from config.reference; the scalar
head starts at zero, so every pair starts at a margin of 0.

Reported on the validation and test pairs (their starter prompts are unseen in training): pairwise
accuracy (a tie counts 1/2) with a 95% Wilson interval, and the accuracy of the "longer response wins"
baseline on the same pairs. The interval treats pairs as independent draws; they are not (a split holds
only a few starter prompts, and each conversation appears in several pairs), so it understates the real
uncertainty; the number of distinct prompts is reported with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bond_jax import sharding, sft, stages, workdir as wd
from bond_jax.data import pipeline
from bond_jax.data.tokenizer import Tokenizer
from bond_jax.models import reward
from bond_jax.models.config import ModelConfig

STAGE, KIND = "reward", "reward"
NDIMS = {"tokens": 3, "mask": 3, "response_mask": 3}
EVAL_SPLITS = ("validation", "test")
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


def pairwise_wins(margins: np.ndarray) -> np.ndarray:
  """[N] 1 where chosen scores higher, 1/2 on a tie, 0 otherwise."""
  return np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0))


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
    seqs = [pipeline.encode_sequence(tokenizer, r["prompt"], r[k], max(buckets))
            for r in chunk for k in ("chosen", "rejected")]
    tokens, mask = pipeline.pad_batch([s["tokens"] for s in seqs], buckets, tokenizer.pad_id, "left")
    response_mask, _ = pipeline.pad_batch([s["response_mask"] for s in seqs], buckets, 0, "left")
    shape = (batch_size, 2, tokens.shape[-1])
    out.append(({"tokens": tokens.reshape(shape), "mask": mask.reshape(shape),
                 "response_mask": response_mask.astype(bool).reshape(shape)}, real))
  return out


def length_baseline_wins(records: Sequence[dict], tokenizer: Tokenizer) -> np.ndarray:
  """[N] wins of "the response with more tokens is preferred" (a tie counts 1/2)."""
  chosen = np.array([len(ids) for ids in tokenizer.encode_batch([r["chosen"] for r in records])])
  rejected = np.array([len(ids) for ids in tokenizer.encode_batch([r["rejected"] for r in records])])
  return pairwise_wins((chosen - rejected).astype(np.float64))


def _summary(prefix: str, wins: np.ndarray) -> dict[str, float]:
  low, high = wilson_interval(float(wins.sum()), len(wins))
  return {f"{prefix}accuracy": float(wins.mean()), f"{prefix}ci_low": low, f"{prefix}ci_high": high}


def make_evaluate(cfg: ModelConfig, mesh, param_shardings, splits: dict[str, list[dict]],
                  tokenizer: Tokenizer, batch_size: int, buckets: Sequence[int]):
  """(params, final) -> metrics on the first split (validation), and on every split when final."""
  score = jax.jit(lambda params, b: score_pairs(cfg, params, b["tokens"], b["mask"]),
                  in_shardings=(param_shardings, stages.batch_shardings(mesh, NDIMS)),
                  out_shardings=sharding.replicated(mesh))
  batches = {name: pair_batches(records, tokenizer, batch_size, buckets) for name, records in splits.items()}
  fixed = {}  # metrics that do not depend on the params
  for name, records in splits.items():
    fixed[f"{name}_pairs"] = float(len(records))
    fixed[f"{name}_prompts"] = float(len({r["prompt"] for r in records}))
    fixed.update(_summary(f"{name}_length_", length_baseline_wins(records, tokenizer)))

  def evaluate(params, final: bool = True) -> dict[str, float]:
    metrics = {}
    for name in splits if final else list(splits)[:1]:
      scores = [(score(params, sharding.shard_batch(b, mesh)), real) for b, real in batches[name]]
      margins = np.concatenate([np.asarray(s)[:real, 0] - np.asarray(s)[:real, 1] for s, real in scores])
      metrics.update(_summary(f"{name}_", pairwise_wins(margins)))
      metrics.update({k: v for k, v in fixed.items() if k.startswith(f"{name}_")})
    return metrics

  return evaluate


def _records(source) -> list[dict]:
  getitems = getattr(source, "__getitems__", None)  # one batched read of the array_record file
  records = getitems(list(range(len(source)))) if getitems else [source[i] for i in range(len(source))]
  return [pipeline.decode_texts(r) for r in records]


def initial_params(config: ml_collections.ConfigDict, workdir: str, mesh) -> tuple[Any, ModelConfig]:
  """Reward params whose backbone is the SFT policy's (config.reference, else this workdir's SFT stage,
  trained first if needed) and whose head is zero."""
  if not config.reference:
    sft.run(config, workdir)
  policy, cfg = wd.load_stage_params(config.reference or workdir, "lm", mesh)
  rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  fresh, _ = sharding.init_sharded(lambda r: reward.init_boxed(cfg, r), rng, mesh)
  return reward.from_policy(policy, fresh), cfg


def run(config: ml_collections.ConfigDict, workdir: str, *,
        stop_at_step: int | None = None) -> dict[str, Any]:
  """Train (or resume, or skip when finished) the reward model of `workdir`; returns its final metrics:
  step, {validation,test}_{accuracy,ci_low,ci_high,length_accuracy,length_ci_low,length_ci_high,pairs,
  prompts}. stop_at_step: leave early (see stages.train)."""
  wd.check_config(config, workdir)
  c = config.reward_training
  done = stages.finished_metrics(workdir, STAGE, c.steps)
  if done is not None:
    print(report(done), flush=True)
    return done
  mesh = wd.make_mesh(config)
  params, cfg = initial_params(config, workdir, mesh)
  tokenizer = wd.prepare_tokenizer(config, workdir)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                     f"{cfg.vocab_size}; give the reference's tokenizer as --config.data.tokenizer")
  builder = wd.preference_builder(config, workdir)
  pcount, pindex = jax.process_count(), jax.process_index()
  if c.batch_size % pcount:
    raise ValueError(f"reward_training.batch_size={c.batch_size} must be divisible by the {pcount} processes")
  buckets = tuple(c.get("buckets", (c.max_len,)))
  if max(buckets) != c.max_len:
    raise ValueError(f"reward_training.buckets={buckets} must end at max_len={c.max_len}")
  dataset = pipeline.preference_batches(builder.as_data_source("train"), tokenizer,
                                        batch_size=c.batch_size // pcount, buckets=buckets, seed=config.seed,
                                        process_index=pindex, process_count=pcount)
  present = builder.info.splits
  splits = {name: _records(builder.as_data_source(name)) for name in EVAL_SPLITS if name in present}
  if not splits or "train" not in present:
    raise ValueError(f"preference splits {sorted(present)} lack train or a held-out split; "
                     f"raise data.max_conversations={config.data.max_conversations} (0 = all)")
  meta = builder.info.metadata
  print(f"[{STAGE}] pairs train/validation/test {meta.get('pairs_train')}/{meta.get('pairs_validation')}/"
        f"{meta.get('pairs_test')} over {meta.get('prompts_train')}/{meta.get('prompts_validation')}/"
        f"{meta.get('prompts_test')} starter prompts", flush=True)
  optimizer = stages.make_optimizer(c, c.steps)
  state = stages.init_state(params, optimizer, jax.random.fold_in(jax.random.key(config.seed), 2), mesh)
  # Evaluation batches are global (every process scores every pair), rows split over the mesh.
  evaluate = make_evaluate(cfg, mesh, stages.state_shardings(state)["params"], splits, tokenizer,
                           c.batch_size, buckets)
  _, final = stages.train(
      workdir=workdir, stage=STAGE, kind=KIND, model_cfg=cfg, state=state, mesh=mesh, dataset=dataset,
      loss_fn=bradley_terry_loss(cfg), optimizer=optimizer, ndims=NDIMS, evaluate=evaluate, steps=c.steps,
      log_every=c.get("log_every", 50), eval_every=c.eval_every, checkpoint_every=c.checkpoint_every,
      stop_at_step=stop_at_step)
  return final


def report(m: dict[str, Any]) -> str:
  lines = [f"[{STAGE}] step {m['step']}: held-out pairwise accuracy (95% Wilson interval; pairs share "
           "starter prompts, so the interval is optimistic)"]
  for name in (n for n in EVAL_SPLITS if f"{n}_accuracy" in m):
    lines.append(f"  {name}: {m[f'{name}_accuracy']:.3f} [{m[f'{name}_ci_low']:.3f}, "
                 f"{m[f'{name}_ci_high']:.3f}] on {m[f'{name}_pairs']:.0f} pairs / "
                 f"{m[f'{name}_prompts']:.0f} prompts; longer-response baseline "
                 f"{m[f'{name}_length_accuracy']:.3f} [{m[f'{name}_length_ci_low']:.3f}, "
                 f"{m[f'{name}_length_ci_high']:.3f}]")
  return "\n".join(lines)


if __name__ == "__main__":
  stages.cli(run, report)
