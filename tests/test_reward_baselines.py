"""The reward model's baselines: wins, the length rule, the bag-of-words Bradley-Terry fit."""

import os

import numpy as np
import pytest

from bond_jax import reward_baselines


class Words:  # a stand-in tokenizer: one token per word

  def encode_batch(self, texts):
    return [t.split() for t in texts]


def test_wins_and_length_rule():
  np.testing.assert_array_equal(reward_baselines.wins(np.array([0.3, 0.0, -1.0])), [1.0, 0.5, 0.0])
  records = [
      dict(chosen="a b c", rejected="a"),
      dict(chosen="a", rejected="a b"),
      dict(chosen="a b", rejected="c d")
  ]
  np.testing.assert_array_equal(reward_baselines.length_wins(records, Words()), [1.0, 0.0, 0.5])


def _pairs(rng, n, signal):
  """Pairs of random filler words; with `signal` the chosen side says 'great' and the rejected 'awful'."""
  filler = [f"w{i}" for i in range(50)]
  out = []
  for _ in range(n):
    chosen, rejected = (" ".join(rng.choice(filler, 6)) for _ in range(2))
    if signal:
      chosen, rejected = chosen + " great", rejected + " awful"
    out.append(dict(chosen=chosen, rejected=rejected))
  return out


def test_bag_of_words_learns_words_and_not_noise():
  rng = np.random.default_rng(0)
  model = reward_baselines.BagOfWords(_pairs(rng, 200, signal=True))
  assert model.wins(_pairs(rng, 100, signal=True)).mean() == 1.0
  assert model.weights[model.index["great"]] > 0 > model.weights[model.index["awful"]]
  # Labels carrying no word signal: held-out accuracy stays near chance (100 pairs: SE 0.05).
  noise = reward_baselines.BagOfWords(_pairs(rng, 200, signal=False))
  assert abs(noise.wins(_pairs(rng, 400, signal=False)).mean() - 0.5) < 0.1


def test_bag_of_words_scores_save_and_load_exactly(tmp_path):
  rng = np.random.default_rng(1)
  model = reward_baselines.BagOfWords(_pairs(rng, 200, signal=True))
  texts = ["w1 w2 great", "w1 w2 awful", "GREAT, great!", ""]
  scores = model.scores(texts)
  great, awful = model.weights[model.index["great"]], model.weights[model.index["awful"]]
  # presence, not counts: "great" twice scores once; an empty response scores 0
  assert scores[2] == great and scores[3] == 0.0 and scores[0] - scores[1] == great - awful
  path = str(tmp_path / "bow.json")
  model.save(path, metrics={"step": 0})
  back = reward_baselines.BagOfWords.load(path)
  np.testing.assert_array_equal(back.weights, model.weights)  # float64, bit for bit through JSON
  assert back.index == model.index and back.digest() == model.digest()
  np.testing.assert_array_equal(back.scores(texts), scores)
  assert os.listdir(tmp_path) == ["bow.json"]  # no temporary file left
  back.weights = back.weights + 1e-12
  assert back.digest() != model.digest()
  with open(path, "w") as f:
    f.write('{"words": ["a", "b"], "weights": [1.0]}')
  with pytest.raises(ValueError, match=r"bow.json is not a bag-of-words reward model: 2 words"):
    reward_baselines.BagOfWords.load(path)
  with pytest.raises(ValueError, match=r"no_such.json is not a bag-of-words reward model"):
    reward_baselines.BagOfWords.load(str(tmp_path / "no_such.json"))
