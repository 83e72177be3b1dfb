"""SFT stage: trains the reference policy pi_ref on chitchat dialogue turns (next-token loss on responses).

    python -m bond_jax.train --config=configs/dialogue.py --workdir=runs/dialogue --until=sft

Batches are NOT packed: each row is one [bos] + prompt + response + [eos] sequence, right-padded to
sft.seq_len (`sft_batches`). Packing needs block-diagonal attention and per-segment positions, which the
transformer does not take (it masks by token_mask only); and here a sequence averages ~137 tokens
against seq_len 128, so a row holds one sequence anyway and packing would gain ~15% of fill. The loss
is the mean negative log-likelihood of the response tokens and eos (loss_mask), the tokens a policy
generates; the prompt is context only.

Reported: validation loss and perplexity on a fixed set of sft.eval_batches validation batches, and the
perplexity of a unigram model (train-split response-token counts, add-one smoothing) on those same
tokens, the floor any language model must beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bond_jax import loop, sharding, update
from bond_jax.data import pipeline, prepare
from bond_jax.data.tokenizer import Tokenizer
from bond_jax.models import params as params_lib
from bond_jax.models import presets, transformer
from bond_jax.models.config import ModelConfig
from bond_jax.stages.context import Context

STAGE, KIND = "sft", "lm"
NDIMS = {"tokens": 2, "mask": 2, "loss_mask": 2}


def sft_batches(source: Sequence[dict], tokenizer: Tokenizer, *, batch_size: int, seq_len: int, seed: int,
                shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
                process_count: int = 1) -> grain.IterDataset:
  """Right-padded batches {"tokens": [B, L] int32, "mask", "loss_mask": [B, L] bool}, L = seq_len.

  loss_mask[b, t] marks response tokens and eos: train the prediction of tokens[b, t] from
  tokens[b, :t] (use loss_mask[:, 1:] against logits[:, :-1]). Over-long sequences lose prompt tokens
  first (pipeline.encode_sequence). A final partial batch is dropped.
  """
  if batch_size < 1 or seq_len < 2:
    raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}: need batch_size >= 1 and seq_len >= 2")
  ds = pipeline.sharded_records(source, seed=seed, shuffle=shuffle, process_index=process_index,
                                process_count=process_count, num_epochs=num_epochs)
  ds = ds.map(lambda r: pipeline.encode_sequence(tokenizer, r["prompt"], r["response"], seq_len))

  def collate(seqs):
    tokens, mask = pipeline.pad_batch([s["tokens"] for s in seqs], [seq_len], tokenizer.pad_id, "right")
    loss_mask, _ = pipeline.pad_batch([s["response_mask"] for s in seqs], [seq_len], 0, "right")
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask.astype(bool)}

  return ds.to_iter_dataset(pipeline.DEFAULT_READ_OPTIONS).batch(batch_size, drop_remainder=True,
                                                                 batch_fn=collate)


def response_nll(cfg: ModelConfig, params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(tokens[:, t] | tokens[:, :t]) over loss_mask[:, 1:], number of such tokens) of a batch
  of sft_batches (tokens, mask, loss_mask [B, L]), from the model's full forward.

  The language-model loss, not scoring.token_logprobs: that chunked, rematerialised path rounds
  differently (measured: params 1 ulp apart after 7 default SFT steps, then validation perplexity 141.3
  instead of 142.0 at step 300), and the SFT stage's results would stop reproducing across versions.
  """
  logits = transformer.forward(cfg, params, batch["tokens"], batch["mask"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["tokens"][:, 1:])
  weight = batch["loss_mask"][:, 1:].astype(jnp.float32)
  return jnp.sum(nll * weight), jnp.sum(weight)


def loss_fn(cfg: ModelConfig):
  """(params, batch) -> (mean response-token NLL, metrics)."""

  def fn(params, batch):
    total, count = response_nll(cfg, params, batch)
    return total / jnp.maximum(count, 1.0), {"loss_tokens": count}

  return fn


def unigram_log_probs(responses: Sequence[str], tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
  """[vocab_size] log-probabilities of response tokens + eos, counted over `responses`, add-one smoothed."""
  counts = np.ones(vocab_size, np.float64)
  ids = tokenizer.encode_batch(list(responses))
  counts += np.bincount(np.fromiter((t for seq in ids for t in seq), np.int64), minlength=vocab_size)
  counts[tokenizer.eos_id] += len(responses)
  return np.log(counts / counts.sum())


def unigram_nll(log_probs: np.ndarray, batches: Sequence[dict]) -> tuple[float, float]:
  """(sum of -log p_unigram, count) over the loss tokens of `batches` (the tokens val_loss averages)."""
  total = count = 0.0
  for b in batches:
    targets, weight = b["tokens"][:, 1:], b["loss_mask"][:, 1:]
    total -= float(np.sum(log_probs[targets] * weight))
    count += float(weight.sum())
  return total, count


def make_evaluate(cfg: ModelConfig, mesh, param_shardings, batches: Sequence[dict], unigram_ppl: float):
  """params -> {val_loss, val_ppl, unigram_ppl, val_tokens} over the fixed validation batches."""
  replicated = sharding.replicated(mesh)

  batch_shardings = {k: sharding.batch_sharding(mesh, n) for k, n in NDIMS.items()}
  nll = jax.jit(lambda params, batch: response_nll(cfg, params, batch),
                in_shardings=(param_shardings, batch_shardings), out_shardings=replicated)
  placed = [sharding.shard_batch(b, mesh) for b in batches]

  def evaluate(params, final: bool = True) -> dict[str, float]:
    del final  # the same fixed batches every time
    sums = jax.device_get([nll(params, b) for b in placed])
    total, count = float(sum(s for s, _ in sums)), float(sum(c for _, c in sums))
    loss = total / max(count, 1.0)
    return dict(val_loss=loss, val_ppl=float(np.exp(loss)), unigram_ppl=unigram_ppl, val_tokens=count)

  return evaluate


def build(ctx: Context) -> loop.Stage:
  """The SFT stage of `ctx.workdir`: pi_ref from a fresh init on the dialogue train split."""
  config, tokenizer, mesh, c = ctx.config, ctx.tokenizer, ctx.mesh, ctx.config.sft
  cfg = presets.from_config(config.model, tokenizer.vocab_size)
  builder = ctx.dialogues
  pcount, pindex = jax.process_count(), jax.process_index()
  batches = lambda split: sft_batches(builder.as_data_source(
      split), tokenizer, batch_size=c.batch_size // pcount, seq_len=c.seq_len, seed=config.seed, process_index
                                      =pindex, process_count=pcount)
  val_batches = [b for _, b in zip(range(c.eval_batches), iter(batches("validation")))]
  log_probs = unigram_log_probs(prepare.train_responses(config), tokenizer, cfg.vocab_size)
  total, count = unigram_nll(log_probs, val_batches)
  unigram_ppl = float(np.exp(total / max(count, 1.0)))
  if jax.process_index() == 0:
    print(
        f"[{STAGE}] model {cfg.num_params() / 1e6:.2f}M params, vocab {cfg.vocab_size}; unigram "
        f"validation perplexity {unigram_ppl:.1f}", flush=True)

  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  optimizer = update.make_optimizer(update.OptimizerConfig.from_section(c, c.steps))
  state = update.new_state(params_lib.init_sharded(cfg, KIND, init_rng, mesh), optimizer, mesh)
  loss = loss_fn(cfg)
  step = update.build_update_step(lambda params, anchor, ref, batch: loss(params, batch), optimizer,
                                  mesh=mesh, state_sharding=sharding.shardings_of(state))
  evaluate = make_evaluate(cfg, mesh, sharding.shardings_of(state.params), val_batches, unigram_ppl)
  return loop.Stage(
      name=STAGE, kind=KIND, mesh=mesh, model=cfg, schedule=loop.Schedule.from_section(c), state=state,
      step=lambda state, batch: step(state, None, batch), batches=batches("train"),
      prepare=lambda batch, state, step: (sharding.shard_batch(batch, mesh), {
          "tokens": float(batch["mask"].sum())
      }), evaluate=lambda state, step, final: evaluate(state.params, final))


def report(metrics: dict[str, Any]) -> str:
  return (f"[{STAGE}] validation loss {metrics['val_loss']:.4f}, perplexity {metrics['val_ppl']:.2f} "
          f"(unigram baseline {metrics['unigram_ppl']:.1f}) at step {metrics['step']}")
