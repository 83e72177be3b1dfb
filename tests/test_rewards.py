"""rewards.py's host-side pieces: tie rates, row buckets, the checks a reward function's output meets."""

import numpy as np
import pytest

from bond_jax import rewards


def test_tie_rate_counts_equal_pairs_within_a_prompt():
  assert float(rewards.tie_rate(np.array([[1.0, 1.0, 2.0], [3.0, 4.0, 5.0]]))) == pytest.approx(1 / 6)
  assert float(rewards.tie_rate(np.zeros((4, 3)))) == 1.0
  assert float(rewards.tie_rate(np.arange(8.0).reshape(4, 2))) == 0.0
  assert float(rewards.tie_rate(np.ones((3, 1)))) == 0.0  # one response per prompt: no pair


def test_row_buckets_pad_at_most_a_quarter_and_four_widths_per_octave():
  widths = {rewards.bucket(n) for n in range(129, 257)}
  assert widths == {160, 192, 224, 256}
  assert all(n <= rewards.bucket(n) <= 1.25 * n for n in range(64, 5000))
  assert {rewards.bucket(n) for n in range(1, 64)} == {16, 32, 48, 64}


def test_reward_function_output_checks():
  np.testing.assert_array_equal(rewards.checked((1, 2.5), 2, "reward_fn"), np.float32([1, 2.5]))
  with pytest.raises(ValueError, match=r"reward_fn returned shape \(3,\) for 2 responses"):
    rewards.checked([1, 2, 3], 2, "reward_fn")
  with pytest.raises(ValueError, match=r"reward_fn returned non-finite values \[1.0, inf\]"):
    rewards.checked([1, np.inf], 2, "reward_fn")
  assert np.isnan(rewards.checked([np.nan, 1], 2, "reward_fn", finite=False)[0])  # training: the guard's
  with pytest.raises(ValueError, match="reward_fn returned str that is not floats"):
    rewards.checked("ab", 2, "reward_fn")
  with pytest.raises(ValueError, match="must be 'package.module:function'"):
    rewards.import_function("just_a_module")
  with pytest.raises(ValueError, match=r"reward_fn='math:pi' is a float, not a function"):
    rewards.import_function("math:pi")
  assert rewards.import_function("os.path:join")("a", "b") == "a/b"
  with pytest.raises(ValueError, match="reward_fn failed on the probe responses: ZeroDivisionError"):
    rewards.probe(lambda prompts, responses: 1 / 0, ["p"])
