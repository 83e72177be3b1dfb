"""What a reward model with its own tokenizer costs: the text route (rewards.TextRewards) vs scoring on device.

    python -m bench.reward_routes [--preset=tiny] [--batch=16] [--samples=3] [--new_tokens=48]

The policy has a byte-level BPE tokenizer.json with a ChatML template; the reward model (random weights of
--preset) has a SentencePiece tokenizer with another vocabulary and its own template. B chat prompts from
the chitchat dialogues, N responses each (real dialogue turns, up to --new_tokens policy tokens). Timed,
best of --repeats after a warm-up (compilation excluded):
  device   scoring.rewards of a reward model that shares the policy's tokenizer (route 1);
  text     rewards.TextRewards + ModelTexts (route 2): all-gather, decode, render, re-encode, score;
  host     of which the host work alone: decode + render + re-encode (no scoring).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bench.sampling import _best_time
from bond_jax import rewards, scoring, sharding
from bond_jax.data import chitchat, hf_tokenizer
from bond_jax.data.tokenizer import train_bpe_tokenizer
from bond_jax.models import params as params_lib, presets

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
RM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}{{ eos_token }}"
    "{% endfor %}")


def tokenizers_for(lines, directory):
  """(policy tokenizer.json BPE with ChatML, reward model SentencePiece with its template) directories."""
  policy_dir, rm_dir = os.path.join(directory, "policy"), os.path.join(directory, "rm")
  os.makedirs(policy_dir)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  tok.train_from_iterator(
      lines,
      trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|im_start|>", "<|im_end|>"],
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.save(os.path.join(policy_dir, "tokenizer.json"))
  with open(os.path.join(policy_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "chat_template": CHATML}, f)
  train_bpe_tokenizer(lines, 1024).save_hf_tokenizer_files(rm_dir)
  path = os.path.join(rm_dir, "tokenizer_config.json")
  with open(path) as f:
    config = json.load(f)
  with open(path, "w") as f:
    json.dump(dict(config, chat_template=RM_TEMPLATE), f)
  return hf_tokenizer.load(policy_dir), hf_tokenizer.load(rm_dir)


def batch_of(policy, conversations, batch, samples, new_tokens):
  """Prompt records, prompts [B, P] left-padded, responses [B, N, T] right-padded (real turns)."""
  conversations = [c for c in conversations if len(c.turns) > samples][:batch]
  chats = [[{"role": "user", "content": c.turns[0]}] for c in conversations]
  records = [{
      "prompt": m,
      "tokens": np.asarray(policy.encode_rendered(policy.chat.render(m)))
  } for m in chats]
  width = max(len(r["tokens"]) for r in records)
  prompts, prompt_mask = np.zeros((batch, width), np.int32), np.zeros((batch, width), bool)
  responses, response_mask = np.zeros((batch, samples, new_tokens), np.int32), np.zeros(
      (batch, samples, new_tokens), bool)
  for b, (record, c) in enumerate(zip(records, conversations)):
    prompts[b,
            width - len(record["tokens"]):], prompt_mask[b,
                                                         width - len(record["tokens"]):] = record["tokens"], 1
    for n in range(samples):
      ids = (policy.encode(c.turns[1 + n]) + [policy.eos_id])[:new_tokens]
      responses[b, n, :len(ids)], response_mask[b, n, :len(ids)] = ids, True
  return records, (prompts, prompt_mask, responses, response_mask)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--samples", type=int, default=3)
  parser.add_argument("--new_tokens", type=int, default=48)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--conversations", type=int, default=1500,
                      help="dialogues read (2/3 train the tokenizers)")
  args = parser.parse_args()
  conversations, _ = chitchat.load_conversations(max_conversations=args.conversations)
  split = 2 * args.conversations // 3
  lines = [t for c in conversations[:split] for t in c.turns]
  mesh = sharding.make_mesh({"fsdp": -1})
  with tempfile.TemporaryDirectory() as tmp:
    policy, own = tokenizers_for(lines, tmp)
  records, arrays = batch_of(policy, conversations[split:], args.batch, args.samples, args.new_tokens)
  placed = sharding.global_batch(arrays, mesh)
  shared_cfg = presets.get(args.preset, vocab_size=policy.vocab_size)
  own_cfg = presets.get(args.preset, vocab_size=own.vocab_size)
  shared_rm = params_lib.init_sharded(shared_cfg, "reward", jax.random.key(0), mesh)
  own_rm = params_lib.init_sharded(own_cfg, "reward", jax.random.key(0), mesh)
  text = rewards.TextRewards(rewards.ModelTexts(own_cfg, own_rm, own, mesh), policy,
                             rewards.prompt_lookup(records), (policy.eos_id,), mesh, "reward_model")
  with jax.set_mesh(mesh):
    t_device = _best_time(lambda: jax.block_until_ready(scoring.rewards(shared_cfg, shared_rm, *placed)),
                          args.repeats)
    t_text = _best_time(lambda: jax.block_until_ready(text(*placed)), args.repeats)

    def host_only():
      values, texts = text.texts(*placed)
      [text.scorer.ids(v, t) for v, t in zip(values, texts)]

    t_host = _best_time(host_only, args.repeats)
  rows = args.batch * args.samples
  print(
      f"{args.preset}: B={args.batch} x N={args.samples} = {rows} responses of <= {args.new_tokens} tokens, "
      f"prompts of {arrays[0].shape[1]} tokens; {jax.device_count()} device(s)\n")
  print("| route | ms per call | per response |")
  print("|---|---|---|")
  for name, t in (("device (shared tokenizer)", t_device), ("text (own tokenizer)", t_text),
                  ("  of which host: decode + render + re-encode", t_host)):
    print(f"| {name} | {t * 1e3:.1f} | {t * 1e6 / rows:.0f} us |")


if __name__ == "__main__":
  main()
