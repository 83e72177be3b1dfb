"""The workdir shared by every stage (SFT, reward model, BOND) and the trainer.

Layout:
    <workdir>/config.json                 the config fields that fix what the workdir holds (guard below)
    <workdir>/tokenizer/tokenizer.model   SentencePiece BPE, trained once on the chitchat train split
    <workdir>/data/                       TFDS array_record datasets (built once)
    <workdir>/<stage>/checkpoints/<step>/ Orbax {state, meta} (checkpoint.py); stage = sft | reward | ...
    <workdir>/<stage>/metrics.jsonl       one JSON object per logged step / evaluation

The guard: the first stage to touch a workdir writes `config.json` with GUARDED_FIELDS; a later run whose
values differ is refused, because its tokenizer, datasets and checkpoints were made for other shapes or
other data. Everything else may change between runs: step counts (raise `sft.steps` and the stage resumes
from its last checkpoint and trains on), learning rates, eval/checkpoint cadence, the mesh (checkpoints
restore onto any mesh), sampling and BOND settings. A stage that already finished is not retrained when
a LATER stage's or its own non-guarded settings change, except that more steps continue it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from bond_jax import checkpoint, hf, sharding
from bond_jax.data import chitchat
from bond_jax.data.tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer
from bond_jax.models import presets, reward, transformer
from bond_jax.models.config import ModelConfig

TASKS = ("chitchat",)
KINDS = {"lm": "sft", "reward": "reward"}  # checkpoint kind -> the stage that writes it

# Fields that fix the tokenizer, the datasets, the parameter shapes and the data order of a workdir.
GUARDED_FIELDS = (
    "seed", "data", "model", "reference", "reward_model",
    "sft.batch_size", "sft.seq_len",
    "reward_training.batch_size", "reward_training.max_len", "reward_training.buckets",
    "reward_training.rating", "reward_training.margin",
    "reward_training.max_pairs_per_prompt",
)


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer", "tokenizer.model")


def data_dir(workdir: str) -> str:
  return os.path.join(workdir, "data")


def stage_dir(workdir: str, stage: str) -> str:
  """<workdir>/<stage>; stage is a plain directory name such as 'sft' or 'reward'."""
  if not stage or os.sep in stage or stage.startswith("."):
    raise ValueError(f"stage={stage!r} must be a plain directory name such as 'sft' or 'reward'")
  return os.path.join(workdir, stage)


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
  """Record the guarded fields on first use of `workdir`; refuse a config whose guarded fields differ."""
  path = os.path.join(workdir, "config.json")
  current = guarded_config(config)
  if not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    _write_atomically(path, json.dumps(current, indent=2, sort_keys=True).encode())
    return
  with open(path) as f:
    stored = json.load(f)
  difference = _first_difference(stored, current, "")
  if difference:
    raise ValueError(f"workdir {workdir} was made by a different config: {difference}; use a new "
                     "--workdir or the original values (guarded fields: see bond_jax/workdir.py)")


def _write_atomically(path: str, data: bytes) -> None:
  # Several processes (multi-host) may write the same file: each writes its own temporary name and the
  # rename is atomic, so a reader never sees a partial file.
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Tokenizer, model shape, datasets, mesh.


def _check_task(config: ml_collections.ConfigDict) -> None:
  if config.data.task not in TASKS:
    raise ValueError(f"data.task={config.data.task!r} has no SFT/reward stages here; allowed: "
                     f"{', '.join(TASKS)} (or give --config.reference and --config.reward_model)")


def _max_conversations(config: ml_collections.ConfigDict) -> int | None:
  return config.data.max_conversations or None  # 0 means all


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """config.data.tokenizer if given, else <workdir>/tokenizer/tokenizer.model (trained on first use
  from the dialogue train split, data.vocab_size pieces)."""
  if config.data.tokenizer:
    return load_tokenizer(config.data.tokenizer)
  path = tokenizer_path(workdir)
  if os.path.exists(path):
    return load_tokenizer(path)
  _check_task(config)
  # The same conversation split as the dialogue dataset, so validation text is never seen by the tokenizer.
  fractions = chitchat.ChitchatDialogueConfig(name="split").split_fractions
  conversations, _ = chitchat.load_conversations(max_conversations=_max_conversations(config))
  lines = [text for c in conversations if chitchat.split_by_hash(c.conversation_id, fractions) == "train"
           for text in (c.topic, *c.turns) if text]
  tokenizer = train_bpe_tokenizer(lines, config.data.vocab_size)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _write_atomically(path, tokenizer.model_proto)
  return tokenizer


def model_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ModelConfig:
  """presets.get(model.preset, **model.overrides) with vocab_size = the tokenizer's.

  An override vocab_size larger than the tokenizer's is kept (padding the vocabulary, e.g. to divide the
  tensor axis); a smaller one is an error.
  """
  overrides = dict(config.model.overrides.to_dict()) if config.model.get("overrides") else {}
  vocab = overrides.pop("vocab_size", tokenizer.vocab_size)
  if vocab < tokenizer.vocab_size:
    raise ValueError(f"model.overrides.vocab_size={vocab} is smaller than the tokenizer's "
                     f"{tokenizer.vocab_size}; allowed: >= {tokenizer.vocab_size}")
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  return presets.get(config.model.preset, vocab_size=vocab, **overrides)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
  """Inverse of dataclasses.asdict(ModelConfig) after a JSON round trip (lists back to tuples)."""
  return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def dialogue_builder(config: ml_collections.ConfigDict, workdir: str):
  """The ChitchatDialogue builder in <workdir>/data (prepared on first use). Splits: train/validation/test."""
  _check_task(config)
  max_conv = _max_conversations(config)
  builder_config = chitchat.ChitchatDialogueConfig(
      name=f"ctx{config.data.context_turns}_r{config.data.response_turns}_n{max_conv or 'all'}",
      max_conversations=max_conv, context_turns=config.data.context_turns,
      response_turns=config.data.response_turns)
  return chitchat.prepare(chitchat.ChitchatDialogue, data_dir(workdir), builder_config)


def preference_builder(config: ml_collections.ConfigDict, workdir: str):
  """The ChitchatPreferences builder in <workdir>/data, the pair rule from config.reward_training."""
  _check_task(config)
  rt = config.reward_training
  max_conv = _max_conversations(config)
  per_prompt = rt.get("max_pairs_per_prompt", 200) or None
  builder_config = chitchat.ChitchatPreferencesConfig(
      name=f"{rt.rating}_m{rt.margin:g}_r{config.data.response_turns}_p{per_prompt or 'all'}"
           f"_n{max_conv or 'all'}"
           f"_s{config.seed}",
      max_conversations=max_conv, rating=rt.rating, margin=float(rt.margin),
      response_turns=config.data.response_turns, max_pairs_per_prompt=per_prompt, seed=config.seed)
  return chitchat.prepare(chitchat.ChitchatPreferences, data_dir(workdir), builder_config)


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  return sharding.make_mesh(config.mesh.to_dict())


# ---------------------------------------------------------------------------------------------------
# Metrics log.


def append_metrics(path: str, record: dict[str, Any]) -> None:
  """Append one JSON line (process 0 only; every process computes the same replicated metrics)."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, last_step: int) -> None:
  """Drop records logged after `last_step` (a resumed run logs those steps again)."""
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
  _write_atomically(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())


