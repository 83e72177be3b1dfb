import pickle

import pytest

from bond_jax.data import formats
from bond_jax.data.tokenizer import load_tokenizer, train_bpe_tokenizer

TRICKY = [
    "Topic: What if pigs could fly?\nA: hi  there\nB:",
    "  leading and trailing spaces  ",
    "tabs\tand\ttabs, digits 1234567 and ½ fractions",
    "émojis 😀🙃 and ünïcödé ∑ ☃",
    "",
]


def test_special_ids_and_pieces(tokenizer):
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (0, 1, 2, 3)
  assert [tokenizer.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
  assert tokenizer.vocab_size == 1500
  ids = tokenizer.encode("hi", add_bos=True, add_eos=True)
  assert ids == [2, *tokenizer.encode("hi"), 1]


def test_round_trip(tokenizer, held_out_lines):
  for text in held_out_lines[:1000] + TRICKY:
    assert tokenizer.decode(tokenizer.encode(text)) == text
  # Unseen characters become byte pieces, never unk.
  assert tokenizer.unk_id not in tokenizer.encode("😀 ☃ 漢字")
  assert tokenizer.encode_batch(["a b", "c"]) == [tokenizer.encode("a b"), tokenizer.encode("c")]


def test_prompt_and_response_tokenize_as_their_concatenation(tokenizer, conversations):
  for conversation in conversations[700:800]:
    turns = conversation.turns
    for i in range(1, len(turns)):
      prompt = formats.dialogue_prompt(conversation.topic, turns[max(0, i - 2):i], max(0, i - 2))
      response = formats.dialogue_response(turns[i:i + 1], i)
      assert tokenizer.encode(prompt) + tokenizer.encode(response) == tokenizer.encode(prompt + response)


def test_save_load_and_pickle(tokenizer, tmp_path):
  tokenizer.save(tmp_path / "m.model")
  loaded = load_tokenizer(tmp_path / "m.model")
  assert loaded.encode(TRICKY[0]) == tokenizer.encode(TRICKY[0])
  assert pickle.loads(pickle.dumps(tokenizer)).encode(TRICKY[3]) == tokenizer.encode(TRICKY[3])


def test_errors(tmp_path):
  with pytest.raises(ValueError, match=r"vocab_size=100 must exceed 260"):
    train_bpe_tokenizer(["some text"], vocab_size=100)
  with pytest.raises(ValueError, match="no non-empty training lines"):
    train_bpe_tokenizer(["", "  "], vocab_size=500)
  with pytest.raises(FileNotFoundError, match="missing.model does not exist"):
    load_tokenizer(tmp_path / "missing.model")


def test_hugging_face_tokenizer_gives_the_same_ids(tokenizer, held_out_lines, tmp_path):
  import transformers  # imported here: it is slow to import and only this test needs it

  tokenizer.save_hf_tokenizer_files(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"
  ]
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
  assert len(hf) == tokenizer.vocab_size
  texts = held_out_lines + TRICKY
  same = sum(hf.encode(t, add_special_tokens=False) == tokenizer.encode(t) for t in texts)
  assert same / len(texts) >= 0.999, f"{len(texts) - same} of {len(texts)} lines differ"
  assert hf(TRICKY[0])["input_ids"] == tokenizer.encode(TRICKY[0], add_bos=True)
  assert hf.decode(tokenizer.encode(TRICKY[3])) == TRICKY[3]
