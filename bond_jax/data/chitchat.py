"""Chit-chat dialogues and human preferences as TFDS datasets (array_record, no TensorFlow).

Source: the `chitchat-dataset` PyPI package (MIT): a JSON object {conversation_id: {"messages":
[[{"text", "sender", ...}, ...], ...], "prompt": starter prompt, "ratings": {"witty", "upbeat",
"interesting"} (1-10) or null}}. A message (list of utterances by one sender) is a turn; its
utterances are joined by a space. Transcript format: see formats.py.

Two builders:
  ChitchatDialogue     (prompt = topic + last `context_turns` turns, response = next `response_turns`
                       turns). Split by a hash of the conversation id, so no conversation straddles
                       two splits.
  ChitchatPreferences  (prompt = topic line, chosen/rejected = the first `response_turns` turns of two
                       conversations under the same starter prompt). The rule: rating = one of
                       witty/upbeat/interesting or 'mean' of the three (default 'interesting');
                       a pair needs |rating difference| >= `margin` (default 2), chosen = higher.
                       Excluded and counted: unrated conversations, conversations without a starter
                       prompt, pairs whose two responses are the same text. At most
                       `max_pairs_per_prompt` pairs are drawn per prompt (seeded). Split by starter
                       prompt AND by conversation (PREFERENCE_SPLITS): 'train' pairs come from the
                       training topics' conversations of the dialogue train split; 'in_distribution'
                       pairs from the same topics' held-out conversations (the ones the distillation
                       stage evaluates on); 'validation' / 'test' from unseen topics.

Prompts for the distillation stage (`opening_prompts`): a conversation's topic and its first
`prompt_turns` turns ("Topic: ...\nA: hi\nB:"), one per conversation, split like the pairs; the response
is the next `response_turns` turns, so the reward model, trained on the first prompt_turns +
response_turns turns, scores exactly the transcript it was trained on.

Bad data is never silent: a missing/empty/non-JSON source or a structurally malformed record raises
ValueError (FileNotFoundError for a missing file); a conversation with invalid UTF-8 or with no
non-empty turn is skipped and counted. The counts are in `builder.info.metadata` (saved with the
dataset) and returned by `load_conversations` / `preference_pairs`.

Reading (no TensorFlow): `prepare(ChitchatDialogue, data_dir, config)` then
`builder.as_data_source(split)`; records are dicts of bytes (text) and numpy scalars.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from typing import Any

import chitchat_dataset
import numpy as np
import tensorflow_datasets as tfds

from bond_jax.data import formats, local

DEFAULT_SOURCE_PATH = os.path.join(os.path.dirname(chitchat_dataset.__file__), "dataset.json")
RATING_NAMES = ("witty", "upbeat", "interesting")
SPLITS = ("train", "validation", "test")  # the dialogue builder's (by conversation)
PREFERENCE_SPLITS = ("train", "in_distribution", "validation", "test")  # by topic, then by conversation
DIALOGUE_FRACTIONS = (0.9, 0.05, 0.05)  # ChitchatDialogueConfig.split_fractions' default
TOPIC_FRACTIONS = (0.8, 0.1, 0.1)


@dataclasses.dataclass(frozen=True)
class Conversation:
  conversation_id: str
  topic: str  # the starter prompt; '' when the record has none
  turns: tuple[str, ...]  # one string per message, utterances joined by ' '
  ratings: dict[str, int] | None  # None when the conversation was not rated


def _is_valid_utf8(text: str) -> bool:
  # The file is decoded with surrogateescape, so undecodable bytes (and JSON "\udcXX" escapes)
  # survive as lone surrogates, which UTF-8 cannot encode.
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _read_source(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"chitchat source {path} does not exist")
  with open(path, "rb") as f:
    raw = f.read()
  if not raw.strip():
    raise ValueError(f"chitchat source {path} is empty; expected a JSON object of conversations")
  try:
    data = json.loads(raw.decode("utf-8", errors="surrogateescape"))
  except json.JSONDecodeError as e:
    raise ValueError(f"chitchat source {path} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"chitchat source {path} holds a JSON {type(data).__name__}; expected an object "
                     "mapping conversation ids to conversations")
  return data


def _parse_turns(conversation_id: str, record: Any) -> list[str]:
  """Turn texts of a record; raises on a malformed structure (not on empty text)."""
  if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
    raise ValueError(f"conversation {conversation_id!r} has no 'messages' list; expected "
                     "{'messages': [[{'text': ...}, ...], ...]}")
  turns = []
  for message in record["messages"]:
    if not isinstance(message, list) or not all(
        isinstance(u, dict) and isinstance(u.get("text"), str) for u in message):
      raise ValueError(f"conversation {conversation_id!r} has a message that is not a list of "
                       "{'text': str} utterances")
    texts = [formats.clean_utterance(u["text"]).strip() for u in message]
    turns.append(" ".join(t for t in texts if t))
  return turns


def load_conversations(path: str | None = None,
                       max_conversations: int | None = None) -> tuple[list[Conversation], dict[str, int]]:
  """Parses the source (default: the package's dataset.json) in file order.

  Returns (conversations, stats) with stats keys: conversations_read, skipped_invalid_utf8,
  skipped_no_turns (no non-empty turn, i.e. no response), empty_turns_dropped.
  """
  path = path or DEFAULT_SOURCE_PATH
  data = _read_source(path)
  stats = dict(conversations_read=0, skipped_invalid_utf8=0, skipped_no_turns=0, empty_turns_dropped=0)
  conversations = []
  for conversation_id, record in itertools.islice(data.items(), max_conversations):
    stats["conversations_read"] += 1
    turns = _parse_turns(conversation_id, record)
    topic = record.get("prompt") or ""
    if not isinstance(topic, str):
      raise ValueError(f"conversation {conversation_id!r} has prompt {topic!r}; expected a string")
    if not all(_is_valid_utf8(s) for s in [conversation_id, topic, *turns]):
      stats["skipped_invalid_utf8"] += 1
      continue
    kept = [t for t in turns if t]
    stats["empty_turns_dropped"] += len(turns) - len(kept)
    if not kept:
      stats["skipped_no_turns"] += 1
      continue
    ratings = record.get("ratings")
    if ratings is not None and not (isinstance(ratings, dict) and
                                    all(isinstance(ratings.get(k), (int, float)) for k in RATING_NAMES)):
      raise ValueError(f"conversation {conversation_id!r} has ratings {ratings!r}; expected null or numbers "
                       f"for {RATING_NAMES}")
    conversations.append(Conversation(conversation_id, topic.strip(), tuple(kept), ratings))
  return conversations, stats


def _unit_hash(key: str) -> float:
  """Deterministic value in [0, 1) from a string (stable across runs and machines, unlike hash())."""
  return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / float(16**12)


def _check_fractions(fractions: Sequence[float]) -> None:
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
    raise ValueError(f"split_fractions={tuple(fractions)} must be 3 non-negative numbers "
                     "(train, validation, test) summing to 1")


def split_by_hash(key: str, fractions: Sequence[float]) -> str:
  """Split of `key`: train if hash < f_train, validation if < f_train + f_val, else test."""
  _check_fractions(fractions)
  u = _unit_hash(key)
  if u < fractions[0]:
    return "train"
  return "validation" if u < fractions[0] + fractions[1] else "test"


def split_by_rank(keys: Sequence[str], fractions: Sequence[float]) -> dict[str, str]:
  """Split of each key, by rank of its hash: exact proportions, each non-zero split non-empty.

  Used for starter prompts (only ~35 of them), where independent hashing could leave a split empty.
  """
  _check_fractions(fractions)
  ranked = sorted(set(keys), key=_unit_hash)
  n = len(ranked)
  n_val = max(1, round(fractions[1] * n)) if fractions[1] > 0 else 0
  n_test = max(1, round(fractions[2] * n)) if fractions[2] > 0 else 0
  n_train = n - n_val - n_test
  if n_train < (1 if fractions[0] > 0 else 0):
    raise ValueError(f"{n} keys cannot fill the splits {tuple(fractions)}; need more starter prompts")
  names = ["train"] * n_train + ["validation"] * n_val + ["test"] * n_test
  return dict(zip(ranked, names))


def dialogue_examples(conversation: Conversation, context_turns: int,
                      response_turns: int) -> list[dict[str, Any]]:
  """One example per turn: prompt = topic + up to `context_turns` previous turns, response = the
  turn and up to `response_turns - 1` following ones."""
  if context_turns < 0 or response_turns < 1:
    raise ValueError(f"context_turns={context_turns}, response_turns={response_turns}; need >= 0 and >= 1")
  turns = conversation.turns
  examples = []
  for i in range(len(turns)):
    start = max(0, i - context_turns)
    examples.append(
        dict(
            prompt=formats.dialogue_prompt(conversation.topic, turns[start:i], start),
            response=formats.dialogue_response(turns[i:i + response_turns], i),
            conversation_id=conversation.conversation_id,
            turn_index=np.int32(i),
        ))
  return examples


def conversation_rating(conversation: Conversation, rating: str) -> float | None:
  """The chosen rating (one of RATING_NAMES or 'mean'), or None for an unrated conversation."""
  if rating not in (*RATING_NAMES, "mean"):
    raise ValueError(f"rating={rating!r}; allowed: {RATING_NAMES + ('mean',)}")
  if conversation.ratings is None:
    return None
  if rating == "mean":
    return float(np.mean([conversation.ratings[k] for k in RATING_NAMES]))
  return float(conversation.ratings[rating])


def _candidate_pairs(ratings: Sequence[float], responses: Sequence[str], margin: float,
                     stats: dict[str, int]) -> list[tuple[int, int]]:
  """(higher-rated index, lower-rated index) of every pair of one topic's conversations whose ratings
  differ by >= margin and whose responses differ; counts candidates and identical drops in stats."""
  candidates = []
  for i, j in itertools.combinations(range(len(ratings)), 2):
    if abs(ratings[i] - ratings[j]) < margin:
      continue
    stats["pairs_candidate"] += 1
    if responses[i] == responses[j]:
      stats["pairs_identical_dropped"] += 1
      continue
    candidates.append((i, j) if ratings[i] > ratings[j] else (j, i))
  return candidates


def rated_topics(conversations: Sequence[Conversation], rating: str,
                 stats: dict[str, int] | None = None) -> dict[str, list[tuple[float, Conversation]]]:
  """{topic: [(rating, conversation), ...]} of the rated conversations with a starter prompt, each topic's
  list in conversation-id order; unrated / topic-less conversations are counted in `stats` when given."""
  stats = {} if stats is None else stats
  stats.setdefault("conversations_unrated", 0)
  stats.setdefault("conversations_no_topic", 0)
  by_topic: dict[str, list[tuple[float, Conversation]]] = {}
  for conversation in conversations:
    value = conversation_rating(conversation, rating)
    if value is None:
      stats["conversations_unrated"] += 1
    elif not conversation.topic:
      stats["conversations_no_topic"] += 1
    else:
      by_topic.setdefault(conversation.topic, []).append((value, conversation))
  return {t: sorted(rated, key=lambda rc: rc[1].conversation_id) for t, rated in by_topic.items()}


def topic_splits(conversations: Sequence[Conversation], rating: str = "interesting",
                 fractions: Sequence[float] = TOPIC_FRACTIONS) -> dict[str, str]:
  """{starter prompt: 'train' | 'validation' | 'test'} over the topics of the rated conversations (the
  reward model's topic split, which the distillation prompts share)."""
  topics = list(rated_topics(conversations, rating))
  return split_by_rank(topics, fractions) if topics else {}


def conversation_split(conversation: Conversation, topic_split: dict[str, str],
                       dialogue_fractions: Sequence[float] = DIALOGUE_FRACTIONS) -> str | None:
  """One of PREFERENCE_SPLITS, or None for a conversation without a split topic. A training topic's
  conversation is 'train' only when the SFT data also trained on it (dialogue split 'train'); its other
  conversations are the 'in_distribution' held-out ones, unseen by the tokenizer, SFT and reward model."""
  topic = topic_split.get(conversation.topic)
  if topic != "train":
    return topic
  seen = split_by_hash(conversation.conversation_id, dialogue_fractions) == "train"
  return "train" if seen else "in_distribution"


def preference_pairs(
    conversations: Sequence[Conversation],
    *,
    rating: str = "interesting",
    margin: float = 2.0,
    response_turns: int = 4,
    max_pairs_per_prompt: int | None = 200,
    split_fractions: Sequence[float] = TOPIC_FRACTIONS,
    seed: int = 0,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
  """Pairs (prompt, chosen, rejected) per PREFERENCE_SPLITS split, following the rule in the module
  docstring; both conversations of a pair are in the same split (`conversation_split`).

  Returns ({split: [pair, ...]}, stats); stats counts exclusions, candidate pairs and, per split,
  pairs and prompts ("pairs_train", "prompts_train", ...).
  """
  if margin <= 0:
    raise ValueError(f"margin={margin} must be positive (equal ratings carry no preference)")
  if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
    raise ValueError(f"max_pairs_per_prompt={max_pairs_per_prompt} must be >= 1 or None")
  stats = dict(conversations_unrated=0, conversations_no_topic=0, pairs_candidate=0,
               pairs_identical_dropped=0)
  by_topic = rated_topics(conversations, rating, stats)
  topic_split = split_by_rank(list(by_topic), split_fractions) if by_topic else {}
  pairs: dict[str, list[dict[str, Any]]] = {name: [] for name in PREFERENCE_SPLITS}
  topics_of: dict[str, set[str]] = {name: set() for name in PREFERENCE_SPLITS}
  for topic in sorted(by_topic):
    groups: dict[str, list[tuple[float, Conversation]]] = {}
    for rc in by_topic[topic]:
      groups.setdefault(conversation_split(rc[1], topic_split), []).append(rc)
    for name in sorted(groups):
      drawn = _topic_pairs(topic, groups[name], margin, response_turns, max_pairs_per_prompt, seed, stats)
      pairs[name] += drawn
      topics_of[name].update([topic] if drawn else [])
  for name in PREFERENCE_SPLITS:
    stats[f"pairs_{name}"] = len(pairs[name])
    stats[f"prompts_{name}"] = len(topics_of[name])
  return pairs, stats


def _topic_pairs(topic: str, rated: Sequence[tuple[float, Conversation]], margin: float, response_turns: int,
                 max_pairs: int | None, seed: int, stats: dict[str, int]) -> list[dict[str, Any]]:
  """At most max_pairs pairs among one topic's rated conversations of one split (seeded per topic)."""
  responses = [formats.dialogue_response(c.turns[:response_turns], 0) for _, c in rated]
  candidates = _candidate_pairs([value for value, _ in rated], responses, margin, stats)
  # A per-topic seed keeps each topic's draw independent of which other topics are present.
  rng = np.random.default_rng([seed, int(_unit_hash(topic) * 2**32)])
  out = []
  for k in sorted(rng.permutation(len(candidates))[:max_pairs]):
    hi, lo = candidates[k]
    out.append(
        dict(prompt=formats.dialogue_prompt(topic, (), 0), chosen=responses[hi], rejected=responses[lo],
             chosen_rating=np.float32(rated[hi][0]), rejected_rating=np.float32(rated[lo][0]),
             chosen_id=rated[hi][1].conversation_id, rejected_id=rated[lo][1].conversation_id))
  return out


def opening_prompts(conversations: Sequence[Conversation], prompt_turns: int,
                    topic_split: dict[str, str]) -> dict[str, list[dict[str, str]]]:
  """{split: [{'prompt': text}, ...]} for the distillation stage, split like the pairs
  (`conversation_split`): the topic and the first `prompt_turns` turns of every conversation that has a
  turn after them (its opening; rated or not), distinct texts in conversation-id order. prompt_turns = 0
  gives the starter topics themselves, one prompt each. An 'in_distribution' text that a training
  conversation also opens with is dropped (held out means unseen)."""
  if prompt_turns < 0:
    raise ValueError(f"prompt_turns={prompt_turns} must be >= 0")
  seen: dict[str, dict[str, None]] = {name: {} for name in PREFERENCE_SPLITS}
  for conversation in sorted(conversations, key=lambda c: c.conversation_id):
    name = conversation_split(conversation, topic_split)
    if name is None or len(conversation.turns) <= prompt_turns:
      continue
    if prompt_turns == 0 and name == "in_distribution":
      name = "train"  # a topic line is the same prompt whichever conversation it came from
    text = formats.dialogue_prompt(conversation.topic, conversation.turns[:prompt_turns], 0)
    seen[name].setdefault(text, None)
  # A common opening ("Hi!") can occur in a training conversation too: held out means never trained on.
  seen["in_distribution"] = {t: None for t in seen["in_distribution"] if t not in seen["train"]}
  return {name: [{"prompt": text} for text in texts] for name, texts in seen.items()}


@dataclasses.dataclass(eq=False)
class ChitchatDialogueConfig(tfds.core.BuilderConfig):
  """Sizes and source of the dialogue dataset; give a new `name` for each different setting."""

  source_path: str | None = None  # None: the chitchat-dataset package's dataset.json
  max_conversations: int | None = None  # first N conversations in file order (None: all)
  context_turns: int = 4
  response_turns: int = 1
  split_fractions: tuple[float, float, float] = DIALOGUE_FRACTIONS


@dataclasses.dataclass(eq=False)
class ChitchatPreferencesConfig(tfds.core.BuilderConfig):
  """The preference rule and sizes (see the module docstring); a new `name` per setting."""

  source_path: str | None = None
  max_conversations: int | None = None
  rating: str = "interesting"
  margin: float = 2.0
  response_turns: int = 4
  max_pairs_per_prompt: int | None = 200
  split_fractions: tuple[float, float, float] = TOPIC_FRACTIONS
  seed: int = 0


def _text_features(names: Sequence[str], **extra: Any) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({**{n: tfds.features.Text() for n in names}, **extra})


class ChitchatDialogue(local.LocalBuilder):
  """(prompt, response) dialogue examples; see the module docstring."""

  BUILDER_CONFIGS = [ChitchatDialogueConfig(name="default")]
  DESCRIPTION = "Chit-chat dialogue turns with their preceding context."

  def _features(self) -> tfds.features.FeaturesDict:
    return _text_features(["prompt", "response", "conversation_id"],
                          turn_index=tfds.features.Scalar(np.int32))

  def _split_generators(self, dl_manager):
    del dl_manager  # the source ships with the chitchat-dataset package: nothing to download
    config = self.builder_config
    conversations, stats = load_conversations(config.source_path, config.max_conversations)
    by_split: dict[str, list[Conversation]] = {name: [] for name in SPLITS}
    for conversation in conversations:
      by_split[split_by_hash(conversation.conversation_id, config.split_fractions)].append(conversation)

    def examples_of(convs):
      turns = (config.context_turns, config.response_turns)
      return [e for c in convs for e in dialogue_examples(c, *turns)]

    examples = {name: examples_of(convs) for name, convs in by_split.items()}
    for name in SPLITS:
      stats[f"conversations_{name}"] = len(by_split[name])
      stats[f"examples_{name}"] = len(examples[name])
    self.info.metadata.update(stats)
    return {name: self._generate_examples(examples[name]) for name in SPLITS if examples[name]}

  def _generate_examples(self, examples):
    for example in examples:
      yield f"{example['conversation_id']}/{int(example['turn_index'])}", example


class ChitchatPreferences(local.LocalBuilder):
  """(prompt, chosen, rejected) pairs from human ratings; see the module docstring."""

  BUILDER_CONFIGS = [ChitchatPreferencesConfig(name="default")]
  DESCRIPTION = "Preference pairs: conversations rated higher vs lower under one starter prompt."

  def _features(self) -> tfds.features.FeaturesDict:
    return _text_features(
        ["prompt", "chosen", "rejected", "chosen_id", "rejected_id"],
        chosen_rating=tfds.features.Scalar(np.float32),
        rejected_rating=tfds.features.Scalar(np.float32),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    conversations, stats = load_conversations(config.source_path, config.max_conversations)
    pairs, pair_stats = preference_pairs(
        conversations,
        rating=config.rating,
        margin=config.margin,
        response_turns=config.response_turns,
        max_pairs_per_prompt=config.max_pairs_per_prompt,
        split_fractions=config.split_fractions,
        seed=config.seed,
    )
    self.info.metadata.update({**stats, **pair_stats})
    return {name: self._generate_examples(pairs[name]) for name in PREFERENCE_SPLITS if pairs[name]}

  def _generate_examples(self, pairs):
    for pair in pairs:
      yield f"{pair['chosen_id']}>{pair['rejected_id']}", pair
