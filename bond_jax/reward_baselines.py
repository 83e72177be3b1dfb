"""What a reward model must beat on the same held-out preference pairs: two baselines that read no model.

    length:        the response with more tokens is preferred (a tie counts 1/2);
    bag-of-words:  Bradley-Terry on word-presence features, P(chosen > rejected) = sigmoid(w . (x_c - x_r)),
                   x in {0, 1}^V over the V most frequent lowercase words of the TRAINING pairs' responses,
                   fitted by L-BFGS on the training pairs with an L2 penalty, then applied unchanged.
Both return per-pair wins [N] in {0, 1/2, 1}, so their accuracy gets the same Wilson interval as the
model's. A reward model that does not beat them has learned length or word choice, not preference.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence

import numpy as np
import scipy.optimize

from bond_jax.data.tokenizer import Tokenizer

_WORD = re.compile(r"[a-z0-9']+")
VOCABULARY = 2000  # V: words beyond the 2,000 most frequent occur in < 0.1% of responses
L2 = 1e-2  # penalty on mean loss; a fixed value, never tuned on held-out pairs


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


class BagOfWords:
  """The bag-of-words Bradley-Terry baseline, fitted on training pairs ({'chosen', 'rejected'} texts)."""

  def __init__(self, train: Sequence[dict], vocabulary: int = VOCABULARY, l2: float = L2):
    if not train:
      raise ValueError("the bag-of-words baseline needs at least one training pair")
    counts = collections.Counter(w for r in train for k in ("chosen", "rejected") for w in _words(r[k]))
    self.index = {w: i for i, (w, _) in enumerate(counts.most_common(vocabulary))}
    diff = self._features(train)

    def loss_and_grad(w):
      margin = diff @ w
      loss = np.mean(np.logaddexp(0.0, -margin)) + 0.5 * l2 * w @ w
      grad = -(diff.T @ (1.0 / (1.0 + np.exp(margin)))) / len(margin) + l2 * w
      return loss, grad

    fit = scipy.optimize.minimize(loss_and_grad, np.zeros(len(self.index)), jac=True, method="L-BFGS-B",
                                  options={"maxiter": 500})
    self.weights = fit.x

  def _features(self, records: Sequence[dict]) -> np.ndarray:
    """[N, V] x_chosen - x_rejected."""
    out = np.zeros((len(records), len(self.index)))
    for row, record in enumerate(records):
      for sign, key in ((1.0, "chosen"), (-1.0, "rejected")):
        for word in _words(record[key]):
          if word in self.index:
            out[row, self.index[word]] += sign
    return out

  def wins(self, records: Sequence[dict]) -> np.ndarray:
    """[N] wins of the fitted model on `records`."""
    return wins(self._features(records) @ self.weights)
