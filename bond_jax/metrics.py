"""Run observability: a console progress line, a metrics JSONL and TensorBoard events (process 0 only)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping

import jax


class MetricsWriter:
  """write(step, metrics) appends to <dir>/metrics.jsonl and TensorBoard; progress() prints one line."""

  def __init__(self, directory: str, total_steps: int, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self._start_step, self._start_time = start_step, time.time()
    self._jsonl = self._tb = None
    if self.enabled:
      os.makedirs(directory, exist_ok=True)
      self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items() if _is_scalar(v)}
    # wall_time: seconds since the epoch when the line was written (step timing without log parsing)
    self._jsonl.write(json.dumps({"step": step, "kind": prefix, "wall_time": time.time(), **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(f"{prefix}/{name}", value, step)
    self._tb.flush()

  def progress(self, step: int, metrics: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    """'step 120/300 | 1.9 step/s | ETA 1m35s | reward 0.41 | ...' on stdout."""
    if not self.enabled:
      return
    done = step - self._start_step
    rate = done / max(time.time() - self._start_time, 1e-9)
    eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
    parts = [f"step {step}/{self.total_steps}", f"{rate:.2f} step/s", f"ETA {_duration(eta)}"]
    parts += [f"{k} {float(metrics[k]):.4g}" for k in keys if k in metrics]
    print(" | ".join(parts), file=sys.stdout, flush=True)

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def _is_scalar(v) -> bool:
  try:
    return getattr(v, "ndim", 0) == 0 and not isinstance(v, (str, bytes, dict, list))
  except TypeError:
    return False


def _duration(seconds: float) -> str:
  if seconds == float("inf"):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