# ---------------------------------------------------------------------------------------------------
# Loading the params a stage produced (or a Hugging Face model).


def _is_hf_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, "config.json")) and any(
      name.endswith(".safetensors") for name in os.listdir(path))


def _stage_checkpoints(source: str, kind: str) -> str | None:
  """The Orbax directory of `kind` under `source`: a workdir, a stage dir, or a checkpoints dir."""
  for candidate in (checkpoint_dir(source, KINDS[kind]), os.path.join(source, "checkpoints"), source):
    if os.path.isdir(candidate) and any(name.isdigit() for name in os.listdir(candidate)):
      return candidate
  return None


def load_stage_params(source: str, kind: str, mesh: Mesh) -> tuple[Any, ModelConfig]:
  """(params placed on `mesh` by their logical names, ModelConfig) of an SFT policy (kind 'lm') or a
  reward model (kind 'reward').

  source: a workdir (reads <source>/sft or <source>/reward), a stage dir, its checkpoints dir (the latest
  step), or a Hugging Face directory (hf.import_params). Only the params are read from an Orbax
  checkpoint, not the optimizer state.
  """
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}; allowed: {', '.join(KINDS)}")
  if not os.path.isdir(source):
    raise ValueError(f"{source!r} is not a directory; expected a workdir, a stage checkpoint directory "
                     "or a Hugging Face model directory")
  if _is_hf_dir(source):
    return hf.import_params(source, mesh=mesh, kind=kind)
  directory = _stage_checkpoints(source, kind)
  if directory is None:
    raise ValueError(f"{source!r} holds no {KINDS[kind]!r} checkpoint and no Hugging Face model "
                     f"(looked for {checkpoint_dir(source, KINDS[kind])})")
  meta, step = checkpoint.read_meta(directory)
  if meta.get("kind") != kind:
    raise ValueError(f"checkpoint {directory} step {step} is of kind {meta.get('kind')!r}; wanted {kind!r}")
  cfg = model_config_from_dict(meta["model"])
  init_fn = transformer.init_boxed if kind == "lm" else reward.init_boxed
  abstract = jax.eval_shape(lambda r: init_fn(cfg, r), jax.random.key(0))
  logical = sharding.logical_specs(abstract)
  shardings = sharding.tree_shardings(logical, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract),
                        shardings)
  return checkpoint.restore_item(directory, step, "params", target), cfg  # the optimizer state is never read


def save_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _write_atomically(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def as_dict(cfg: ModelConfig) -> dict[str, Any]:
  """ModelConfig as a JSON-ready dict (stored in checkpoint meta)."""
  return dataclasses.asdict(cfg)
