"""Shared, session-scoped data fixtures: a small tokenizer and small built datasets (built once)."""

import itertools

import pytest

from bond_jax.data import chitchat, local
from bond_jax.data.tokenizer import train_bpe_tokenizer

TOKENIZER_CONVERSATIONS = 600  # first N conversations train the tokenizer; later ones are held out


@pytest.fixture(scope="session")
def conversations():
  convs, _ = chitchat.load_conversations()
  return convs


@pytest.fixture(scope="session")
def tokenizer(conversations):
  lines = [t for c in conversations[:TOKENIZER_CONVERSATIONS] for t in (c.topic, *c.turns) if t]
  return train_bpe_tokenizer(lines, vocab_size=1500)


@pytest.fixture(scope="session")
def held_out_lines(conversations):
  turns = (t for c in conversations[TOKENIZER_CONVERSATIONS:] for t in c.turns)
  return list(itertools.islice(turns, 3000))


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def dialogue_builder(tfds_dir):
  config = chitchat.ChitchatDialogueConfig(name="small", max_conversations=300)
  return local.prepare(chitchat.ChitchatDialogue, tfds_dir, config)


@pytest.fixture(scope="session")
def preference_builder(tfds_dir):
  # 2,000 conversations cover every starter prompt; 20 pairs per prompt keep the build fast.
  config = chitchat.ChitchatPreferencesConfig(name="small", max_conversations=2000, max_pairs_per_prompt=20)
  return local.prepare(chitchat.ChitchatPreferences, tfds_dir, config)
