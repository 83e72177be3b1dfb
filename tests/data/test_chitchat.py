import itertools
import json
import sys

import numpy as np
import pytest

from bond_jax.data import chitchat, local


def _ids(source, key):
  return {source[i][key] for i in range(len(source))}


def test_dialogue_builder_reads_back_without_tensorflow(dialogue_builder):
  assert "tensorflow" not in sys.modules
  meta = dialogue_builder.info.metadata
  assert meta["conversations_read"] == 300
  sources = {s: dialogue_builder.as_data_source(s) for s in chitchat.SPLITS}
  for split, source in sources.items():
    assert len(source) == meta[f"examples_{split}"] > 0
  record = sources["train"][0]
  prompt, response = record["prompt"].decode(), record["response"].decode()
  assert prompt.startswith("Topic: ") and prompt.endswith(":") and response.startswith(" ")
  assert "tensorflow" not in sys.modules


def test_dialogue_splits_are_disjoint_by_conversation(dialogue_builder):
  ids = {s: _ids(dialogue_builder.as_data_source(s), "conversation_id") for s in chitchat.SPLITS}
  assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
  assert not ids["validation"] & ids["test"]
  assert sum(map(len, ids.values())) == 300


def test_dialogue_examples_label_speakers_by_position():
  conversation = chitchat.Conversation("c", "Pigs?", ("hi", "hey", "they fly", "no"), None)
  examples = chitchat.dialogue_examples(conversation, context_turns=2, response_turns=2)
  assert [e["prompt"] for e in examples[:1]] == ["Topic: Pigs?\nA:"]
  assert examples[0]["response"] == " hi\nB: hey"
  assert examples[3]["prompt"] == "Topic: Pigs?\nB: hey\nA: they fly\nB:"
  assert examples[3]["response"] == " no"


def test_preference_builder_rule_and_prompt_split(preference_builder):
  meta = preference_builder.info.metadata
  sources = {s: preference_builder.as_data_source(s) for s in chitchat.PREFERENCE_SPLITS}
  prompts = {s: _ids(src, "prompt") for s, src in sources.items()}
  ids = {s: _ids(src, "chosen_id") | _ids(src, "rejected_id") for s, src in sources.items()}
  for split, source in sources.items():
    assert len(source) == meta[f"pairs_{split}"] > 0
    assert len(prompts[split]) == meta[f"prompts_{split}"]
  assert not prompts["train"] & prompts["validation"] and not prompts["train"] & prompts["test"]
  assert not prompts["validation"] & prompts["test"]
  # in_distribution: the training topics' held-out conversations, never in a training pair
  assert prompts["in_distribution"] <= prompts["train"] and not ids["in_distribution"] & ids["train"]
  assert meta["conversations_unrated"] > 0  # counted, not silently dropped
  train = sources["train"]
  for i in range(0, len(train), 37):
    pair = train[i]
    assert pair["chosen_rating"] - pair["rejected_rating"] >= 2.0
    assert pair["chosen"] != pair["rejected"]
    assert pair["prompt"].startswith(b"Topic: ") and pair["prompt"].endswith(b"\nA:")
  assert "tensorflow" not in sys.modules


def test_preference_pairs_mean_rating_and_margin(conversations):
  pairs, stats = chitchat.preference_pairs(conversations[:1000], rating="mean", margin=4,
                                           max_pairs_per_prompt=5, seed=3)
  # Ratings are stored as float32; the rule itself is applied in float64.
  assert all(p["chosen_rating"] - p["rejected_rating"] >= 4 - 1e-5 for ps in pairs.values() for p in ps)
  assert sum(len(ps) for ps in pairs.values()) == sum(stats[f"pairs_{s}"] for s in chitchat.PREFERENCE_SPLITS)
  again, _ = chitchat.preference_pairs(conversations[:1000], rating="mean", margin=4, max_pairs_per_prompt=5,
                                       seed=3)
  assert again == pairs
  with pytest.raises(ValueError,
                     match=r"rating='funny'; allowed: \('witty', 'upbeat', 'interesting', 'mean'\)"):
    chitchat.preference_pairs(conversations[:10], rating="funny")


def test_split_by_rank_fills_every_split():
  split = chitchat.split_by_rank([f"prompt {i}" for i in range(10)], (0.8, 0.1, 0.1))
  assert sorted(split.values()).count("validation") == 1 and list(split.values()).count("test") == 1
  with pytest.raises(ValueError, match=r"split_fractions=\(0.5, 0.5, 0.5\) must be 3 non-negative"):
    chitchat.split_by_rank(["a"], (0.5, 0.5, 0.5))


# --- bad data -------------------------------------------------------------------------------------


def _conversation(text, prompt="Pigs?", ratings=None):
  return {
      "messages": [[{
          "text": text,
          "sender": "s1"
      }], [{
          "text": "reply",
          "sender": "s2"
      }]],
      "prompt": prompt,
      "ratings": ratings
  }


