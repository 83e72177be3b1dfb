"""What a reward model must beat on the same held-out preference pairs: two baselines that read no model.

    length:        the response with more tokens is preferred (a tie counts 1/2);
    bag-of-words:  Bradley-Terry on word-presence features, P(chosen > rejected) = sigmoid(w . (x_c - x_r)),
                   x in {0, 1}^V over the V most frequent lowercase words of the TRAINING pairs' responses,
                   fitted by L-BFGS on the training pairs with an L2 penalty, then applied unchanged.
Both return per-pair wins [N] in {0, 1/2, 1}, so their accuracy gets the same Wilson interval as the
model's. A reward model that does not beat them has learned length or word choice, not preference.

The bag-of-words model is also a reward in its own right (`reward_training.model='bag_of_words'`): its
score of a response is w . x(text), the Bradley-Terry utility it was fitted with, where the text is
`formats.conversation_text(prompt, response)` both in the fit and in scoring: the conversation's turns
after the topic line, so that a distillation prompt's opening turns count as they did in the pairs.
`save` / `load` keep it as JSON (words and float64 weights, exact: JSON writes floats by repr), and
`digest` names its contents.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.optimize

from bond_jax import workdir
from bond_jax.data import formats
from bond_jax.data.tokenizer import Tokenizer

_WORD = re.compile(r"[a-z0-9']+")
VOCABULARY = 2000  # V: words beyond the 2,000 most frequent occur in < 0.1% of responses
L2 = 1e-2  # penalty on mean loss; a fixed value, never tuned on held-out pairs
# What a model's text is made of, in its digest: pools of rewards scored by an earlier rule (the response
# alone, before 2026-12-02) are then not read back as this rule's.
TEXT_RULE = "formats.conversation_text"


def wins(margins: np.ndarray) -> np.ndarray:
  """[N] 1 where chosen scores higher, 1/2 on a tie, 0 otherwise."""
  return np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0))


def length_wins(records: Sequence[dict], tokenizer: Tokenizer) -> np.ndarray:
  """[N] wins of "the response with more tokens is preferred"."""
  chosen = np.array([len(ids) for ids in tokenizer.encode_batch([r["chosen"] for r in records])])
  rejected = np.array([len(ids) for ids in tokenizer.encode_batch([r["rejected"] for r in records])])
  return wins((chosen - rejected).astype(np.float64))


def _words(text: str) -> set[str]:
  return set(_WORD.findall(text.lower()))


def _text(prompt: Any, response: str) -> str:
  """What the model reads of a (prompt, response): see the module docstring. A prompt that is not text (a
  chat messages list) adds nothing."""
  return formats.conversation_text(prompt if isinstance(prompt, str) else "", response)


def _pair_texts(records: Sequence[dict], key: str) -> list[str]:
  """The texts of the records' `key` side ('chosen' or 'rejected'), read with their prompts."""
  return [_text(r.get("prompt", ""), r[key]) for r in records]


class BagOfWords:
  """The bag-of-words Bradley-Terry baseline, fitted on training pairs ({'prompt', 'chosen', 'rejected'}
  texts; a pair without a prompt is read as its responses alone)."""

  def __init__(self, train: Sequence[dict], vocabulary: int = VOCABULARY, l2: float = L2):
    if not train:
      raise ValueError("the bag-of-words baseline needs at least one training pair")
    sides = zip(_pair_texts(train, "chosen"), _pair_texts(train, "rejected"))  # in the pairs' order
    counts = collections.Counter(w for pair in sides for text in pair for w in _words(text))
    # the most frequent words, ties by the word itself: most_common alone breaks ties in the order words
    # were first seen, which follows set iteration and so the process's string hash seed
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:vocabulary]
    self.index = {w: i for i, (w, _) in enumerate(ranked)}
    diff = self._features(train)

    def loss_and_grad(w):
      margin = diff @ w
      loss = np.mean(np.logaddexp(0.0, -margin)) + 0.5 * l2 * w @ w
      grad = -(diff.T @ (1.0 / (1.0 + np.exp(margin)))) / len(margin) + l2 * w
      return loss, grad

    fit = scipy.optimize.minimize(loss_and_grad, np.zeros(len(self.index)), jac=True, method="L-BFGS-B",
                                  options={"maxiter": 500})
    self.weights = fit.x

  @classmethod
  def load(cls, path: str) -> "BagOfWords":
    """The model `save` wrote to path (ValueError naming the path when it is not such a file)."""
    try:
      with open(path) as f:
        data = json.load(f)
      words, weights = list(data["words"]), np.asarray(data["weights"], np.float64)
    except (OSError, ValueError, KeyError, TypeError) as error:
      raise ValueError(f"{path} is not a bag-of-words reward model: {error}") from None
    if weights.shape != (len(words),):
      raise ValueError(f"{path} is not a bag-of-words reward model: {len(words)} words, {weights.shape} "
                       "weights")
    model = cls.__new__(cls)
    model.index, model.weights = {w: i for i, w in enumerate(words)}, weights
    return model

  def save(self, path: str, **extra) -> None:
    """Write the words and weights (and `extra` JSON fields, e.g. metrics) to path, atomically."""
    words = sorted(self.index, key=self.index.get)
    workdir.write_atomically(path,
                             json.dumps(dict(words=words, weights=self.weights.tolist(), **extra)).encode())

  def digest(self) -> str:
    """sha256 of the text rule, the words and the weights (what a pool of rewards scored by this model
    depends on)."""
    words = sorted(self.index, key=self.index.get)
    return hashlib.sha256(json.dumps([TEXT_RULE, words, self.weights.tolist()]).encode()).hexdigest()

  def scores(self, prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
    """[N] float64 utilities w . x(text) of the N (prompt, response) pairs' texts (`_text`)."""
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses; need one each")
    return self._presence([_text(p, r) for p, r in zip(prompts, responses)]) @ self.weights

  def _presence(self, texts: Sequence[str]) -> np.ndarray:
    """[N, V] word-presence features x(text) in {0, 1}."""
    out = np.zeros((len(texts), len(self.index)))
    for row, text in enumerate(texts):
      for word in _words(text):
        if word in self.index:
          out[row, self.index[word]] = 1.0
    return out

  def _features(self, records: Sequence[dict]) -> np.ndarray:
    """[N, V] x_chosen - x_rejected."""
    return self._presence(_pair_texts(records, "chosen")) - self._presence(_pair_texts(records, "rejected"))

  def wins(self, records: Sequence[dict]) -> np.ndarray:
    """[N] wins of the fitted model on `records`."""
    return wins(self._features(records) @ self.weights)
