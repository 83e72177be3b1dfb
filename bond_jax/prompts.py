"""The prompts J-BOND trains and evaluates on, in the reward model's own format.

chitchat: the preference data's prompts (a conversation's starter topic, "Topic: ...\nA:"), split by starter
prompt like the reward model's pairs, so evaluation is on topics neither the reward model nor the policy
trained on. The policy's response is the conversation's opening, which is what the reward model scores.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import jax
import numpy as np

from bond_jax import workdir as workdir_lib
from bond_jax.data import pipeline
from bond_jax.data.tokenizer import Tokenizer


def unique_prompts(source: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
  """Distinct prompt texts of a preference split, in first-seen order, as {'prompt': text} records."""
  seen: dict[str, None] = {}
  for i in range(len(source)):
    text = pipeline.decode_texts(source[i])["prompt"]
    seen.setdefault(text, None)
  if not seen:
    raise ValueError("the prompt split is empty: the preference data produced no prompts")
  return [{"prompt": text} for text in seen]


def prompt_dataset(config, records: Sequence[dict[str, str]], tok: Tokenizer) -> grain.IterDataset:
  """Endless, shuffled, left-padded prompt batches {'tokens', 'mask': [B, P]} for this process."""
  local_batch = config.train.batch_size // jax.process_count()
  return pipeline.prompt_batches(records, tok, batch_size=local_batch, buckets=tuple(config.data.prompt_buckets),
                                 seed=config.seed, process_index=jax.process_index(),
                                 process_count=jax.process_count(), record_fn=lambda r: r)


def eval_batch(config, records: Sequence[dict[str, str]], tok: Tokenizer) -> dict[str, np.ndarray]:
  """A fixed batch of config.eval.num_prompts held-out prompts (cycled when there are fewer topics)."""
  rows = [records[i % len(records)]["prompt"] for i in range(config.eval.num_prompts)]
  max_len = max(config.data.prompt_buckets)
  seqs = [pipeline.encode_prompt(tok, text, max_len) for text in rows]
  tokens, mask = pipeline.pad_batch(seqs, tuple(config.data.prompt_buckets), tok.pad_id, side="left")
  return {"tokens": tokens, "mask": mask}


def prompt_sources(config, workdir: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
  """(train prompts, held-out prompts) of the task, as {'prompt': text} records."""
  builder = workdir_lib.preference_builder(config, workdir)
  return (unique_prompts(builder.as_data_source("train")),
          unique_prompts(builder.as_data_source("validation")))
