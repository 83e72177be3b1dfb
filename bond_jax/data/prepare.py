"""The data a workdir is prepared with, once: the tokenizer and the chitchat TFDS datasets.

Everything is built under the workdir on first use and read back afterwards (bond_jax/workdir.py gives the
paths). Nothing is downloaded: the conversations come from the chitchat-dataset PyPI package.
"""

from __future__ import annotations

import os

import ml_collections

from bond_jax import workdir as workdir_lib
from bond_jax.data import chitchat, hf_tokenizer, local
from bond_jax.data.tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer

TASKS_WITH_STAGES = ("chitchat",)  # tasks whose SFT and reward-model data are built here


def _check_task(config: ml_collections.ConfigDict) -> None:
  if config.data.task not in TASKS_WITH_STAGES:
    raise ValueError(f"data.task={config.data.task!r} has no SFT/reward stages here; allowed: "
                     f"{', '.join(TASKS_WITH_STAGES)} (or give --config.reference and --config.reward_model)")


def _max_conversations(config: ml_collections.ConfigDict) -> int | None:
  return config.data.max_conversations or None  # 0 means all


def _train_conversations(config: ml_collections.ConfigDict) -> list[chitchat.Conversation]:
  """The conversations of the dialogue train split (the dataset builder's own split rule)."""
  fractions = chitchat.ChitchatDialogueConfig(name="split").split_fractions
  conversations, _ = chitchat.load_conversations(max_conversations=_max_conversations(config))
  return [c for c in conversations if chitchat.split_by_hash(c.conversation_id, fractions) == "train"]


def tokenizer_source(config: ml_collections.ConfigDict) -> str:
  """The given tokenizer: data.tokenizer, else (prompts task) the reference directory's; '' = train one."""
  if config.data.tokenizer:
    return config.data.tokenizer
  reference = config.reference
  if config.data.task == "prompts" and reference and os.path.isdir(reference) and hf_tokenizer.has_tokenizer(
      reference):
    return reference
  return ""


def _keep_tokenizer_files(tok, workdir: str) -> None:
  """A copy of the given tokenizer's files in <workdir>/tokenizer (what export writes beside a model)."""
  directory = workdir_lib.tokenizer_dir(workdir)
  os.makedirs(directory, exist_ok=True)
  for name, data in tok.files.items():
    if not os.path.exists(os.path.join(directory, name)):
      workdir_lib.write_atomically(os.path.join(directory, name), data)


def tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer | hf_tokenizer.HFTokenizer:
  """The given tokenizer (tokenizer_source: a SentencePiece .model or a Hugging Face tokenizer directory,
  its files copied into <workdir>/tokenizer), else <workdir>/tokenizer/tokenizer.model (trained on first
  use from the dialogue train split, data.vocab_size pieces: validation text is never seen by the
  tokenizer)."""
  source = tokenizer_source(config)
  if source:
    tok = hf_tokenizer.load(source)
    _keep_tokenizer_files(tok, workdir)
    return tok
  path = workdir_lib.tokenizer_path(workdir)
  if os.path.exists(path):
    return load_tokenizer(path)
  _check_task(config)
  lines = [text for c in _train_conversations(config) for text in (c.topic, *c.turns) if text]
  trained = train_bpe_tokenizer(lines, config.data.vocab_size)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  workdir_lib.write_atomically(path, trained.model_proto)
  return trained


def train_responses(config: ml_collections.ConfigDict) -> list[str]:
  """The response texts of the dialogue train split, straight from the source conversations (~10x faster
  than reading back 125k array_record records)."""
  return [
      e["response"] for c in _train_conversations(config)
      for e in chitchat.dialogue_examples(c, config.data.context_turns, config.data.response_turns)
  ]


def dialogue_builder(config: ml_collections.ConfigDict, workdir: str):
  """The ChitchatDialogue builder in <workdir>/data (prepared on first use). Splits: train/validation/test."""
  _check_task(config)
  max_conv = _max_conversations(config)
  builder_config = chitchat.ChitchatDialogueConfig(
      name=f"ctx{config.data.context_turns}_r{config.data.response_turns}_n{max_conv or 'all'}",
      max_conversations=max_conv, context_turns=config.data.context_turns,
      response_turns=config.data.response_turns)
  return local.prepare(chitchat.ChitchatDialogue, workdir_lib.data_dir(workdir), builder_config)


def preference_builder(config: ml_collections.ConfigDict, workdir: str):
  """The ChitchatPreferences builder in <workdir>/data, the pair rule from config.reward_training."""
  _check_task(config)
  rt = config.reward_training
  max_conv = _max_conversations(config)
  per_prompt = rt.max_pairs_per_prompt or None
  # the reward model scores a distillation prompt's opening turns and the response together
  turns = config.data.prompt_turns + config.data.response_turns
  builder_config = chitchat.ChitchatPreferencesConfig(
      name=f"{rt.rating}_m{rt.margin:g}_t{turns}_p{per_prompt or 'all'}_n{max_conv or 'all'}_s{config.seed}",
      max_conversations=max_conv, rating=rt.rating, margin=float(rt.margin), response_turns=turns,
      max_pairs_per_prompt=per_prompt, seed=config.seed)
  return local.prepare(chitchat.ChitchatPreferences, workdir_lib.data_dir(workdir), builder_config)
