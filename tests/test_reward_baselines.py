"""The reward model's baselines: wins, the length rule, the bag-of-words Bradley-Terry fit."""

import numpy as np

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
