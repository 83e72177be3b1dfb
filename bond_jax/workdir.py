"""What a workdir is: the layout every stage (SFT, reward model, BOND) shares, and its config guard.

Layout:
    <workdir>/config.json                 the config fields that fix what the workdir holds (guard below)
    <workdir>/tokenizer/tokenizer.model   SentencePiece BPE, trained once on the chitchat train split (or
                                          a copy of the given tokenizer's files: tokenizer.json, ...)
    <workdir>/data/                       TFDS array_record datasets (built once)
    <workdir>/<stage>/checkpoints/<step>/ Orbax {state, meta} (checkpoint.py); stage = sft | reward | ...
    <workdir>/<stage>/metrics.jsonl       one JSON object per logged step / evaluation

The guard: the first run to use a workdir writes `config.json` with GUARDED_FIELDS; a later run whose
values differ is refused, because its tokenizer, datasets and checkpoints were made for other shapes or
other data. Everything else may change between runs: step counts (raise `sft.steps` and the stage resumes
from its last checkpoint and trains on), learning rates, eval/checkpoint cadence, the mesh (checkpoints
restore onto any mesh), sampling and BOND settings. A stage that already finished is not retrained when
a LATER stage's or its own non-guarded settings change, except that more steps continue it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

STAGES = ("sft", "reward", "bond")  # the stage directories, in the order the pipeline runs them
KINDS = {"lm": "sft", "reward": "reward"}  # params kind -> the stage whose checkpoints hold it

# Fields that fix the tokenizer, the datasets, the parameter shapes and the data order of a workdir.
GUARDED_FIELDS = (
    "seed",
    "data",
    "model",
    "reference",
    "reward_model",
    "reward_fn",
    "sft.batch_size",
    "sft.seq_len",
    "reward_training.batch_size",
    "reward_training.max_len",
    "reward_training.buckets",
    "reward_training.rating",
    "reward_training.margin",
    "reward_training.max_pairs_per_prompt",
    "reward_training.model",
)
# A guarded field added after workdirs were made: a workdir recorded without it (by a config that has it)
# was made with this value.
LEGACY_VALUES = {"reward_training.model": "transformer"}
BAG_OF_WORDS_FILE = "bag_of_words.json"  # the reward stage's model when reward_training.model='bag_of_words'
# reward_training.model: what the workdir's reward stage makes (a config without the key: the legacy value)
REWARD_MODELS = ("transformer", "bag_of_words")


def reward_model_kind(config: ml_collections.ConfigDict) -> str:
  """reward_training.model of `config` (one of REWARD_MODELS once validated)."""
  return config.reward_training.get("model", LEGACY_VALUES["reward_training.model"])


def is_bag_of_words(config: ml_collections.ConfigDict) -> bool:
  """Whether this config's reward stage fits the bag-of-words model (scored on the host) instead of a
  network."""
  return reward_model_kind(config) == "bag_of_words"


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer", "tokenizer.model")


def tokenizer_dir(workdir: str) -> str:
  """<workdir>/tokenizer: the trained tokenizer.model, or a copy of the given tokenizer's files."""
  return os.path.join(workdir, "tokenizer")


def data_dir(workdir: str) -> str:
  return os.path.join(workdir, "data")


def stage_dir(workdir: str, stage: str) -> str:
  """<workdir>/<stage>; stage is a plain directory name such as 'sft' or 'reward'."""
  if not stage or os.sep in stage or stage.startswith("."):
    raise ValueError(f"stage={stage!r} must be a plain directory name such as 'sft' or 'reward'")
  return os.path.join(workdir, stage)


def bag_of_words_path(workdir: str) -> str:
  """<workdir>/reward/bag_of_words.json: a bag-of-words reward stage's fitted model and its metrics."""
  return os.path.join(stage_dir(workdir, "reward"), BAG_OF_WORDS_FILE)


def checkpoint_dir(workdir: str, stage: str) -> str:
  return os.path.join(stage_dir(workdir, stage), "checkpoints")


def metrics_path(workdir: str, stage: str) -> str:
  return os.path.join(stage_dir(workdir, stage), "metrics.jsonl")


# ---------------------------------------------------------------------------------------------------
# The config guard.


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node: Any = config
  for part in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return None
    node = node[part]
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def guarded_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{field: value} of GUARDED_FIELDS, normalised through JSON (tuples become lists)."""
  return json.loads(json.dumps({f: _lookup(config, f) for f in GUARDED_FIELDS}, sort_keys=True))


def _first_difference(stored: Any, current: Any, path: str) -> str | None:
  if isinstance(stored, dict) and isinstance(current, dict):
    for key in sorted(set(stored) | set(current)):
      found = _first_difference(stored.get(key), current.get(key), f"{path}.{key}" if path else key)
      if found:
        return found
    return None
  return None if stored == current else f"{path}={current!r} (the workdir was made with {stored!r})"


def check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuse a config whose guarded fields differ from those recorded in `workdir` (nothing is written:
  the pipeline records them with `record_config` only once the whole config and its paths checked out)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    stored = json.load(f)
  current = guarded_config(config)
  for field, value in LEGACY_VALUES.items():
    if field not in stored and current.get(field) is not None:
      stored[field] = value
  difference = _first_difference(stored, current, "")
  if difference:
    raise ValueError(f"workdir {workdir} was made by a different config: {difference}; use a new "
                     "--workdir or the original values (guarded fields: see bond_jax/workdir.py)")


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """check_config, then write the guarded fields on first use of `workdir`."""
  check_config(config, workdir)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    write_atomically(path, json.dumps(guarded_config(config), indent=2, sort_keys=True).encode())


def write_atomically(path: str, data: bytes) -> None:
  # Several processes (multi-host) may write the same file: each writes its own temporary name and the
  # rename is atomic, so a reader never sees a partial file.
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
