"""Hugging Face tokenizer directories and chat templates: ids and rendered text equal transformers'."""

import pickle

import jinja2
import pytest
import transformers

import hf_dirs
from bond_jax.data import hf_tokenizer, prompts
from configs import hf as hf_config

TRAIN_CONVERSATIONS = 600  # as tests/data/conftest.py: later conversations are held out


@pytest.fixture(scope="module")
def train_lines(conversations):
  return [t for c in conversations[:TRAIN_CONVERSATIONS] for t in (c.topic, *c.turns) if t]


@pytest.fixture(scope="module")
def qwen_dir(train_lines, tmp_path_factory):
  return hf_dirs.qwen_tokenizer_dir(tmp_path_factory.mktemp("qwen_tok"), train_lines, vocab_size=1200)


@pytest.fixture(scope="module")
def sentencepiece_dir(train_lines, tmp_path_factory):
  return hf_dirs.sentencepiece_tokenizer_dir(tmp_path_factory.mktemp("sp_tok"), train_lines, vocab_size=1000)


@pytest.fixture(scope="module")
def chats(conversations):
  return hf_dirs.conversations(conversations[TRAIN_CONVERSATIONS:], 100)


TRICKY = ["  two  spaces, tabs\tand\nnewlines\n\n", "émojis 😀 and ünïcödé ∑", "<|im_end|> inside text", ""]


@pytest.mark.parametrize("kind", ["tokenizer.json", "sentencepiece"])
def test_ids_equal_transformers_on_3000_held_out_lines(kind, qwen_dir, sentencepiece_dir, held_out_lines):
  directory = qwen_dir if kind == "tokenizer.json" else sentencepiece_dir
  ours, theirs = hf_tokenizer.load(directory), transformers.AutoTokenizer.from_pretrained(directory)
  assert isinstance(ours, hf_tokenizer.HFTokenizer) == (kind == "tokenizer.json")
  texts = held_out_lines + TRICKY
  assert len(held_out_lines) == 3000
  same = sum(ours.encode(t) == theirs.encode(t, add_special_tokens=False) for t in texts)
  plain = sum(ours.encode_plain_prompt(t) == theirs(t)["input_ids"] for t in texts)
  assert same / len(texts) >= 0.999 and plain / len(texts) >= 0.999, (same, plain, len(texts))
  assert (ours.eos_id, ours.bos_id, ours.pad_id) == (theirs.eos_token_id, theirs.bos_token_id,
                                                     theirs.pad_token_id)
  assert ours.vocab_size == len(theirs)
  ids = ours.encode(held_out_lines[0])
  assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
  assert pickle.loads(pickle.dumps(ours)).encode(TRICKY[1]) == ours.encode(TRICKY[1])


@pytest.mark.parametrize("template", ["chatml", "llama3", "gemma"])
def test_chat_templates_render_as_apply_chat_template_on_100_conversations(template, qwen_dir,
                                                                           sentencepiece_dir, chats,
                                                                           tmp_path):
  """System turns and multi-turn history, the prompt side (add_generation_prompt) and whole conversations:
  the same text and the same ids."""
  if template == "gemma":
    directory = sentencepiece_dir
  else:
    source = {"chatml": hf_dirs.CHATML, "llama3": hf_dirs.LLAMA3_STYLE}[template]
    directory = hf_dirs.qwen_tokenizer_dir(tmp_path / template, [m["content"] for c in chats for m in c], 600,
                                           template=source)
  ours, theirs = hf_tokenizer.load(directory), transformers.AutoTokenizer.from_pretrained(directory)
  assert len(chats) == 100 and sum(c[0]["role"] == "system" for c in chats) >= 30
  assert sum(len(c) >= 3 for c in chats) >= 30
  for messages in chats:
    for generation in (True, False):
      text = ours.chat.render(messages, add_generation_prompt=generation)
      assert text == theirs.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
      assert ours.encode_rendered(text) == theirs.apply_chat_template(messages,
                                                                      add_generation_prompt=generation,
                                                                      tokenize=True, return_dict=False)


def test_end_of_turn_token_ends_a_response_and_errors(qwen_dir, sentencepiece_dir, tmp_path):
  """A base model's eos is <|endoftext|>; with chat prompts the template's <|im_end|> also ends a response."""
  import json
  import shutil
  qwen = hf_tokenizer.load(qwen_dir)
  assert qwen.id_to_piece(qwen.chat.end_of_turn_id(qwen)) == "<|im_end|>"
  base = shutil.copytree(qwen_dir, tmp_path / "base")
  config = json.loads((base / "tokenizer_config.json").read_text())
  (base / "tokenizer_config.json").write_text(json.dumps(dict(config, eos_token="<|endoftext|>")))
  base_tok, run = hf_tokenizer.load(base), hf_config.get_config()
  ids = lambda *pieces: tuple(base_tok.piece_to_id(p) for p in pieces)
  assert prompts.eos_ids(run, base_tok) == ids("<|endoftext|>", "<|im_end|>")
  run.data.chat_template = False
  assert prompts.eos_ids(run, base_tok) == ids("<|endoftext|>")
  sp = hf_tokenizer.load(sentencepiece_dir)
  assert sp.chat.end_of_turn_id(sp) == sp.eos_id  # GEMMA_STYLE closes a turn with eos_token
  with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
    sp.chat.render([{"role": "assistant", "content": "hi"}])
  with pytest.raises(ValueError, match="has no tokenizer.json or tokenizer.model"):
    hf_tokenizer.load(tmp_path)
  with pytest.raises(ValueError, match="does not exist"):
    hf_tokenizer.load(tmp_path / "missing")
