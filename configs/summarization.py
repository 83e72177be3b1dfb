"""J-BOND on XSum-style summarization, from a pretrained policy and reward model (Hugging Face dirs).

There are no SFT / reward stages for this task here: give both models, and a TFDS dataset with XSum's
features prepared in data.data_dir (see bond_jax/data/summarization.py on preparing XSum once):

  python -m bond_jax.train --config=configs/summarization.py:gemma_2b --workdir=gs://bucket/xsum \\
      --config.reference=/ckpt/gemma-2b-sft-xsum --config.reward_model=/ckpt/gemma-2b-rm-xsum \\
      --config.data.tokenizer=/ckpt/gemma-2b-sft-xsum/tokenizer.model --config.data.data_dir=~/tensorflow_datasets

Presets: tiny (CPU, for a local XSum-format JSON-lines dataset), gemma_2b, gemma_7b.
"""

import ml_collections

from configs import dialogue


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = dialogue.get_config("tiny" if preset == "tiny" else preset)
  c.data = ml_collections.ConfigDict(
      dict(
          task="summarization",
          dataset="xsum:1.1.0",  # a TFDS name[:version] prepared in data_dir (array_record)
          data_dir="~/tensorflow_datasets",
          tokenizer="",  # the policy's tokenizer.model (required: none is trained for this task)
          vocab_size=0,  # unused: the tokenizer comes with the models
          max_document_chars=4000,  # documents are cut before tokenizing
          prompt_buckets=(256, 512, 1024),
          context_turns=0,
          response_turns=1,
          max_conversations=0,
      ))
  c.sampling.max_new_tokens = 64  # XSum summaries are one sentence
  c.eval.update(policy_samples=4, quantile_samples=32)  # 64 distinct documents: fewer samples of each
  c.bond.eta = 0.02
  if preset == "tiny":
    c.data.prompt_buckets = (128, 256)
    c.sampling.max_new_tokens = 32
  return c
