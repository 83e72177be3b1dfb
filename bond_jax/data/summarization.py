"""Summarization data: TFDS XSum records (document, summary, id) turned into (prompt, response) texts.

Real data (needs network or a local copy; nothing here downloads in tests):
    source = xsum_data_source("train", data_dir="~/tensorflow_datasets")
reads an XSum dataset that is already prepared as array_record in `data_dir`. XSum itself needs a
manual download (see tfds.builder("xsum").MANUAL_DOWNLOAD_INSTRUCTIONS) and preparing it goes through
TFDS's XSum builder (`tfds.builder("xsum", data_dir=..., file_format="array_record")
.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))`), which may
import TensorFlow: prepare it once on a machine that has it, then copy the directory.

Own data with the same format: `JsonlSummarization` builds a dataset with XSum's features from a
JSON-lines file of {"document", "summary", "id"} records, fully offline (tests use it).

`summarization_texts(record)` maps either kind of record to {"prompt", "response"} strings, the
format the pipelines (pipeline.py) consume.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import tensorflow_datasets as tfds

from bond_jax.data import formats, local

XSUM_TEXT_FIELDS = ("document", "summary", "id")
DEFAULT_MAX_DOCUMENT_CHARS = 4000


def xsum_features() -> tfds.features.FeaturesDict:
  """The features of TFDS xsum 1.1.0: three Text fields."""
  return tfds.features.FeaturesDict({name: tfds.features.Text() for name in XSUM_TEXT_FIELDS})


def xsum_data_source(split: str, data_dir: str, version: str = "1.1.0"):
  """Random-access source of an XSum split already prepared as array_record in `data_dir`."""
  return tfds.data_source(f"xsum:{version}", split=split, data_dir=data_dir, download=False)


def as_text(value: Any) -> str:
  """A TFDS Text value (bytes from a data source, or str) as str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def summarization_texts(record: dict[str, Any],
                        max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS) -> dict[str, str]:
  """{"prompt", "response"} of an XSum-format record (see formats.summarization_prompt)."""
  return {
      "prompt": formats.summarization_prompt(as_text(record["document"]), max_document_chars),
      "response": formats.summarization_response(as_text(record["summary"])),
  }


@dataclasses.dataclass(eq=False)
class JsonlSummarizationConfig(tfds.core.BuilderConfig):
  """`split_paths` maps split name -> JSON-lines file of {"document", "summary", "id"}."""

  split_paths: dict[str, str] = dataclasses.field(default_factory=dict)


class JsonlSummarization(local.LocalBuilder):
  """XSum-format dataset from local JSON-lines files. Records with an empty document or summary are
  skipped and counted in `info.metadata` ("skipped_empty_<split>"); a line that is not a JSON object
  with the three string fields raises ValueError naming the file and line."""

  BUILDER_CONFIGS = [JsonlSummarizationConfig(name="default")]
  DESCRIPTION = "Summarization records in XSum's format from local JSON-lines files."

  def _features(self) -> tfds.features.FeaturesDict:
    return xsum_features()

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    paths = self.builder_config.split_paths
    if not paths:
      raise ValueError("split_paths is empty; expected {split_name: path to a .jsonl file}")
    records = {}
    for split, path in paths.items():
      records[split], skipped = read_jsonl_records(path)
      self.info.metadata[f"skipped_empty_{split}"] = skipped
      self.info.metadata[f"examples_{split}"] = len(records[split])
    return {split: self._generate_examples(rs) for split, rs in records.items()}

  def _generate_examples(self, records):
    for record in records:
      yield record["id"], record


def read_jsonl_records(path: str) -> tuple[list[dict[str, str]], int]:
  """(records, number skipped for an empty document or summary) of a JSON-lines file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"summarization source {path} does not exist")
  records, skipped = [], 0
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number} is not valid JSON: {e}") from e
      if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in XSUM_TEXT_FIELDS):
        raise ValueError(f"{path}:{line_number} is not an object with string fields {XSUM_TEXT_FIELDS}")
      if not record["document"].strip() or not record["summary"].strip():
        skipped += 1
        continue
      records.append({k: record[k] for k in XSUM_TEXT_FIELDS})
  return records, skipped
