"""The prompts J-BOND trains and evaluates on, in the reward model's own format.

summarization: documents of a TFDS dataset with XSum's features (TL;DR-style prompts, see
data/formats.py); its reference and reward model come from Hugging Face directories.

prompts: the user's own prompt files (data/prompt_files.py), encoded once with the run's tokenizer, through
its chat template when data.chat_template is on; the template's end of turn then also ends a response.

chitchat: the preference data's prompts (a conversation's starter topic, "Topic: ...\nA:"), split by starter
prompt like the reward model's pairs, so evaluation is on topics neither the reward model nor the policy
trained on. The policy's response is the conversation's opening, which is what the reward model scores.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import grain
import jax
import numpy as np

from bond_jax.data import pipeline, prompt_files, summarization
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
  """Endless, shuffled, left-padded GLOBAL prompt batches {'tokens', 'mask': [B, P]}, B = train.batch_size.

  Every process reads the whole global batch (a few hundred prompts at most: cheap) and puts it on the mesh
  with sharding.global_batch. Reading only a 1/P share would give a different padded width P per process
  (the bucket follows the longest prompt of the share) and a row order that differs from a single-process
  run, so the same config would train differently on a different number of hosts.
  """
  return pipeline.prompt_batches(records, tok, batch_size=config.train.batch_size,
                                 buckets=tuple(config.data.prompt_buckets), seed=config.seed,
                                 record_fn=lambda r: r)


def eval_batch(config, records: Sequence[dict[str, str]], tok: Tokenizer) -> dict[str, np.ndarray]:
  """A fixed batch of the first config.eval.num_prompts held-out prompts (fewer when there are fewer: the
  chitchat test topics are 3). Each is sampled eval.policy_samples / eval.quantile_samples times."""
  max_len = max(config.data.prompt_buckets)
  seqs = [
      pipeline.prompt_ids(tok, records[i], max_len) for i in range(min(config.eval.num_prompts, len(records)))
  ]
  tokens, mask = pipeline.pad_batch(seqs, tuple(config.data.prompt_buckets), tok.pad_id, side="left")
  return {"tokens": tokens, "mask": mask}


def prompt_sources(config, preferences=None, tokenizer=None):
  """(train prompts, held-out prompts) of config.data.task, as sequences of {'prompt': text} records.

  chitchat: the distinct starter prompts of `preferences` (the ChitchatPreferences builder of the workdir).
  summarization: a TFDS dataset with XSum's features (config.data.dataset, e.g. 'xsum:1.1.0', already
  prepared in config.data.data_dir; nothing is downloaded), read lazily: it has 200k documents.
  prompts: the user's prompt file(s) (data/prompt_files.py), encoded with `tokenizer` once: records
  {'tokens', 'prompt'}; what was skipped is reported on process 0.
  """
  if config.data.task == "prompts":
    train, held_out = prompt_files.load_splits(config, tokenizer)
    if jax.process_index() == 0:
      print(f"[prompts] train: {prompt_files.describe(train)}; held out: {len(held_out.records)}", flush=True)
    return train.records, held_out.records
  if config.data.task == "chitchat":
    return (unique_prompts(preferences.as_data_source("train")),
            unique_prompts(preferences.as_data_source("validation")))
  if config.data.task == "summarization":
    return tuple(_SummarizationPrompts(config, split) for split in ("train", "validation"))
  raise ValueError(f"data.task={config.data.task!r}; allowed: chitchat, summarization, prompts")


class _SummarizationPrompts:
  """Random access {'prompt': text} view of a TFDS summarization split (no copy in memory)."""

  def __init__(self, config, split: str):
    import tensorflow_datasets as tfds
    if not config.data.get("dataset"):
      raise ValueError("data.dataset is empty; give a prepared TFDS summarization dataset, e.g. "
                       "--config.data.dataset=xsum:1.1.0 --config.data.data_dir=~/tensorflow_datasets")
    data_dir = os.path.expanduser(config.data.data_dir)
    try:
      self._source = tfds.data_source(config.data.dataset, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # TFDS raises several types for a dataset that is not there
      raise ValueError(f"data.dataset={config.data.dataset!r} split {split!r} is not prepared in "
                       f"data.data_dir={data_dir!r} (nothing is downloaded here): {error}") from None
    self._max_chars = config.data.get("max_document_chars", summarization.DEFAULT_MAX_DOCUMENT_CHARS)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, str]:
    return {"prompt": summarization.summarization_texts(self._source[index], self._max_chars)["prompt"]}


def eos_ids(config, tokenizer) -> tuple[int, ...]:
  """The ids that end a sampled response: the tokenizer's eos, and with chat prompts the template's end of
  turn (data/chat.py), which an instruct model writes where a base model writes eos."""
  ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  if config.data.task == "prompts" and config.data.chat_template and tokenizer.chat is not None:
    end = tokenizer.chat.end_of_turn_id(tokenizer)
    ids += [] if end is None or end in ids else [end]
  return tuple(ids)
