import json
import sys

import numpy as np
import pytest

from bond_jax.data import pipeline

BUCKETS = [16, 32, 64]


def _records(n):
  """In-memory source shaped like TFDS records (bytes text); record i's prompt names i."""
  return [{
      "prompt": f"Topic: item {i}\nA:".encode(),
      "response": (" reply" + " ok" * (i % 9)).encode(),
      "chosen": b" a fine answer",
      "rejected": b" no"
  } for i in range(n)]


def _item_numbers(tokenizer, batch):
  texts = [tokenizer.decode(row[mask]) for row, mask in zip(batch["tokens"], batch["mask"])]
  return [int(t.split("item ")[1].split("\n")[0]) for t in texts]


def test_pad_batch_left_and_right():
  seqs = [np.array([5, 6, 7]), np.array([8])]
  tokens, mask = pipeline.pad_batch(seqs, [2, 4, 8], pad_id=0, side="left")
  np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 8]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  assert tokens.dtype == np.int32 and mask.dtype == bool
  tokens, mask = pipeline.pad_batch(seqs, [2, 4, 8], pad_id=9, side="right")
  np.testing.assert_array_equal(tokens, [[5, 6, 7, 9], [8, 9, 9, 9]])
  with pytest.raises(ValueError, match=r"length 9 exceeds the largest bucket 8; buckets=\[2, 4, 8\]"):
    pipeline.pad_batch([np.arange(9)], [2, 4, 8], pad_id=0)
  with pytest.raises(ValueError, match="side='middle'; allowed: 'left', 'right'"):
    pipeline.pad_batch(seqs, [4], pad_id=0, side="middle")


def test_prompt_batches_are_left_padded_to_a_bucket(tokenizer):
  ds = pipeline.prompt_batches(_records(20), tokenizer, batch_size=4, buckets=BUCKETS, seed=0, num_epochs=1)
  batches = list(ds)
  assert len(batches) == 5
  for batch in batches:
    tokens, mask = batch["tokens"], batch["mask"]
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape[1] in BUCKETS
    assert np.all(mask[:, -1]) and np.all(np.diff(mask.astype(int), axis=1) >= 0)  # pads only on the left
    assert np.all(tokens[~mask] == tokenizer.pad_id)
    first_real = mask.argmax(axis=1)
    assert np.all(tokens[np.arange(4), first_real] == tokenizer.bos_id)
  numbers = sorted(n for b in batches for n in _item_numbers(tokenizer, b))
  assert numbers == list(range(20))  # one epoch = every record once


def test_long_prompt_keeps_bos_and_its_end(tokenizer):
  ids = pipeline.encode_prompt(tokenizer, "word " * 100 + "END:", max_len=16)
  assert len(ids) == 16 and ids[0] == tokenizer.bos_id
  assert tokenizer.decode(ids[1:]).endswith("END:")


def test_shuffle_is_seeded_and_shards_are_disjoint(tokenizer):

  def order(seed, process_index=0, process_count=1):
    ds = pipeline.prompt_batches(_records(21), tokenizer, batch_size=2, buckets=BUCKETS, seed=seed,
                                 process_index=process_index, process_count=process_count, num_epochs=1)
    return [n for b in ds for n in _item_numbers(tokenizer, b)]

  assert order(1) == order(1) and order(1) != order(2)
  shard0, shard1 = order(1, 0, 2), order(1, 1, 2)
  assert len(shard0) == len(shard1) == 10  # 21 records: one is dropped so both shards agree in length
  assert not set(shard0) & set(shard1)
  with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
    order(1, 2, 2)


def _assert_resumes_identically(dataset, steps_before, steps_after):
  iterator = iter(dataset)
  for _ in range(steps_before):
    next(iterator)
  state = pipeline.iterator_state_json(iterator)
  json.loads(state)  # plain JSON
  expected = [next(iterator) for _ in range(steps_after)]
  resumed = pipeline.restore_iterator(dataset, state)
  for want, got in zip(expected, (next(resumed) for _ in range(steps_after))):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def test_prompt_iterator_resumes_across_epochs(tokenizer):
  ds = pipeline.prompt_batches(_records(10), tokenizer, batch_size=3, buckets=BUCKETS, seed=5)
  _assert_resumes_identically(ds, steps_before=2, steps_after=6)  # crosses two reshuffled epochs


def test_encode_sequence_truncates_prompt_first():

  class Chars:  # a tokenizer with one id per character keeps the arithmetic readable
    bos_id, eos_id = 2, 1

    @staticmethod
    def encode(text):
      return [ord(c) for c in text]

  seq = pipeline.encode_sequence(Chars, "PROMPT", "resp", max_len=8)
  # 8 = bos + the last 2 prompt ids + 4 response ids + eos
  assert "".join(chr(t) for t in seq["tokens"][1:-1]) == "PTresp" and seq["tokens"][-1] == 1
  np.testing.assert_array_equal(seq["response_mask"], [0, 0, 0, 1, 1, 1, 1, 1])
  seq = pipeline.encode_sequence(Chars, "PROMPT", "a long response", max_len=6)
  assert "".join(chr(t) for t in seq["tokens"][1:]) == "a lon" and seq["response_mask"][1:].all()


def test_preference_batches(tokenizer):
  ds = pipeline.preference_batches(_records(8), tokenizer, batch_size=4, buckets=BUCKETS, seed=0,
                                   num_epochs=1)
  batch = next(iter(ds))
  width = batch["tokens"].shape[-1]
  assert width in BUCKETS
  assert {
      k: v.shape for k, v in batch.items()
  } == {
      k: (4, 2, width) for k in ("tokens", "mask", "response_mask")
  }
  assert np.all(batch["tokens"][..., -1] == tokenizer.eos_id)  # last real token at the last column
  chosen = tokenizer.decode(batch["tokens"][0, 0][batch["response_mask"][0, 0]])
  rejected = tokenizer.decode(batch["tokens"][0, 1][batch["response_mask"][0, 1]])
  assert (chosen, rejected) == (" a fine answer", " no")
  assert not (batch["response_mask"] & ~batch["mask"]).any()


def test_pipeline_over_tfds_source_without_tensorflow(dialogue_builder, tokenizer):
  source = dialogue_builder.as_data_source("validation")
  ds = pipeline.prompt_batches(source, tokenizer, batch_size=2, buckets=BUCKETS, seed=0)
  _assert_resumes_identically(ds, steps_before=2, steps_after=3)
  assert "tensorflow" not in sys.modules
