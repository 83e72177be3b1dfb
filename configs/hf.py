"""J-BOND on your own models and prompts: a Hugging Face policy, a reward model of any supported family with
its own tokenizer (or a Python reward function), and a prompt file.

  python -m bond_jax.train --config=configs/hf.py --workdir=runs/mine \\
      --config.reference=/models/Qwen3-0.6B --config.reward_model=/models/my-llama-rm \\
      --config.data.prompts=prompts.jsonl

reference: the policy pi_ref (config.json + *.safetensors of llama, gemma, qwen2, qwen3, mistral, gemma2 or
  gemma3_text); its tokenizer (tokenizer.json or tokenizer.model, tokenizer_config.json with the chat
  template) is the run's unless data.tokenizer names another.
reward_model: a *ForSequenceClassification with one label. With a tokenizer of its own (another family,
  another vocabulary) the policy's responses are decoded and re-encoded for it with its chat template.
reward_fn: instead, 'package.module:function': fn(prompts, responses) -> one float per response. It runs
  YOUR code in the training process (and once on two probe responses while the config is checked).
data.prompts: JSONL / Parquet file(s), or a `datasets` directory (Dataset.save_to_disk); data.prompt_field
  holds a plain prompt or a chat messages list. Held out for evaluation: data.held_out (another source) or
  data.held_out_fraction of the records.

Presets: cpu (the default: small batches, short responses), 1b and 8b (accelerators; the mesh shards
parameters FSDP-style over every device; 8b also splits heads over tensor=2).
"""

import ml_collections

from configs import dialogue


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  c = dialogue.get_config("tiny")
  c.reference = ""  # required: a Hugging Face directory (or an earlier workdir) of pi_ref
  c.reward_model = ""  # a Hugging Face reward model directory, or
  c.reward_fn = ""  # 'package.module:function' (runs your code)
  c.data = ml_collections.ConfigDict(
      dict(
          task="prompts",
          prompts="",  # required: *.jsonl, *.parquet, a directory of them, or a save_to_disk directory
          prompt_field="messages",  # a chat messages list or a plain prompt string
          chat_template=
          True,  # render prompts with the tokenizer's chat template (a plain prompt = one user turn)
          held_out="",  # held-out prompts for evaluation, or
          held_out_fraction=0.05,  # this fraction of data.prompts (a permutation seeded with `seed`)
          tokenizer="",  # '' = the reference directory's
          prompt_buckets=(64, 128, 256),  # a longer prompt is skipped (and counted)
          vocab_size=0,  # unused: the tokenizer comes with the models
          context_turns=0,
          response_turns=1,
          max_conversations=0,
      ))
  c.sampling.max_new_tokens = 128
  c.train.update(steps=200, batch_size=8, log_every=5, eval_every=50, checkpoint_every=50)
  c.optimizer.learning_rate = 1e-5
  c.eval.update(num_prompts=16, best_of=(1, 2, 4, 8), quantile_samples=16, policy_samples=4)
  if preset in ("1b", "8b"):
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=2 if preset == "8b" else 1))
    c.data.prompt_buckets = (128, 256, 512)
    c.sampling.max_new_tokens = 256
    c.train.update(steps=2000, batch_size=64 if preset == "1b" else 128, checkpoint_every=200, eval_every=200)
    c.optimizer.update(learning_rate=3e-6, warmup_steps=50)
    c.eval.update(num_prompts=64, best_of=(1, 2, 4, 8, 16), quantile_samples=64, policy_samples=8)
    c.bond.eta = 0.02
  elif preset != "cpu":
    raise ValueError(f"unknown preset {preset!r} for configs/hf.py; allowed: cpu, 1b, 8b")
  return c
