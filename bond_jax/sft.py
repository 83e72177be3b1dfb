"""SFT stage: trains the reference policy pi_ref on chitchat dialogue turns (next-token loss on responses).

    python -m bond_jax.sft --config=configs/dialogue.py --workdir=runs/dialogue

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
import ml_collections
import numpy as np
import optax

from bond_jax import sharding, stages, workdir as wd
from bond_jax.data import chitchat, pipeline
from bond_jax.data.tokenizer import Tokenizer
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig

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


def token_nll(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(tokens[:, t] | tokens[:, :t]) over loss_mask[:, 1:], number of such tokens).

  logits [B, L, V] float32, tokens [B, L], loss_mask [B, L].
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
  weight = loss_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * weight), jnp.sum(weight)


def loss_fn(cfg: ModelConfig):
  """(params, batch) -> (mean response-token NLL, metrics)."""
  def fn(params, batch):
    logits = transformer.forward(cfg, params, batch["tokens"], batch["mask"])
    total, count = token_nll(logits, batch["tokens"], batch["loss_mask"])
    return total / jnp.maximum(count, 1.0), {"loss_tokens": count}
  return fn


def train_responses(config: ml_collections.ConfigDict) -> list[str]:
  """The response texts of the dialogue train split, straight from the source conversations (the
  builder's own split and example functions; ~10x faster than reading back 125k array_record records)."""
  fractions = chitchat.ChitchatDialogueConfig(name="split").split_fractions
  conversations, _ = chitchat.load_conversations(max_conversations=config.data.max_conversations or None)
  return [e["response"] for c in conversations
          if chitchat.split_by_hash(c.conversation_id, fractions) == "train"
          for e in chitchat.dialogue_examples(c, config.data.context_turns,
                                            config.data.response_turns)]


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

  def nll(params, batch):
    return token_nll(transformer.forward(cfg, params, batch["tokens"], batch["mask"]), batch["tokens"],
                     batch["loss_mask"])

  nll = jax.jit(nll, in_shardings=(param_shardings, stages.batch_shardings(mesh, NDIMS)),
                out_shardings=replicated)
  placed = [sharding.shard_batch(b, mesh) for b in batches]

  def evaluate(params, final: bool = True) -> dict[str, float]:
    del final  # the same fixed batches every time
    sums = jax.device_get([nll(params, b) for b in placed])
    total, count = float(sum(s for s, _ in sums)), float(sum(c for _, c in sums))
    loss = total / max(count, 1.0)
    return dict(val_loss=loss, val_ppl=float(np.exp(loss)), unigram_ppl=unigram_ppl, val_tokens=count)

  return evaluate


def run(config: ml_collections.ConfigDict, workdir: str, *,
        stop_at_step: int | None = None) -> dict[str, Any]:
  """Train (or resume, or skip when finished) the SFT policy of `workdir`; returns its final metrics
  {step, val_loss, val_ppl, unigram_ppl, val_tokens}. stop_at_step: leave early (see stages.train)."""
  wd.check_config(config, workdir)
  c = config.sft
  done = stages.finished_metrics(workdir, STAGE, c.steps)
  if done is not None:
    print(f"[{STAGE}] finished already (step {done['step']}): val_ppl {done['val_ppl']:.2f}", flush=True)
    return done
  tokenizer = wd.prepare_tokenizer(config, workdir)
  cfg = wd.model_config(config, tokenizer)
  builder = wd.dialogue_builder(config, workdir)
  mesh = wd.make_mesh(config)
  pcount, pindex = jax.process_count(), jax.process_index()
  if c.batch_size % pcount:
    raise ValueError(f"sft.batch_size={c.batch_size} must be divisible by the {pcount} processes")
  local_batch = c.batch_size // pcount
  dataset = sft_batches(builder.as_data_source("train"), tokenizer, batch_size=local_batch,
                        seq_len=c.seq_len, seed=config.seed, process_index=pindex, process_count=pcount)
  val = sft_batches(builder.as_data_source("validation"), tokenizer, batch_size=local_batch,
                    seq_len=c.seq_len, seed=config.seed, process_index=pindex, process_count=pcount)
  val_batches = [b for _, b in zip(range(c.eval_batches), iter(val))]
  log_probs = unigram_log_probs(train_responses(config), tokenizer, cfg.vocab_size)
  total, count = unigram_nll(log_probs, val_batches)
  unigram_ppl = float(np.exp(total / max(count, 1.0)))
  print(f"[{STAGE}] model {cfg.num_params() / 1e6:.2f}M params, vocab {cfg.vocab_size}; unigram "
        f"validation perplexity {unigram_ppl:.1f}", flush=True)

  init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
  params, _ = sharding.init_sharded(lambda r: transformer.init_boxed(cfg, r), init_rng, mesh)
  optimizer = stages.make_optimizer(c, c.steps)
  state = stages.init_state(params, optimizer, state_rng, mesh)
  evaluate = make_evaluate(cfg, mesh, stages.state_shardings(state)["params"], val_batches, unigram_ppl)
  _, final = stages.train(
      workdir=workdir, stage=STAGE, kind=KIND, model_cfg=cfg, state=state, mesh=mesh, dataset=dataset,
      loss_fn=loss_fn(cfg), optimizer=optimizer, ndims=NDIMS, evaluate=evaluate, steps=c.steps,
      log_every=c.get("log_every", 50), eval_every=c.eval_every, checkpoint_every=c.checkpoint_every,
      stop_at_step=stop_at_step)
  return final


def report(metrics: dict[str, Any]) -> str:
  return (f"[{STAGE}] validation loss {metrics['val_loss']:.4f}, perplexity {metrics['val_ppl']:.2f} "
          f"(unigram baseline {metrics['unigram_ppl']:.1f}) at step {metrics['step']}")


if __name__ == "__main__":
  stages.cli(run, report)
