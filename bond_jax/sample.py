"""Sample N responses to one prompt and rank them by a reward model (Best-of-N, best first).

    python -m bond_jax.sample --model=HF_DIR --reward_model=HF_DIR --prompt="Hello" -n 8
    python -m bond_jax.sample --model=HF_DIR --reward_model=HF_DIR --prompt_ids=2,17,40 -n 8

The prompt is tokenized with the model directory's tokenizer.model (SentencePiece, BOS prepended) when
there is one; otherwise pass --prompt_ids. Without --reward_model the samples print in sampled order.

Every input is checked before a weight is read (one-line errors, exit 2): the directories (a bond_jax
workdir must be exported first), the kind of each model (--model a causal LM, --reward_model a reward
model), the sampling flags, the prompt (integer ids inside the vocabulary, fitting the context with
--max_new_tokens) and that the reward model reads the policy's tokens (no smaller vocabulary, the same
special ids).
"""

from __future__ import annotations

import os
from typing import Any

from absl import app, flags
import jax
import numpy as np

from bond_jax import cli, hf, sampling, scoring, sharding
from bond_jax import workdir as workdir_lib
from bond_jax.models.config import ModelConfig

_MODEL = flags.DEFINE_string("model", None, "Policy directory (Hugging Face format).")
_REWARD_MODEL = flags.DEFINE_string("reward_model", None, "Reward model directory (Hugging Face format).")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (needs a tokenizer.model in --model).")
_PROMPT_IDS = flags.DEFINE_string("prompt_ids", None, "Comma-separated token ids, instead of --prompt.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 8, "Responses to sample.", short_name="n")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Longest response, in tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k likeliest tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass, in (0, 1] (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_COMPACT_ROWS = flags.DEFINE_integer(
    "compact_rows", 0, "0 = off; K >= 2: decode only the responses still running, gathered into multiples "
    "of 1/K of the rows (faster when many stop early; more to compile).")
flags.mark_flags_as_required(["model"])

SPECIAL_IDS = ("bos", "eos", "pad")
_KIND_FLAGS = {"lm": "model", "reward": "reward_model"}


def _check_not_workdir(path: str, kind: str) -> None:
  stages = [workdir_lib.checkpoint_dir(path, stage) for stage in ("sft", "reward", "bond")]
  if os.path.isfile(workdir_lib.tokenizer_path(path)) or any(map(os.path.isdir, stages)):
    which = " --which=reward" if kind == "reward" else ""
    raise cli.UserError(f"--{_KIND_FLAGS[kind]} {path} is a bond_jax workdir, not a model directory; export "
                        f"it first: python -m bond_jax.export --workdir={path} --out=DIR{which}")


def model_config(path: str, kind: str) -> tuple[ModelConfig, dict[str, int | None]]:
  """(ModelConfig, special ids {'bos', 'eos', 'pad'}) of a Hugging Face directory holding a model of
  `kind`, from config.json and the safetensors headers alone."""
  flag = _KIND_FLAGS[kind]
  if not os.path.isdir(path):
    problem = "is not a directory" if os.path.exists(path) else "does not exist"
    raise cli.UserError(f"--{flag} {path} {problem}")
  _check_not_workdir(path, kind)
  try:
    cfg, raw = hf.load_config(path)
    hf.check_kind(path, kind)
  except ValueError as error:
    raise cli.UserError(f"--{flag}: {error}") from None
  return cfg, {name: raw.get(f"{name}_token_id") for name in SPECIAL_IDS}


def load_tokenizer(path: str):
  """The directory's SentencePiece tokenizer, or None when it has no tokenizer.model."""
  model_file = os.path.join(path, "tokenizer.model")
  if not os.path.exists(model_file):
    return None
  from bond_jax.data.tokenizer import load_tokenizer as load_sentencepiece
  return load_sentencepiece(model_file)


def prompt_ids(tokenizer, bos_id: int | None) -> list[int]:
  """The prompt's token ids: --prompt_ids, or --prompt through the tokenizer."""
  if _PROMPT_IDS.value is not None:
    try:
      ids = [int(i) for i in _PROMPT_IDS.value.split(",")]
    except ValueError:
      raise cli.UserError(f"--prompt_ids={_PROMPT_IDS.value!r} is not comma-separated integers "
                          "(e.g. --prompt_ids=2,17,40)") from None
  elif _PROMPT.value is None:
    raise cli.UserError("pass --prompt (with a tokenizer.model in --model) or --prompt_ids")
  elif tokenizer is None:
    raise cli.UserError(f"--model {_MODEL.value} has no tokenizer.model; pass --prompt_ids=1,2,3 instead")
  else:
    ids = tokenizer.encode(_PROMPT.value, add_bos=bos_id is not None)
  if not ids:
    raise cli.UserError("the prompt is empty: it has no tokens")
  return ids


