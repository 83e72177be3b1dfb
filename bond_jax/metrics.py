"""Run observability for every stage: metrics.jsonl + TensorBoard (process 0 only) and the progress line.

<stage>/metrics.jsonl holds one JSON object per logged step ({"step", "kind": "train" | "eval", "wall_time",
...}); <stage>/tensorboard/ the same scalars as "<kind>/<name>". A resumed run first drops the rows
logged after its checkpoint (the killed run's), then logs those steps again, so the file reads as one run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Sequence

import jax


def read_metrics(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, last_step: int) -> None:
  """Drop rows logged after `last_step` (process 0 only). The file is rewritten under a temporary name
  and renamed, so a crash here never leaves half a file."""
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
  os.replace(tmp, path)


def _is_scalar(v) -> bool:
  return not isinstance(v, (str, bytes, dict, list, tuple)) and getattr(v, "ndim", 0) == 0


class MetricsWriter:
  """write(step, metrics, kind) appends to <directory>/metrics.jsonl and TensorBoard."""

  def __init__(self, directory: str, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(directory, "metrics.jsonl")
    self._jsonl = self._tb = None
    if self.enabled:
      os.makedirs(directory, exist_ok=True)
      truncate_metrics(self.path, start_step)
      self._jsonl = open(self.path, "a")
      from tensorboardX import SummaryWriter  # imported here: the import costs ~1 s
      self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items() if _is_scalar(v)}
    # wall_time: seconds since the epoch when the row was written (step timing without log parsing)
    self._jsonl.write(
        json.dumps({
            "step": step,
            "kind": kind,
            "wall_time": time.time(),
            **scalars
        }, sort_keys=True) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(f"{kind}/{name}", value, step)
    self._tb.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def duration(seconds: float) -> str:
  if not seconds < float("inf"):
    return "?"
  seconds = int(max(seconds, 0))
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
  """The console line of a stage: step, steps/s, tokens/s, ETA and the interval's metrics.

  Rates leave out the first step of the process (it compiles) and the time spent in evaluations.
  """

  def __init__(self, stage: str, total: int):
    self.stage, self.total = stage, total
    self._t0: float | None = None
    self._s0 = 0
    self._tokens = 0.0

  def step_done(self, step: int, tokens: float) -> None:
    """Call after each step with the real tokens it processed (trained on, or sampled)."""
    if self._t0 is None:
      self._t0, self._s0 = time.perf_counter(), step
    else:
      self._tokens += tokens

  def exclude(self, seconds: float) -> None:
    """Leave `seconds` (an evaluation) out of the rates."""
    if self._t0 is not None:
      self._t0 += seconds

  def line(self, step: int, metrics: Mapping[str, float], keys: Sequence[str] = ()) -> tuple[str, float]:
    """('[sft] step 120/300 | 1.90 step/s | 5,210 tok/s | ETA 1m35s | loss 4.2 ...', tokens/s). keys: the
    metrics to show, in order (default: all, sorted)."""
    elapsed = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
    done = step - self._s0
    steps_per_s = done / elapsed if elapsed > 0 and done > 0 else 0.0
    tokens_per_s = self._tokens / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("inf")
    shown = keys or sorted(metrics)
    parts = [
        f"[{self.stage}] step {step}/{self.total}", f"{steps_per_s:.2f} step/s", f"{tokens_per_s:,.0f} tok/s",
        f"ETA {duration(eta)}"
    ]
    parts += [f"{k} {float(metrics[k]):.4g}" for k in shown if k in metrics]
    return " | ".join(parts), tokens_per_s
