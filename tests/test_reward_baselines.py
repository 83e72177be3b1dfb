"""The reward model's baselines: wins, the length rule, the bag-of-words Bradley-Terry fit."""

import os
import subprocess
import sys

import numpy as np
import pytest

from bond_jax import reward_baselines
from bond_jax.data import formats


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


def test_bag_of_words_fits_the_same_model_under_any_string_hash_seed(tmp_path):
  """Word order (and so the weights' layout and the digest) must not follow set iteration order."""
  script = (
      "import numpy as np; from bond_jax import reward_baselines as rb; from tests.test_reward_baselines "
      "import _pairs; m = rb.BagOfWords(_pairs(np.random.default_rng(3), 200, signal=True)); "
      "print(m.digest())")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  digests = {
      subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root,
                     env=dict(os.environ, PYTHONHASHSEED=seed)).stdout.strip() for seed in ("1", "2", "3")
  }
  assert len(digests) == 1, digests
  model = reward_baselines.BagOfWords([dict(chosen="zeta alpha beta", rejected="beta")])
  assert list(model.index) == ["beta", "alpha", "zeta"]  # by count, then by the word


def test_bag_of_words_scores_save_and_load_exactly(tmp_path):
  rng = np.random.default_rng(1)
  model = reward_baselines.BagOfWords(_pairs(rng, 200, signal=True))
  texts = ["w1 w2 great", "w1 w2 awful", "GREAT, great!", ""]
  scores = model.scores([""] * len(texts), texts)
  great, awful = model.weights[model.index["great"]], model.weights[model.index["awful"]]
  # presence, not counts: "great" twice scores once; an empty response scores 0
  assert scores[2] == great and scores[3] == 0.0 and scores[0] - scores[1] == great - awful
  path = str(tmp_path / "bow.json")
  model.save(path, metrics={"step": 0})
  back = reward_baselines.BagOfWords.load(path)
  np.testing.assert_array_equal(back.weights, model.weights)  # float64, bit for bit through JSON
  assert back.index == model.index and back.digest() == model.digest()
  np.testing.assert_array_equal(back.scores([""] * len(texts), texts), scores)
  assert os.listdir(tmp_path) == ["bow.json"]  # no temporary file left
  back.weights = back.weights + 1e-12
  assert back.digest() != model.digest()
  with open(path, "w") as f:
    f.write('{"words": ["a", "b"], "weights": [1.0]}')
  with pytest.raises(ValueError, match=r"bow.json is not a bag-of-words reward model: 2 words"):
    reward_baselines.BagOfWords.load(path)
  with pytest.raises(ValueError, match=r"no_such.json is not a bag-of-words reward model"):
    reward_baselines.BagOfWords.load(str(tmp_path / "no_such.json"))


def test_a_distillation_prompt_and_its_response_are_read_as_the_pairs_text_of_those_turns():
  """The pairs' responses are a conversation's first turns after the topic line (" t0\\nB: t1\\nA: t2");
  a distillation prompt holds the topic and t0, its response t1 and t2. Read alone, that response would
  lose t0's words and the "B:" tag every pair's text holds, and gain a "b" only from a FOURTH turn."""
  turns = ["hi there", "hey, what a day", "tell me more"]
  pair_prompt, pair_text = formats.dialogue_prompt("Pigs?", (), 0), formats.dialogue_response(turns, 0)
  prompt, response = formats.dialogue_prompt("Pigs?", turns[:1], 0), formats.dialogue_response(turns[1:], 1)
  assert formats.conversation_text(pair_prompt, pair_text) == pair_text
  assert formats.conversation_text(prompt, response) == pair_text
  assert formats.conversation_text("", " just words") == " just words"  # no topic, no tag: as it is
  # A model that rewards the "b" tag (a second turn in the pairs) and the word "there" (of t0 only).
  pairs = [dict(prompt=pair_prompt, chosen=pair_text, rejected=" hi there")] * 20 + [
      dict(prompt=pair_prompt, chosen=formats.dialogue_response(["there", "x"], 0), rejected=" yes")
  ] * 20
  model = reward_baselines.BagOfWords(pairs)
  assert model.weights[model.index["b"]] > 0 and model.weights[model.index["there"]] > 0
  scores = model.scores([prompt, pair_prompt, ""], [response, pair_text, response])
  assert scores[0] == scores[1]  # the same conversation, scored the same way
  # the response alone misses t0's words and the "B:" tag
  missed = sum(model.weights[model.index[w]] for w in ("b", "hi", "there"))
  np.testing.assert_allclose(scores[1] - scores[2], missed)
  # a chat messages prompt (not text) adds nothing
  np.testing.assert_allclose(model.scores([[{
      "role": "user",
      "content": "hi there"
  }]], [response]), scores[2:])
  with pytest.raises(ValueError, match="2 prompts for 1 responses"):
    model.scores(["a", "b"], ["c"])
