"""The user's own prompts (data.task='prompts'): a JSONL or Parquet file, a directory of them, or a Hugging
Face `datasets` dataset saved to disk (`Dataset.save_to_disk`), read without network.

Each record's `data.prompt_field` holds either a plain prompt (a string) or a chat `messages` list
([{"role": "user", "content": "..."}, ...]). With `data.chat_template` on, both are rendered by the
tokenizer's chat template with the generation prompt (a plain prompt as one user turn) and encoded as
transformers' apply_chat_template(tokenize=True) encodes them; off, a plain prompt is encoded as
tokenizer(text) (its bos where the tokenizer adds one) and a messages list is refused.

Records that cannot be used are skipped and counted by reason (the field is missing, empty, of another
type, the template refused the conversation, or the prompt is longer than max(data.prompt_buckets)
tokens: a cut prompt would be a different question); a source with no usable record is an error.
Held-out prompts (the evaluation's) come from `data.held_out` (another source) or, when that is empty, a
`data.held_out_fraction` of the records, picked by a permutation seeded with `seed`.

Usable records are {"tokens": int32 [n], "prompt": the field's value}: the Grain prompt pipeline
(pipeline.prompt_batches) reads the ids as they are, and a reward function reads the prompt. Like the
embedded prompts, every process reads the same global batch (prompts.prompt_dataset says why) and keeps
its own devices' rows when the batch is placed; pipeline.sharded_records splits a source by process.
`load_splits` is memoised, so validation (which reads everything to report bad input before any compute)
and the distillation stage share one read.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, NamedTuple, Sequence

import numpy as np

from bond_jax.data import chat as chat_lib

FORMATS = ("jsonl", "parquet", "datasets")
_JSONL = (".jsonl", ".json", ".ndjson")


def source_format(path: str) -> str:
  """'jsonl', 'parquet' or 'datasets' of a path (a file by its suffix; a directory by what it holds)."""
  if os.path.isdir(path):
    names = os.listdir(path)
    if "state.json" in names and "dataset_info.json" in names:
      return "datasets"
    kinds = {source_format(os.path.join(path, n)) for n in names if n.endswith(_JSONL + (".parquet",))}
    if len(kinds) == 1:
      return kinds.pop()
    raise ValueError(f"{path!r} is a directory without a saved `datasets` dataset (state.json, "
                     "dataset_info.json) or files of one format (*.jsonl or *.parquet)")
  if path.endswith(_JSONL):
    return "jsonl"
  if path.endswith(".parquet"):
    return "parquet"
  raise ValueError(f"{path!r} is of an unknown format; allowed: {', '.join(FORMATS)} "
                   "(*.jsonl / *.json lines, *.parquet, or a directory written by Dataset.save_to_disk)")


def _files(path: str, suffixes: tuple[str, ...]) -> list[str]:
  if os.path.isfile(path):
    return [path]
  return [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(suffixes)]


def _read_jsonl(path: str) -> list[Any]:
  records = []
  for name in _files(path, _JSONL):
    with open(name, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError:
            records.append(None)  # counted as a bad record
  return records


def _read_parquet(path: str) -> list[Any]:
  import pyarrow.parquet as pq
  return [row for name in _files(path, (".parquet",)) for row in pq.read_table(name).to_pylist()]


def _read_datasets(path: str) -> list[Any]:
  import datasets
  data = datasets.load_from_disk(path)
  if isinstance(data, datasets.DatasetDict):
    raise ValueError(f"{path!r} holds a DatasetDict ({', '.join(data)}); give one split's directory")
  return data.to_list()


def read_records(path: str, key: str = "data.prompts") -> list[Any]:
  """The raw records of a source (ValueError naming `key` when it is missing, unknown or empty)."""
  if not path:
    raise ValueError(f"{key} is empty; give a JSONL or Parquet file, or a `datasets` directory")
  if not os.path.exists(path):
    raise ValueError(f"{key}={path!r} does not exist")
  try:
    kind = source_format(path)
  except ValueError as error:
    raise ValueError(f"{key}: {error}") from None
  records = {"jsonl": _read_jsonl, "parquet": _read_parquet, "datasets": _read_datasets}[kind](path)
  if not records:
    raise ValueError(f"{key}={path!r} holds no records")
  return records


class Prompts(NamedTuple):
  """Usable records {"tokens": int32 [n], "prompt": value} and the skipped ones counted by reason."""
  records: list[dict[str, Any]]
  skipped: dict[str, int]
  total: int


class Encoder(NamedTuple):
  """How a record's field becomes prompt ids: the tokenizer, its template use, the longest prompt."""
  tokenizer: Any
  field: str
  use_template: bool
  max_len: int

  def ids(self, value: Any) -> tuple[list[int] | None, str | None]:
    """(ids, None) or (None, the reason the value is skipped)."""
    if isinstance(value, str):
      if not value.strip():
        return None, "empty"
      if not self.use_template:
        return self.tokenizer.encode_plain_prompt(value), None
      value = [{"role": "user", "content": value}]
    elif isinstance(value, list):
      problem = chat_lib.check_messages(value)
      if problem:
        return None, "empty" if not value else "not a messages list"
    else:
      return None, "not a string or a messages list"
    try:
      text = self.tokenizer.chat.render(value, add_generation_prompt=True)
    except Exception:  # the template's raise_exception, or a template that cannot read this record
      return None, "refused by the chat template"
    return self.tokenizer.encode_rendered(text), None

  def encode(self, raw: Sequence[Any]) -> Prompts:
    records, skipped = [], collections.Counter()
    for record in raw:
      if not isinstance(record, dict) or self.field not in record or record[self.field] is None:
        skipped[f"no field {self.field!r}"] += 1
        continue
      ids, reason = self.ids(record[self.field])
      if reason is None and len(ids) > self.max_len:
        reason = f"longer than {self.max_len} tokens"
      if reason is not None:
        skipped[reason] += 1
      else:
        records.append({"tokens": np.asarray(ids, np.int32), "prompt": record[self.field]})
    return Prompts(records, dict(skipped), len(raw))