def check_prompt(ids: list[int], cfg: ModelConfig, kind: str) -> None:
  """Ids inside the vocabulary, and the prompt plus --max_new_tokens inside the context of the model."""
  flag = _KIND_FLAGS[kind]
  outside = [i for i in ids if not 0 <= i < cfg.vocab_size]
  if outside:
    raise cli.UserError(f"prompt token id {outside[0]} is outside the vocabulary of --{flag} "
                        f"(0 <= id < {cfg.vocab_size})")
  length = len(ids) + _MAX_NEW_TOKENS.value
  if length > cfg.max_seq_len:
    raise cli.UserError(f"the prompt ({len(ids)} tokens) plus --max_new_tokens={_MAX_NEW_TOKENS.value} is "
                        f"{length} tokens, longer than the context of --{flag} (max_seq_len="
                        f"{cfg.max_seq_len}); shorten the prompt or lower --max_new_tokens")


def check_reward_model(cfg: ModelConfig, ids: dict, rm_cfg: ModelConfig, rm_ids: dict) -> None:
  """The reward model must read the policy's tokens: a vocabulary no smaller, the same special ids."""
  if rm_cfg.vocab_size < cfg.vocab_size:
    raise cli.UserError(f"--reward_model has a smaller vocabulary ({rm_cfg.vocab_size}) than --model "
                        f"({cfg.vocab_size}): it cannot score every token the policy samples")
  for name in SPECIAL_IDS:
    if rm_ids[name] != ids[name]:
      raise cli.UserError(f"--reward_model's {name}_token_id is {rm_ids[name]} but --model's is "
                          f"{ids[name]}: the two models must share a tokenizer")


def check_inputs() -> tuple[np.ndarray, Any, ModelConfig, dict, ModelConfig | None]:
  """Every check of the module docstring, before any weight is read: (prompt [1, P] int32, tokenizer,
  cfg, special ids, reward model cfg or None)."""
  sampling.validate_sampling(num_samples=_NUM_SAMPLES.value, max_new_tokens=_MAX_NEW_TOKENS.value,
                             temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                             compact_rows=_COMPACT_ROWS.value)
  cfg, ids = model_config(_MODEL.value, "lm")
  rm_cfg = None
  if _REWARD_MODEL.value is not None:
    rm_cfg, rm_ids = model_config(_REWARD_MODEL.value, "reward")
    check_reward_model(cfg, ids, rm_cfg, rm_ids)
  tokenizer = load_tokenizer(_MODEL.value)
  prompt = prompt_ids(tokenizer, ids["bos"])
  check_prompt(prompt, cfg, "lm")
  if rm_cfg is not None:
    check_prompt(prompt, rm_cfg, "reward")
  return np.asarray([prompt], np.int32), tokenizer, cfg, ids, rm_cfg


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  prompt, tokenizer, cfg, ids, rm_cfg = check_inputs()
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  params, _ = hf.import_params(_MODEL.value, mesh, kind="lm")
  mask = np.ones_like(prompt, bool)
  eos = () if ids["eos"] is None else (ids["eos"],)
  pad = ids["pad"] if ids["pad"] is not None else 0
  out = jax.device_get(
      sampling.generate(cfg, params, prompt, mask, jax.random.key(_SEED.value),
                        num_samples=_NUM_SAMPLES.value, max_new_tokens=_MAX_NEW_TOKENS.value,
                        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, eos_ids=eos,
                        pad_id=pad, compact_rows=_COMPACT_ROWS.value))
  if rm_cfg is not None:
    rm_params, rm_cfg = hf.import_params(_REWARD_MODEL.value, mesh, kind="reward")
    rewards = np.asarray(scoring.rewards(rm_cfg, rm_params, prompt, mask, out.tokens, out.mask))[0]
    order = np.argsort(-rewards, kind="stable")  # best first; ties keep the lower index first
  else:
    rewards, order = None, np.arange(_NUM_SAMPLES.value)
  for rank, n in enumerate(order):
    response = out.tokens[0, n][out.mask[0, n]]
    text = tokenizer.decode(response) if tokenizer is not None else ",".join(map(str, response))
    score = "" if rewards is None else f"reward {rewards[n]:+.4f}  "
    print(f"#{rank + 1} sample {n}  {score}log pi {out.model_logprobs[0, n].sum():.2f}  "
          f"({int(out.lengths[0, n])} tokens): {text!r}")


if __name__ == "__main__":
  cli.entry(main)
