"""SentencePiece tokenizer: load an existing model, train a small BPE one, export it for transformers.

Special ids of a model trained here (the Gemma layout, so a Gemma-style HF export reads them as-is):

    pad = 0 "<pad>",  eos = 1 "<eos>",  bos = 2 "<bos>",  unk = 3 "<unk>"

A loaded model (Gemma's, Llama's, ...) keeps its own ids; read them from the properties, never assume
the numbers above. Llama defines no pad piece: `pad_id` then falls back to `unk_id` (padded positions
are masked everywhere, so the value only has to be a valid embedding row).

Training settings and why (transformers 5.x rebuilds the tokenizer from `tokenizer.model` as a BPE
model; these settings make its ids equal SentencePiece's, which `tests/data/test_tokenizer.py` checks):
  model_type='bpe'                   transformers reads tokenizer.model as BPE; a unigram model differs.
  byte_fallback=True                 unseen characters become <0x..> byte pieces on both sides, never unk.
  normalization_rule_name='identity' transformers applies no NFKC; the text is tokenized as written.
  remove_extra_whitespaces=False     transformers keeps repeated and trailing spaces.
  add_dummy_prefix=False             no leading "▁" is invented, so encode(a) + encode(b) equals
                                     encode(a + b) at a space boundary (prompt + " response").
  split_digits=True                  numbers are spelled digit by digit (no vocab spent on numbers).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Sequence

import sentencepiece as spm

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
PAD_PIECE, EOS_PIECE, BOS_PIECE, UNK_PIECE = "<pad>", "<eos>", "<bos>", "<unk>"

# Number of pieces every trained model reserves before learned merges: 4 specials + 256 bytes.
_RESERVED_PIECES = 4 + 256


class Tokenizer:
  """A SentencePiece processor plus the model bytes (so it pickles into Grain worker processes)."""

  def __init__(self, model_proto: bytes):
    if not model_proto:
      raise ValueError("model_proto is empty; expected the bytes of a SentencePiece .model file")
    self._model_proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
    self.chat = None  # a tokenizer directory's chat template (data/hf_tokenizer.py sets it)
    self.files = {"tokenizer.model": self._model_proto}  # what a workdir and an export copy
    self._special_pieces: dict[str, int] | None = None

  def __getstate__(self) -> bytes:
    return self._model_proto

  def __setstate__(self, model_proto: bytes) -> None:
    self.__init__(model_proto)

  @property
  def model_proto(self) -> bytes:
    return self._model_proto

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    """The model's pad id, or `unk_id` when it defines none (Llama)."""
    pad = self._sp.pad_id()
    return pad if pad >= 0 else self.unk_id

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(token_id)

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text` (no special ids unless asked)."""
    return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                   add_eos: bool = False) -> list[list[int]]:
    """Ragged token ids, one list per text; padding is the pipeline's job (see pipeline.pad_batch)."""
    return self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos)

  def encode_plain_prompt(self, text: str) -> list[int]:
    """[bos] + ids, as transformers' tokenizer(text) gives them for a model exported here or Gemma's."""
    return self.encode(text, add_bos=self.bos_id >= 0)

  def is_special(self, token_id: int) -> bool:
    """A control, unknown or user-defined piece (transformers makes them added tokens)."""
    if self._special_pieces is None:
      from sentencepiece import sentencepiece_model_pb2  # the piece types (the processor lacks USER_DEFINED)
      proto = sentencepiece_model_pb2.ModelProto.FromString(self._model_proto)
      kinds = {proto.SentencePiece.CONTROL, proto.SentencePiece.UNKNOWN, proto.SentencePiece.USER_DEFINED}
      self._special_pieces = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in kinds and p.piece}
    return self.id_to_piece(token_id) in self._special_pieces

  def encode_rendered(self, text: str) -> list[int]:
    """Ids of rendered chat text: special pieces written in it ("<bos>", "<start_of_turn>") are matched
    first and the text between them is encoded, as transformers does with added tokens."""
    self.is_special(0)  # reads the special pieces once
    if not self._special_pieces:
      return self.encode(text)
    pattern = "(" + "|".join(re.escape(p) for p in sorted(self._special_pieces, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for part in re.split(pattern, text):
      if part in self._special_pieces:
        ids.append(self._special_pieces[part])
      elif part:
        ids.extend(self.encode(part))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad/bos/eos ids are dropped (SentencePiece renders control pieces as '')."""
    return self._sp.decode([int(i) for i in ids])

  def save(self, path: str | os.PathLike) -> None:
    """Writes the SentencePiece .model file."""
    with open(path, "wb") as f:
      f.write(self._model_proto)

  def save_hf_tokenizer_files(self, out_dir: str | os.PathLike) -> None:
    """Writes tokenizer.model, tokenizer_config.json and special_tokens_map.json into `out_dir`.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` then builds a GemmaTokenizer from
    tokenizer.model: byte-fallback BPE, spaces as "▁", no prefix space, which is exactly a model
    trained by `train_bpe_tokenizer`. It adds bos (not eos) like `encode(..., add_bos=True)`.
    """
    os.makedirs(out_dir, exist_ok=True)
    self.save(os.path.join(out_dir, "tokenizer.model"))
    special = {
        "bos_token": self.id_to_piece(self.bos_id),
        "eos_token": self.id_to_piece(self.eos_id),
        "unk_token": self.id_to_piece(self.unk_id),
        "pad_token": self.id_to_piece(self.pad_id),
    }
    config = {
        "tokenizer_class":
            "GemmaTokenizer",
        **special,
        # GemmaTokenizer defaults to a "<mask>" token that our vocabulary lacks; None keeps
        # len(tokenizer) equal to vocab_size.
        "mask_token":
            None,
        "add_bos_token":
            True,
        "add_eos_token":
            False,
        "padding_side":
            "left",
        "clean_up_tokenization_spaces":
            False,
        "model_max_length":
            1_000_000_000,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
      json.dump(special, f, indent=2)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Loads any SentencePiece .model file (ours, Gemma's, Llama's)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"SentencePiece model {path!s} does not exist")
  with open(path, "rb") as f:
    return Tokenizer(f.read())


def train_bpe_tokenizer(
    lines: Iterable[str],
    vocab_size: int,
    *,
    character_coverage: float = 0.9995,
    max_sentence_length: int = 8192,
    num_threads: int = 2,
) -> Tokenizer:
  """Trains a byte-fallback BPE SentencePiece model in memory (settings: see the module docstring).

  `lines` are training sentences; a line containing a newline is split there because SentencePiece
  trains on single lines. Characters below `character_coverage` become byte pieces.
  """
  if vocab_size <= _RESERVED_PIECES:
    raise ValueError(f"vocab_size={vocab_size} must exceed {_RESERVED_PIECES} (4 special + 256 byte pieces)")
  sentences = [part for line in lines for part in line.split("\n") if part.strip()]
  if not sentences:
    raise ValueError("no non-empty training lines; expected at least one line of text")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      model_type="bpe",
      vocab_size=vocab_size,
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      split_digits=True,
      character_coverage=character_coverage,
      max_sentence_length=max_sentence_length,
      pad_id=PAD_ID,
      eos_id=EOS_ID,
      bos_id=BOS_ID,
      unk_id=UNK_ID,
      pad_piece=PAD_PIECE,
      eos_piece=EOS_PIECE,
      bos_piece=BOS_PIECE,
      unk_piece=UNK_PIECE,
      num_threads=num_threads,
      # A small corpus may not support the full vocabulary; fail loudly instead of shrinking it.
      hard_vocab_limit=True,
      minloglevel=2,
  )
  return Tokenizer(model.getvalue())
