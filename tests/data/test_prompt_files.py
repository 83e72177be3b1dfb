"""Prompt files: JSONL, Parquet and `datasets` directories give the same prompts; bad records are skipped and
counted; held-out splits; the Grain prompt pipeline resumes exactly and shards by process."""

import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import hf_dirs
from bond_jax.data import hf_tokenizer, pipeline, prompt_files, prompts
from configs import hf as hf_config


@pytest.fixture(scope="module")
def tok(conversations, tmp_path_factory):
  lines = [t for c in conversations[:300] for t in c.turns]
  return hf_tokenizer.load(hf_dirs.qwen_tokenizer_dir(tmp_path_factory.mktemp("tok"), lines, 500))


@pytest.fixture(scope="module")
def chats(conversations):
  chats = hf_dirs.conversations(conversations[300:], 60, seed=2)
  return [[dict(m, content=m["content"][:80]) for m in c] for c in chats]  # each fits in 256 tokens


def _config(path, **data):
  c = hf_config.get_config()
  c.data.update(prompts=str(path), prompt_buckets=(256,), **data)
  return c


def _write_jsonl(path, records):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return path


def test_the_three_formats_give_the_same_prompts(tok, chats, tmp_path):
  records = [{"messages": m, "id": i} for i, m in enumerate(chats)]
  jsonl = _write_jsonl(tmp_path / "p.jsonl", records)
  (tmp_path / "parts").mkdir()
  _write_jsonl(tmp_path / "parts" / "a.jsonl", records[:25])
  _write_jsonl(tmp_path / "parts" / "b.jsonl", records[25:])
  pq.write_table(pa.Table.from_pylist(records), tmp_path / "p.parquet")
  datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
  results = {}
  for name in ("p.jsonl", "parts", "p.parquet", "saved"):
    prompt_files._CACHE.clear()
    train, held_out = prompt_files.load_splits(_config(tmp_path / name, held_out_fraction=0.1), tok)
    results[name] = [r["tokens"].tolist() for r in train.records + held_out.records]
    assert len(train.records) == 54 and len(held_out.records) == 6 and train.total == 60
  assert results["p.jsonl"] == results["parts"] == results["p.parquet"] == results["saved"]
  expected = tok.encode_rendered(tok.chat.render(chats[0], add_generation_prompt=True))
  assert sorted(results["p.jsonl"]).count(expected) >= 1
  assert prompt_files.source_format(str(jsonl)) == "jsonl"


def test_bad_records_are_skipped_and_counted(tok, tmp_path):
  sp = hf_tokenizer.load(
      hf_dirs.sentencepiece_tokenizer_dir(tmp_path / "sp",
                                          ["a few words of text"] * 40 + ["émojis 😀 ünïcödé"] * 5, 300))
  records = [{
      "prompt": "a fine prompt"
  }, {
      "prompt": "  "
  }, {
      "other": "x"
  }, {
      "prompt": 3
  }, {
      "prompt": None
  }, {
      "prompt": [{
          "role": "assistant",
          "content": "first"
      }]
  }, {
      "prompt": "word " * 300
  }, "not a dict"]
  path = _write_jsonl(tmp_path / "bad.jsonl", records)
  with open(path, "a") as f:
    f.write("{not json\n")
  prompt_files._CACHE.clear()
  train, _ = prompt_files.load_splits(_config(path, prompt_field="prompt", held_out_fraction=0.0), sp)
  assert len(train.records) == 1 and train.total == 9
  assert train.skipped == {
      "empty": 1,
      "no field 'prompt'": 4,
      "not a string or a messages list": 1,
      "refused by the chat template": 1,
      "longer than 256 tokens": 1
  }
  assert prompt_files.describe(train).startswith("1 usable of 9 records; skipped: 1 empty, 1 longer than 256")
  plain = _config(path, prompt_field="prompt", held_out_fraction=0.0, chat_template=False)
  train, _ = prompt_files.load_splits(plain, sp)  # template off: the text as tokenizer(text) encodes it
  assert train.records[0]["tokens"].tolist() == sp.encode_plain_prompt("a fine prompt")
  _write_jsonl(tmp_path / "useless.jsonl", records[1:3])
  with pytest.raises(ValueError,
                     match=r"useless.jsonl' has no usable record of 2: 0 usable of 2 records; skipped"):
    prompt_files.load_splits(_config(tmp_path / "useless.jsonl", prompt_field="prompt"), sp)


def test_held_out_file_or_a_seeded_fraction(tok, chats, tmp_path):
  path = _write_jsonl(tmp_path / "p.jsonl", [{"messages": m} for m in chats])
  held = _write_jsonl(tmp_path / "h.jsonl", [{"messages": m} for m in chats[:5]])
  prompt_files._CACHE.clear()
  train, held_out = prompt_files.load_splits(_config(path, held_out=str(held), held_out_fraction=0.0), tok)
  assert len(train.records) == 60 and len(held_out.records) == 5

  def split(seed):
    c = _config(path, held_out_fraction=0.25)
    c.seed = seed
    train, held_out = prompt_files.load_splits(c, tok)
    return [tuple(r["tokens"]) for r in train.records], [tuple(r["tokens"]) for r in held_out.records]

  (a_train, a_held), (b_train, b_held), (c_train, c_held) = split(0), split(0), split(1)
  assert a_train == b_train
  assert a_held == b_held and a_held != c_held and len(a_held) == 15 and len(a_train) == 45
  assert not set(a_held) & set(a_train) and sorted(a_train + a_held) == sorted(c_train + c_held)
  with pytest.raises(ValueError, match="are both set; give one"):
    prompt_files.load_splits(_config(path, held_out=str(held), held_out_fraction=0.1), tok)


def test_grain_pipeline_resumes_exactly_and_shards_by_process(tok, chats, tmp_path):
  path = _write_jsonl(tmp_path / "p.jsonl", [{"messages": m} for m in chats])
  config = _config(path, held_out_fraction=0.0)
  config.train.batch_size = 4
  prompt_files._CACHE.clear()
  train, _ = prompts.prompt_sources(config, tok)
  ds = prompts.prompt_dataset(config, train, tok)
  iterator = iter(ds)
  [next(iterator) for _ in range(3)]
  state = pipeline.iterator_state_json(iterator)
  expected = [next(iterator) for _ in range(20)]  # past the first epoch (60 / 4 = 15 batches)
  resumed = pipeline.restore_iterator(ds, state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(got["mask"], want["mask"])
  first = next(iter(ds))
  row = first["tokens"][0][first["mask"][0]].tolist()
  assert row in [r["tokens"].tolist() for r in train]  # the ids the file was encoded to, left-padded
  shards = [
      pipeline.prompt_batches(train, tok, batch_size=2, buckets=(256,), seed=0, process_index=p,
                              process_count=2, num_epochs=1) for p in range(2)
  ]
  rows = [[tuple(b["tokens"][i][b["mask"][i]]) for b in shard for i in range(2)] for shard in shards]
  assert len(rows[0]) == len(rows[1]) == 30 and not set(rows[0]) & set(rows[1])
  assert sorted(rows[0] + rows[1]) == sorted(tuple(r["tokens"]) for r in train)