def is_chat(raw: Sequence[Any], field: str) -> bool:
  """Whether the source holds chat `messages` lists (the first record with the field decides)."""
  for record in raw:
    if isinstance(record, dict) and record.get(field) is not None:
      return isinstance(record[field], list)
  return False


def _split(config, train: Prompts) -> tuple[Prompts, Prompts]:
  """(train, held-out) by data.held_out_fraction of the records, a permutation seeded with config.seed."""
  fraction = config.data.held_out_fraction
  count = int(round(fraction * len(train.records)))
  if fraction > 0:
    count = min(max(count, 1), len(train.records) - 1)
  order = np.random.default_rng(config.seed).permutation(len(train.records))
  held = [train.records[i] for i in sorted(order[:count])]
  kept = [train.records[i] for i in sorted(order[count:])]
  return Prompts(kept, train.skipped, train.total), Prompts(held, {}, count)


_CACHE: dict[tuple, tuple[Prompts, Prompts]] = {}


def _stamp(path: str) -> tuple:
  """(name, size, mtime) of a source's files: a source changed on disk is read again."""
  if not path or not os.path.exists(path):
    return ()
  names = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in sorted(os.listdir(path))]
  return tuple((n, os.stat(n).st_size, os.stat(n).st_mtime_ns) for n in names)


def load_splits(config, tokenizer) -> tuple[Prompts, Prompts]:
  """(train, held-out) Prompts of config.data (see the module docstring); ValueError for a bad source."""
  d = config.data
  key = (d.prompts, _stamp(d.prompts), d.held_out, _stamp(d.held_out), d.held_out_fraction, d.prompt_field,
         bool(d.chat_template), max(d.prompt_buckets), config.seed, tuple(sorted(tokenizer.files.items())))
  if key in _CACHE:
    return _CACHE[key]
  if not isinstance(d.prompt_field, str) or not d.prompt_field:
    raise ValueError(f"data.prompt_field={d.prompt_field!r} must name a field of the records")
  if not 0 <= d.held_out_fraction < 1:
    raise ValueError(f"data.held_out_fraction={d.held_out_fraction} must lie in [0, 1)")
  if d.held_out and d.held_out_fraction:
    raise ValueError(
        f"data.held_out={d.held_out!r} and data.held_out_fraction={d.held_out_fraction} are both "
        "set; give one")
  sources = [("data.prompts", d.prompts)] + ([("data.held_out", d.held_out)] if d.held_out else [])
  encoded = []
  for name, path in sources:
    raw = read_records(path, name)
    if not any(isinstance(r, dict) and d.prompt_field in r for r in raw):
      raise ValueError(f"{name}={path!r}: no record has the field data.prompt_field={d.prompt_field!r}")
    chat = is_chat(raw, d.prompt_field)
    if chat and not d.chat_template:
      raise ValueError(f"{name}={path!r} holds chat messages but data.chat_template=False: chat prompts "
                       "need the tokenizer's chat template")
    if (chat or d.chat_template) and tokenizer.chat is None:
      raise ValueError(
          f"{name}={path!r}: {'chat prompts need' if chat else 'data.chat_template=True needs'} a "
          "chat template and the tokenizer has none (tokenizer_config.json chat_template or "
          "chat_template.jinja); give one, or set --config.data.chat_template=False for plain prompts")
    prompts = Encoder(tokenizer, d.prompt_field, bool(d.chat_template), max(d.prompt_buckets)).encode(raw)
    if not prompts.records:
      raise ValueError(f"{name}={path!r} has no usable record of {prompts.total}: {describe(prompts)}")
    encoded.append(prompts)
  splits = (encoded[0], encoded[1]) if d.held_out else _split(config, encoded[0])
  _CACHE[key] = splits
  return splits


def describe(prompts: Prompts) -> str:
  """'120 usable of 124 records; skipped: 2 no field 'messages', 1 empty, 1 longer than 64 tokens'."""
  skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(prompts.skipped.items()))
  return f"{len(prompts.records)} usable of {prompts.total} records" + (f"; skipped: {skipped}"
                                                                        if skipped else "")
