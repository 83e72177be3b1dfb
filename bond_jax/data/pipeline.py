"""Grain pipelines from a random-access source (a TFDS data source, or any list of records) to batches.

Every pipeline is: source -> global shuffle (seeded; reshuffled each epoch) -> this process's shard ->
repeat -> text record -> token ids -> batch. The result is a `grain.IterDataset`; `iter(ds)` gives a
`grain.DatasetIterator` whose `get_state()` is a JSON-serialisable dict: an iterator restored with
`set_state` (or `restore_iterator`) yields exactly the batches the uninterrupted one would have.

Records: `record_fn(record)` must return {"prompt": str, "response": str, ...}; the default decodes the
bytes that TFDS Text features come back as (chitchat dialogue records already have those keys;
summarization.summarization_texts maps XSum records; preference records need "chosen", "rejected").

Shapes (B = per-process batch_size; every batch of one pipeline has the same B):
  prompt_batches      tokens [B, P] int32, mask [B, P] bool. Left-padded: real tokens end at column
                      P - 1 so generation appends at the same column for every row; padded columns hold
                      tokenizer.pad_id and mask False. P = the smallest bucket >= the longest prompt in
                      the batch (few distinct shapes -> few recompilations). A prompt is [bos] + ids; a
                      prompt longer than max(buckets) keeps bos and its LAST tokens (recent context).
                      A record that carries "tokens" (a prompt file's, see prompt_ids) is used as it is.
  preference_batches  tokens, mask, response_mask [B, 2, L]; along axis 1, 0 = chosen and
                      1 = rejected. Left-padded [bos] + prompt + response + [eos], so the last real
                      token (eos) of every row is at column L - 1; response_mask marks response + eos.
                      L = the smallest bucket fitting the longest of the 2B sequences.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from bond_jax.data.tokenizer import Tokenizer

Record = dict[str, Any]

# Records are already in memory or one array_record read away; a few threads suffice and leave the
# cores to the model (Grain's default is 16 threads and a 500-element buffer).
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


def decode_texts(record: Record) -> Record:
  """The record with bytes values (TFDS Text features) decoded as UTF-8 strings."""
  return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}


def sharded_records(
    source: Sequence[Record],
    *,
    seed: int,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    record_fn: Callable[[Record], Record] = decode_texts,
) -> grain.MapDataset:
  """This process's records: shuffled globally (a new order each epoch), then strided by process.

  The source is first cut to a multiple of process_count so every process sees the same number of
  records per epoch (multi-host steps must agree on the number of batches). num_epochs=None repeats
  forever.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if len(source) < process_count:
    raise ValueError(f"source has {len(source)} records; need at least process_count={process_count}")
  ds = grain.MapDataset.source(source)
  ds = ds[:len(ds) - len(ds) % process_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds[process_index::process_count]
  return ds.repeat(num_epochs).map(record_fn)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length."""
  fitting = [b for b in buckets if b >= length]
  if not fitting:
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}; buckets={list(buckets)}")
  return min(fitting)


def pad_batch(seqs: Sequence[np.ndarray], buckets: Sequence[int], pad_id: int,
              side: str = "left") -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, P] int32, mask [B, P] bool) of ragged `seqs`, P = pick_bucket(longest, buckets).

  side='left' puts padding before the tokens (prompts, scored sequences), 'right' after them.
  """
  if side not in ("left", "right"):
    raise ValueError(f"side={side!r}; allowed: 'left', 'right'")
  width = pick_bucket(max(len(s) for s in seqs), buckets)
  tokens = np.full((len(seqs), width), pad_id, np.int32)
  mask = np.zeros((len(seqs), width), bool)
  for row, seq in enumerate(seqs):
    cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
    tokens[row, cols] = seq
    mask[row, cols] = True
  return tokens, mask


def encode_prompt(tokenizer: Tokenizer, prompt: str, max_len: int) -> np.ndarray:
  """[bos] + ids of `prompt`, keeping bos and the last max_len - 1 ids when too long. [n] int32."""
  if max_len < 2:
    raise ValueError(f"max_len={max_len} must be >= 2 (bos plus one token)")
  ids = tokenizer.encode(prompt)[-(max_len - 1):]
  return np.asarray([tokenizer.bos_id, *ids], np.int32)


def prompt_ids(tokenizer: Tokenizer, record: Record, max_len: int) -> np.ndarray:
  """A record's prompt ids [n] int32: its "tokens" when it carries them (prompt files, encoded once when
  read: data/prompt_files.py), else encode_prompt of its "prompt" text."""
  if "tokens" in record:
    return np.asarray(record["tokens"], np.int32)
  return encode_prompt(tokenizer, record["prompt"], max_len)


def encode_sequence(tokenizer: Tokenizer, prompt: str, response: str, max_len: int) -> dict[str, np.ndarray]:
  """tokens [n] int32 = [bos] + prompt + response + [eos] (n <= max_len); response_mask [n] bool marks
  response + eos. Over max_len: prompt ids after bos go first, then the response's end."""
  prompt_ids = tokenizer.encode(prompt)
  response_ids = tokenizer.encode(response) + [tokenizer.eos_id]
  response_ids = response_ids[:max_len - 1]
  keep_prompt = max(0, min(len(prompt_ids), max_len - 1 - len(response_ids)))
  prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
  tokens = np.asarray([tokenizer.bos_id, *prompt_ids, *response_ids], np.int32)
  response_mask = np.arange(len(tokens)) > len(prompt_ids)
  return {"tokens": tokens, "response_mask": response_mask}


def _check_batch_args(batch_size: int, buckets: Sequence[int]) -> None:
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  if not buckets or min(buckets) < 2:
    raise ValueError(f"buckets={list(buckets)} must be a non-empty list of lengths >= 2")


def _batches(
    source: Sequence[Record],
    encode: Callable[[Record], Any],
    collate: Callable[[Sequence[Any]], dict[str, np.ndarray]],
    *,
    batch_size: int,
    buckets: Sequence[int],
    read_options: grain.ReadOptions = DEFAULT_READ_OPTIONS,
    **reading: Any,
) -> grain.IterDataset:
  """source -> sharded_records(**reading) -> encode -> batches of batch_size made by collate (a final
  partial batch is dropped so every batch has B rows). reading: seed, shuffle, process_index,
  process_count, num_epochs, record_fn (see sharded_records)."""
  _check_batch_args(batch_size, buckets)
  ds = sharded_records(source, **reading).map(encode)
  return ds.to_iter_dataset(read_options).batch(batch_size, drop_remainder=True, batch_fn=collate)


def prompt_batches(source: Sequence[Record], tokenizer: Tokenizer, *, batch_size: int, buckets: Sequence[int],
                   **reading: Any) -> grain.IterDataset:
  """Left-padded prompt batches {"tokens": [B, P] int32, "mask": [B, P] bool} (see module docstring).
  reading: seed (required) and the other options of sharded_records, read_options."""

  def collate(seqs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    tokens, mask = pad_batch(seqs, buckets, tokenizer.pad_id, side="left")
    return {"tokens": tokens, "mask": mask}

  encode = lambda r: prompt_ids(tokenizer, r, max(buckets))
  return _batches(source, encode, collate, batch_size=batch_size, buckets=buckets, **reading)


def preference_batches(source: Sequence[Record], tokenizer: Tokenizer, *, batch_size: int,
                       buckets: Sequence[int], **reading: Any) -> grain.IterDataset:
  """Left-padded pairs {"tokens": [B, 2, L] int32, "mask", "response_mask": [B, 2, L] bool}; axis 1 is
  (chosen, rejected). reading: as for prompt_batches."""

  def collate(pairs: Sequence[list[dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    seqs = [seq for pair in pairs for seq in pair]
    tokens, mask = pad_batch([s["tokens"] for s in seqs], buckets, tokenizer.pad_id, side="left")
    response_mask, _ = pad_batch([s["response_mask"] for s in seqs], buckets, 0, side="left")
    shape = (len(pairs), 2, tokens.shape[-1])
    return {
        "tokens": tokens.reshape(shape),
        "mask": mask.reshape(shape),
        "response_mask": response_mask.astype(bool).reshape(shape),
    }

  max_len = max(buckets)
  encode = lambda r: [
      encode_sequence(tokenizer, r["prompt"], r[key], max_len) for key in ("chosen", "rejected")
  ]
  return _batches(source, encode, collate, batch_size=batch_size, buckets=buckets, **reading)


def iterator_state_json(iterator: grain.DatasetIterator) -> str:
  """The iterator's position as a JSON string (store it next to the model checkpoint)."""
  return json.dumps(iterator.get_state())


def restore_iterator(dataset: grain.IterDataset, state_json: str) -> grain.DatasetIterator:
  """A fresh iterator of `dataset` (built with the same arguments) resumed at `state_json`."""
  iterator = iter(dataset)
  iterator.set_state(json.loads(state_json))
  return iterator
