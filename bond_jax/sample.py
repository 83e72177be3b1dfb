"""Sample N responses to one prompt and rank them by a reward model (Best-of-N, best first).

    python -m bond_jax.sample --model=HF_DIR --reward_model=HF_DIR --prompt="Hello" -n 8
    python -m bond_jax.sample --model=HF_DIR --reward_model=HF_DIR --prompt_ids=2,17,40 -n 8

The prompt is tokenized with the model directory's tokenizer.model (SentencePiece, BOS prepended) when
there is one; otherwise pass --prompt_ids. Without --reward_model the samples print in sampled order.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax
import numpy as np

from bond_jax import hf, sampling, scoring, sharding
from bond_jax.models.config import ModelConfig


def load_model(path: str, mesh) -> tuple[Any, ModelConfig, dict[str, Any]]:
  """(params, cfg, special ids {'bos','eos','pad'}) from a model directory (today: Hugging Face format)."""
  params, cfg = hf.import_params(path, mesh)
  with open(os.path.join(path, "config.json")) as f:
    raw = json.load(f)
  ids = {name: raw.get(f"{name}_token_id") for name in ("bos", "eos", "pad")}
  return params, cfg, ids


def load_tokenizer(path: str):
  """The directory's SentencePiece tokenizer, or None when it has no tokenizer.model."""
  model_file = os.path.join(path, "tokenizer.model")
  if not os.path.exists(model_file):
    return None
  from bond_jax.data.tokenizer import load_tokenizer as load_sentencepiece
  return load_sentencepiece(model_file)


def prompt_ids(args, tokenizer, bos_id) -> list[int]:
  if args.prompt_ids:
    return [int(i) for i in args.prompt_ids.split(",")]
  if args.prompt is None:
    raise SystemExit("error: pass --prompt (with a tokenizer.model in --model) or --prompt_ids")
  if tokenizer is None:
    raise SystemExit(f"error: {args.model} has no tokenizer.model; pass --prompt_ids=1,2,3 instead")
  return tokenizer.encode(args.prompt, add_bos=bos_id is not None)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="policy directory (Hugging Face format)")
  parser.add_argument("--reward_model", help="reward model directory (Hugging Face format)")
  parser.add_argument("--prompt")
  parser.add_argument("--prompt_ids", help="comma-separated token ids, instead of --prompt")
  parser.add_argument("-n", "--num_samples", type=int, default=8)
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  params, cfg, ids = load_model(args.model, mesh)
  tokenizer = load_tokenizer(args.model)
  prompt = np.asarray([prompt_ids(args, tokenizer, ids["bos"])], np.int32)
  mask = np.ones_like(prompt, bool)
  eos = () if ids["eos"] is None else (ids["eos"],)
  pad = ids["pad"] if ids["pad"] is not None else 0
  out = jax.device_get(sampling.generate(
      cfg, params, prompt, mask, jax.random.key(args.seed), num_samples=args.num_samples,
      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
      eos_ids=eos, pad_id=pad))
  if args.reward_model:
    rm_params, rm_cfg, _ = load_model(args.reward_model, mesh)
    rewards = np.asarray(scoring.rewards(rm_cfg, rm_params, prompt, mask, out.tokens, out.mask))[0]
    order = np.argsort(-rewards, kind="stable")  # best first; ties keep the lower index first
  else:
    rewards, order = None, np.arange(args.num_samples)
  for rank, n in enumerate(order):
    response = out.tokens[0, n][out.mask[0, n]]
    text = tokenizer.decode(response) if tokenizer is not None else ",".join(map(str, response))
    score = "" if rewards is None else f"reward {rewards[n]:+.4f}  "
    print(f"#{rank + 1} sample {n}  {score}log pi {out.model_logprobs[0, n].sum():.2f}  "
          f"({int(out.lengths[0, n])} tokens): {text!r}")


if __name__ == "__main__":
  main()
