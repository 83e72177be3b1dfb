"""Hugging Face tokenizer directories beside SentencePiece: tokenizer.json (Llama 3, Qwen, Mistral) or
tokenizer.model (Gemma), with tokenizer_config.json's special tokens and chat template.

    load(path) -> Tokenizer | HFTokenizer
      a file               a SentencePiece .model (data/tokenizer.py)
      a directory with     tokenizer.json: HFTokenizer (the `tokenizers` library reads it as transformers'
                           fast tokenizers do), else tokenizer.model: the SentencePiece Tokenizer
Both kinds answer the same calls (vocab_size, pad_id, eos_id, bos_id, encode, decode, ...) and carry
`chat` (data/chat.py: the directory's chat template, or None) and `files` (the bytes of the files to copy
into a workdir and an export, so a trained policy is exported with the tokenizer it was trained with).

Ids equal transformers' AutoTokenizer (tests/data/test_hf_tokenizer.py: >= 99.9% of 3,000 held-out lines):
- `encode(text)` is `tokenizer(text, add_special_tokens=False)`: added tokens (e.g. "<|im_end|>") are
  matched first, the text between them goes through the normalizer, pre-tokenizer and model;
- `encode_plain_prompt(text)` is `tokenizer(text)`: the special ids transformers adds. Where
  tokenizer_config.json sets add_bos_token / add_eos_token, or tokenizer.json has no post-processor,
  transformers rebuilds the post-processor as [bos] $A [eos] by those flags; otherwise tokenizer.json's own
  post-processor adds them.
A class transformers rebuilds from the vocabulary (Qwen2Tokenizer, LlamaTokenizer, ...) uses the pipeline
its tokenizer.json ships with; that is how those models' own directories are written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers

from bond_jax.data import chat as chat_lib
from bond_jax.data.tokenizer import Tokenizer, load_tokenizer

# Files of a tokenizer directory that travel with it (what exists of them is copied).
FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
         "chat_template.jinja", "chat_template.json")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict {'content'}."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def special_tokens(directory: str) -> dict[str, str]:
  """{'bos_token': '<s>', ...} of tokenizer_config.json, special_tokens_map.json filling what it lacks."""
  config = _read_json(os.path.join(directory, "tokenizer_config.json"))
  legacy = _read_json(os.path.join(directory, "special_tokens_map.json"))
  out = {}
  for name in SPECIAL_NAMES:
    text = _token_text(config[name]) if name in config else _token_text(legacy.get(name))
    if text is not None:
      out[name] = text
  return out


def read_files(directory: str) -> dict[str, bytes]:
  """{file name: bytes} of the tokenizer files present in `directory`."""
  out = {}
  for name in FILES:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[name] = f.read()
  return out


def has_tokenizer(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, n)) for n in ("tokenizer.json", "tokenizer.model"))


class HFTokenizer:
  """A tokenizer.json tokenizer with its directory's special tokens and chat template (picklable: it
  travels into Grain workers as its files' bytes)."""

  def __init__(self, files: dict[str, bytes]):
    if "tokenizer.json" not in files:
      raise ValueError("a Hugging Face tokenizer needs tokenizer.json")
    self._files = dict(files)
    self._tok = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    config = json.loads(files.get("tokenizer_config.json", b"{}"))
    legacy = json.loads(files.get("special_tokens_map.json", b"{}"))
    self.special = {
        n: t for n in SPECIAL_NAMES
        if (t := _token_text(config[n]) if n in config else _token_text(legacy.get(n))) is not None
    }
    self._add_bos = bool(config.get("add_bos_token", False))
    self._add_eos = bool(config.get("add_eos_token", False))
    # transformers rebuilds the post-processor from the flags when either is set or there is none
    self._own_specials = ("add_bos_token" in config or "add_eos_token" in config or
                          self._tok.post_processor is None)
    self.chat = chat_lib.ChatTemplate.from_files(files, self.special)

  def __getstate__(self) -> dict[str, bytes]:
    return self._files

  def __setstate__(self, files: dict[str, bytes]) -> None:
    self.__init__(files)

  @property
  def files(self) -> dict[str, bytes]:
    return dict(self._files)

  def _id(self, name: str) -> int | None:
    text = self.special.get(name)
    return None if text is None else self._tok.token_to_id(text)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int | None:
    return self._id("bos_token")

  @property
  def eos_id(self) -> int | None:
    return self._id("eos_token")

  @property
  def unk_id(self) -> int | None:
    return self._id("unk_token")

  @property
  def pad_id(self) -> int:
    """The pad token's id, else eos's, else 0 (padded positions are masked: any valid row will do)."""
    for name in ("pad_token", "eos_token"):
      if (found := self._id(name)) is not None:
        return found
    return 0

  def id_to_piece(self, token_id: int) -> str:
    return self._tok.id_to_token(int(token_id))

  def piece_to_id(self, piece: str) -> int | None:
    return self._tok.token_to_id(piece)

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Ids of `text` as `tokenizer(text, add_special_tokens=False)`, with bos / eos when asked (and defined)."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    bos = [self.bos_id] if add_bos and self.bos_id is not None else []
    return bos + ids + ([self.eos_id] if add_eos and self.eos_id is not None else [])

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                   add_eos: bool = False) -> list[list[int]]:
    return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

  def encode_rendered(self, text: str) -> list[int]:
    """Ids of rendered chat text, as apply_chat_template(tokenize=True): added tokens matched first."""
    return self.encode(text)

  def is_special(self, token_id: int) -> bool:
    added = self._tok.get_added_tokens_decoder().get(int(token_id))
    return added is not None and added.special

  def encode_plain_prompt(self, text: str) -> list[int]:
    """Ids of `text` as `tokenizer(text)` gives them: with the special ids transformers adds."""
    if self._own_specials:
      return self.encode(text, add_bos=self._add_bos, add_eos=self._add_eos)
    return self._tok.encode(text, add_special_tokens=True).ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` with special tokens dropped (`tokenizer.decode(ids, skip_special_tokens=True)`)."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _sentencepiece_dir(directory: str) -> Tokenizer:
  """The SentencePiece Tokenizer of a directory's tokenizer.model, with its chat template and files."""
  tok = load_tokenizer(os.path.join(directory, "tokenizer.model"))
  tok.files = read_files(directory)
  tok.chat = chat_lib.ChatTemplate.from_files(tok.files, special_tokens(directory))
  return tok


def load(path: str | os.PathLike) -> Tokenizer | HFTokenizer:
  """The tokenizer of `path`: a SentencePiece .model file, or a directory with tokenizer.json or
  tokenizer.model (ValueError naming the path otherwise)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    tok = load_tokenizer(path)
    with open(path, "rb") as f:
      tok.files = {"tokenizer.model": f.read()}
    tok.chat = None
    return tok
  if not os.path.isdir(path):
    raise ValueError(f"{path!r} does not exist; expected a tokenizer directory or a SentencePiece .model")
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    return HFTokenizer(read_files(path))
  if os.path.isfile(os.path.join(path, "tokenizer.model")):
    return _sentencepiece_dir(path)
  raise ValueError(f"{path!r} has no tokenizer.json or tokenizer.model")
