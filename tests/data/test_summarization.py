import json
import re
import sys

import numpy as np
import pytest

from bond_jax.data import local, pipeline, summarization

ARTICLES = [{
    "document": f"Article {i} about the harbour.\nIt rained on day {i}.",
    "summary": f"Rain fell on day {i}.",
    "id": f"{i:04d}",
} for i in range(12)]
EMPTY_SUMMARY = {"document": "x", "summary": " ", "id": "e"}


@pytest.fixture(scope="module")
def xsum_like(tmp_path_factory):
  """A local dataset with XSum's features, built from JSON lines (one record has an empty summary)."""
  root = tmp_path_factory.mktemp("xsum")
  paths = {}
  for split, records in {"train": ARTICLES[:8], "test": [*ARTICLES[8:], EMPTY_SUMMARY]}.items():
    paths[split] = str(root / f"{split}.jsonl")
    with open(paths[split], "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
  config = summarization.JsonlSummarizationConfig(name="fake", split_paths=paths)
  return local.prepare(summarization.JsonlSummarization, str(root / "tfds"), config)


def test_builds_with_xsum_features_and_reads_back(xsum_like):
  assert set(xsum_like.info.features.keys()) == set(summarization.XSUM_TEXT_FIELDS)
  assert xsum_like.info.metadata["skipped_empty_test"] == 1
  test = xsum_like.as_data_source("test")
  assert len(test) == 4 and len(xsum_like.as_data_source("train")) == 8
  texts = summarization.summarization_texts(test[0], max_document_chars=9)
  assert texts["prompt"].startswith(summarization.formats.SUMMARIZATION_INSTRUCTION)
  assert re.search(r"\n\nArticle: Article \d\n\nSummary:$", texts["prompt"])  # document cut to 9 chars
  assert texts["response"].startswith(" Rain fell on day")
  assert "tensorflow" not in sys.modules


def test_prompt_pipeline_over_summarization_records(xsum_like, tokenizer):
  ds = pipeline.prompt_batches(
      xsum_like.as_data_source("train"),
      tokenizer,
      batch_size=4,
      buckets=[64, 128],
      seed=0,
      num_epochs=1,
      record_fn=summarization.summarization_texts,
  )
  batches = list(ds)
  assert len(batches) == 2
  for batch in batches:
    assert batch["tokens"].shape == batch["mask"].shape and batch["tokens"].shape[0] == 4
    decoded = [tokenizer.decode(row[mask]) for row, mask in zip(batch["tokens"], batch["mask"])]
    assert all(text.endswith("Summary:") for text in decoded)
    assert np.all(batch["mask"][:, -1])


def test_bad_jsonl_lines_raise_with_location(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(ARTICLES[0]) + "\n" + json.dumps({"document": "d", "id": "1"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2 is not an object with string fields"):
    summarization.read_jsonl_records(str(path))
  path.write_text("{oops\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:1 is not valid JSON"):
    summarization.read_jsonl_records(str(path))
  with pytest.raises(FileNotFoundError, match="none.jsonl does not exist"):
    summarization.read_jsonl_records(str(tmp_path / "none.jsonl"))
