"""The prompts J-BOND trains and evaluates on, in the reward model's own format.

summarization: documents of a TFDS dataset with XSum's features (TL;DR-style prompts, see
data/formats.py); its reference and reward model come from Hugging Face directories.

prompts: the user's own prompt files (data/prompt_files.py), encoded once with the run's tokenizer, through
its chat template when data.chat_template is on; the template's end of turn then also ends a response.

chitchat: one prompt per conversation, its starter topic and first data.prompt_turns turns
("Topic: ...\nA: hi there\nB:", chitchat.opening_prompts), split like the reward model's pairs: the training
topics' conversations of the SFT train split train; two held-out sets evaluate: 'in_distribution' (the same
topics' other conversations, unseen by the tokenizer, SFT and the reward model) and 'held_out_topics'
(conversations of the validation topics). The policy's response is the next data.response_turns turns,
which with the prompt is the transcript the reward model was trained on. Prompts longer than the widest
prompt bucket are dropped and counted (a left-truncated transcript would lose its topic line).
"""

from __future__ import annotations

import os
from typing import Sequence

import grain
import jax
import numpy as np

from bond_jax.data import chitchat, pipeline, prompt_files, summarization
from bond_jax.data.tokenizer import Tokenizer


def fitting_prompts(records: Sequence[dict[str, str]], tok: Tokenizer,
                    max_len: int) -> tuple[list[dict[str, str]], int]:
  """(the records whose [bos] + prompt fits max_len tokens, how many were dropped)."""
  lengths = [len(ids) + 1 for ids in tok.encode_batch([r["prompt"] for r in records])]
  kept = [r for r, n in zip(records, lengths) if n <= max_len]
  return kept, len(records) - len(kept)


def chitchat_prompts(config, tok: Tokenizer) -> tuple[list[dict[str, str]], dict[str, list[dict[str, str]]]]:
  """(train prompts, {'in_distribution': ..., 'held_out_topics': ...}) of the chitchat task (module doc)."""
  conversations, _ = chitchat.load_conversations(max_conversations=config.data.max_conversations or None)
  topic_split = chitchat.topic_splits(conversations, config.reward_training.rating)
  splits = chitchat.opening_prompts(conversations, config.data.prompt_turns, topic_split)
  splits["held_out_topics"] = splits.pop("validation")
  out, dropped = {}, {}
  for name in ("train", "in_distribution", "held_out_topics"):
    out[name], dropped[name] = fitting_prompts(splits[name], tok, max(config.data.prompt_buckets))
  if not out["train"]:
    raise ValueError(
        f"no training prompt of the chitchat data fits data.prompt_buckets={tuple(config.data.prompt_buckets)} "
        f"({dropped['train']} longer than {max(config.data.prompt_buckets)} tokens): widen data.prompt_buckets "
        "or raise data.max_conversations (0 = all)")
  if jax.process_index() == 0:
    counts = ", ".join(f"{n} {len(out[n])}" for n in out)
    print(
        f"[bond] distinct prompts: {counts} (longer than {max(config.data.prompt_buckets)} tokens, dropped: "
        f"{sum(dropped.values())})", flush=True)
  return out.pop("train"), {name: records for name, records in out.items() if records}


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
  """A fixed batch of up to config.eval.num_prompts held-out prompts, spread evenly over `records` (which
  come grouped by topic). Each is sampled eval.policy_samples / eval.quantile_samples times."""
  count = min(config.eval.num_prompts, len(records))
  picks = np.linspace(0, len(records) - 1, count).round().astype(int) if count else []
  max_len = max(config.data.prompt_buckets)
  seqs = [pipeline.prompt_ids(tok, records[int(i)], max_len) for i in picks]
  tokens, mask = pipeline.pad_batch(seqs, tuple(config.data.prompt_buckets), tok.pad_id, side="left")
  return {"tokens": tokens, "mask": mask}


def prompt_sources(config, tok: Tokenizer):
  """(train prompts, {held-out set name: prompts}) of config.data.task, as sequences of {'prompt': text}.

  chitchat: `chitchat_prompts`. summarization: a TFDS dataset with XSum's features (config.data.dataset,
  e.g. 'xsum:1.1.0', already prepared in config.data.data_dir; nothing is downloaded), read lazily: it has
  200k documents; its validation split is the held-out set.
  prompts: the user's prompt file(s) (data/prompt_files.py), encoded with `tok` once: records
  {'tokens', 'prompt'}, the held-out set named 'held_out'; what was skipped is reported on process 0.
  """
  if config.data.task == "prompts":
    train, held_out = prompt_files.load_splits(config, tok)
    if jax.process_index() == 0:
      print(f"[prompts] train: {prompt_files.describe(train)}; held out: {len(held_out.records)}", flush=True)
    return train.records, {"held_out": held_out.records}
  if config.data.task == "chitchat":
    return chitchat_prompts(config, tok)
  if config.data.task == "summarization":
    return _SummarizationPrompts(config, "train"), {"validation": _SummarizationPrompts(config, "validation")}
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