def test_missing_empty_and_non_json_sources(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
    chitchat.load_conversations(str(tmp_path / "nope.json"))
  (tmp_path / "empty.json").write_text("  \n")
  with pytest.raises(ValueError, match="empty.json is empty; expected a JSON object of conversations"):
    chitchat.load_conversations(str(tmp_path / "empty.json"))
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="bad.json is not valid JSON"):
    chitchat.load_conversations(str(tmp_path / "bad.json"))
  (tmp_path / "list.json").write_text("[]")
  with pytest.raises(ValueError, match="holds a JSON list; expected an object"):
    chitchat.load_conversations(str(tmp_path / "list.json"))
  (tmp_path / "nomsg.json").write_text(json.dumps({"c1": {"prompt": "x"}}))
  with pytest.raises(ValueError, match="conversation 'c1' has no 'messages' list"):
    chitchat.load_conversations(str(tmp_path / "nomsg.json"))


def test_bad_records_are_skipped_and_counted(tmp_path):
  good = {
      f"good{i}":
          _conversation(f"hello {i}", ratings={
              "witty": 1 + 3 * (i % 3),
              "upbeat": 5,
              "interesting": 1 + 3 * (i % 3)
          }) for i in range(6)
  }
  records = {
      **good,
      "silent": {
          "messages": [[{
              "text": "  ",
              "sender": "s1"
          }], []],
          "prompt": "Pigs?",
          "ratings": None
      },
      "no_messages": {
          "messages": [],
          "prompt": "Pigs?",
          "ratings": None
      },
      "latin1": _conversation("BAD_BYTES"),
  }
  raw = json.dumps(records).encode("utf-8").replace(b"BAD_BYTES", b"caf\xe9 \xff")
  path = tmp_path / "fake.json"
  path.write_bytes(raw)
  conversations, stats = chitchat.load_conversations(str(path))
  assert [c.conversation_id for c in conversations] == list(good)
  assert stats == dict(conversations_read=9, skipped_invalid_utf8=1, skipped_no_turns=2,
                       empty_turns_dropped=2)

  config = chitchat.ChitchatPreferencesConfig(name="fake", source_path=str(path),
                                              split_fractions=(1.0, 0.0, 0.0), max_pairs_per_prompt=None)
  builder = local.prepare(chitchat.ChitchatPreferences, str(tmp_path / "tfds"), config)
  meta = builder.info.metadata
  assert (meta["skipped_invalid_utf8"], meta["skipped_no_turns"]) == (1, 2)
  # ratings 1, 4, 7 twice each; pairs differing by >= 2 within each group of conversations (those SFT trains
  # on, the held-out rest): 12 of the 15 pairs if all were in one group.
  ratings = {f"good{i}": 1 + 3 * (i % 3) for i in range(6)}
  held_out = {i for i in ratings if chitchat.split_by_hash(i, chitchat.DIALOGUE_FRACTIONS) != "train"}
  expected = sum(1 for a, b in itertools.combinations(sorted(ratings), 2)
                 if (a in held_out) == (b in held_out) and ratings[a] != ratings[b])
  splits = builder.info.splits
  pairs = sum(len(builder.as_data_source(name)) for name in ("train", "in_distribution") if name in splits)
  assert 0 < meta["pairs_candidate"] == expected == pairs <= 12
  assert "tensorflow" not in sys.modules


def test_dialogue_builder_on_fake_source_counts_skips(tmp_path):
  path = tmp_path / "fake.json"
  path.write_text(json.dumps({
      "a": _conversation("hi"),
      "b": {
          "messages": [],
          "prompt": "",
          "ratings": None
      }
  }))
  config = chitchat.ChitchatDialogueConfig(name="fake", source_path=str(path),
                                           split_fractions=(1.0, 0.0, 0.0))
  builder = local.prepare(chitchat.ChitchatDialogue, str(tmp_path / "tfds"), config)
  assert builder.info.metadata["skipped_no_turns"] == 1
  source = builder.as_data_source("train")
  assert sorted(int(source[i]["turn_index"]) for i in range(len(source))) == [0, 1]
  assert np.all([source[i]["conversation_id"] == b"a" for i in range(len(source))])


def test_opening_prompts_split_like_the_pairs(conversations):
  topic_split = chitchat.topic_splits(conversations)
  prompts = chitchat.opening_prompts(conversations, 1, topic_split)
  texts = {name: {r["prompt"] for r in records} for name, records in prompts.items()}
  assert all(texts[name] for name in chitchat.PREFERENCE_SPLITS)
  for a in chitchat.PREFERENCE_SPLITS:  # one prompt per conversation, each in exactly one split
    for b in chitchat.PREFERENCE_SPLITS:
      assert a == b or not texts[a] & texts[b]
  by_prompt = {
      chitchat.formats.dialogue_prompt(c.topic, c.turns[:1], 0): c for c in conversations if len(c.turns) > 1
  }
  for text in list(texts["in_distribution"])[:20]:
    conversation = by_prompt[text]
    assert topic_split[conversation.topic] == "train"
    assert chitchat.split_by_hash(conversation.conversation_id, chitchat.DIALOGUE_FRACTIONS) != "train"
  assert text.startswith("Topic: ") and "\nA: " in text and text.endswith("\nB:")
  # prompt_turns = 0: the starter topics, all in 'train' / 'validation' / 'test'
  topics = chitchat.opening_prompts(conversations, 0, topic_split)
  assert not topics["in_distribution"]
  assert len(topics["train"]) == sum(1 for s in topic_split.values() if s == "train")
