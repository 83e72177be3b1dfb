"""Hugging Face directories made in the tests (nothing downloaded): a Qwen-style tokenizer.json BPE trained
with the `tokenizers` library, a SentencePiece one, chat templates of three styles, a tiny random Qwen3
policy and a tiny random Llama reward model, and chat conversations from the chitchat dialogues."""

import json
import os
import random

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2Tokenizer's pre-tokenizer regex (transformers rebuilds a Qwen tokenizer with it).
QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama 3 style: bos_token, trimmed content, a system message pulled out first.
LLAMA3_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = 'Be brief.' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}"
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# Gemma style over plain-text markers: no system role (merged into the first user turn), alternation
# enforced with raise_exception, a namespace and tojson.
GEMMA_STYLE = (
    "{{ bos_token }}{% set ns = namespace(prefix='') %}{% if messages[0]['role'] == 'system' %}"
    "{% set ns.prefix = messages[0]['content'] | tojson %}{% set messages = messages[1:] %}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "TURN {{ role }} {% if loop.first and ns.prefix %}{{ ns.prefix }} {% endif %}"
    "{{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}TURN model {% endif %}")


def train_qwen_style(lines, vocab_size):
  """A byte-level BPE with Qwen's normalizer and pre-tokenizer and its three special tokens."""
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  ])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(lines, trainer)
  return tok


def qwen_tokenizer_dir(directory, lines, vocab_size=700, template=CHATML, eos="<|im_end|>"):
  """tokenizer.json + tokenizer_config.json as a Qwen instruct model ships them (eos <|im_end|>; a base
  model's is <|endoftext|>)."""
  os.makedirs(directory, exist_ok=True)
  train_qwen_style(lines, vocab_size).save(os.path.join(directory, "tokenizer.json"))
  config = {
      "tokenizer_class": "Qwen2Tokenizer",
      "bos_token": None,
      "eos_token": eos,
      "pad_token": "<|endoftext|>",
      "unk_token": None,
      "chat_template": template,
      "clean_up_tokenization_spaces": False,
      "model_max_length": 32768,
  }
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return str(directory)


def sentencepiece_tokenizer_dir(directory, lines, vocab_size=600, template=GEMMA_STYLE):
  """A SentencePiece BPE exported as a Gemma-style directory, with a chat template added."""
  from bond_jax.data.tokenizer import train_bpe_tokenizer
  train_bpe_tokenizer(lines, vocab_size).save_hf_tokenizer_files(directory)
  path = os.path.join(directory, "tokenizer_config.json")
  with open(path) as f:
    config = json.load(f)
  if template is not None:
    config["chat_template"] = template
  with open(path, "w") as f:
    json.dump(config, f, indent=2)
  return str(directory)


def conversations(dialogues, count, seed=0):
  """`count` chat conversations: some with a system turn, 1-3 user turns of history, ending on a user turn."""
  rng = random.Random(seed)
  out = []
  for c in dialogues:
    turns = [t for t in c.turns if t.strip()]
    if len(turns) < 2:
      continue
    n = 1 + 2 * rng.randrange(min(3, (len(turns) + 1) // 2))
    messages = [{
        "role": "user" if i % 2 == 0 else "assistant",
        "content": t
    } for i, t in enumerate(turns[:n])]
    if rng.random() < 0.5:
      messages.insert(0, {"role": "system", "content": f"Talk about {c.topic or 'anything'}."})
    out.append(messages)
    if len(out) == count:
      break
  return out


def save_tokenizer(tokenizer_dir, model_dir):
  import shutil
  for name in os.listdir(tokenizer_dir):
    shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(model_dir, name))


def qwen3_policy(directory, tokenizer_dir, vocab_size, seed=0):
  """A tiny random Qwen3ForCausalLM (q/k norms, head_dim != hidden / heads) with the tokenizer beside it."""
  import torch
  import transformers
  torch.manual_seed(seed)
  config = transformers.Qwen3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=24, max_position_embeddings=256, tie_word_embeddings=True,
                                    rope_theta=1e6, eos_token_id=2, pad_token_id=0, bos_token_id=None)
  transformers.Qwen3ForCausalLM(config).float().save_pretrained(directory)
  save_tokenizer(tokenizer_dir, directory)
  return str(directory)


def llama_reward_model(directory, tokenizer_dir, vocab_size, pad_id, seed=1):
  """A tiny random LlamaForSequenceClassification (one label) with its own tokenizer beside it."""
  import torch
  import transformers
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                    max_position_embeddings=512, num_labels=1, pad_token_id=pad_id,
                                    tie_word_embeddings=False)
  model = transformers.LlamaForSequenceClassification(config).float()
  with torch.no_grad():
    model.score.weight.normal_(0.0, 1.0)  # a zero-ish head would score every response alike
  model.save_pretrained(directory)
  save_tokenizer(tokenizer_dir, directory)
  return str(directory)
