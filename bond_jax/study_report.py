"""A study's arms, read back and drawn: results.json, results.md (a table, every number with its SE) and PNGs.

For each arm (bond_jax/study.py) it reads <arm>/bond/eval/history.jsonl (one row per evaluation) and the
last eval_<step>.json (the quantiles of the policy's samples, Best-of-N of pi_ref). Plots, by figure:
  front.png   reward and response length against KL(pi || pi_ref) along training, J-BOND and RLOO arms,
              with Best-of-N of pi_ref (N = 1 ... 16) for reference: the paper's Fig. 7;
  bond.png    BOND arms: the final quantile histograms against Beta(N, 1), and KL(pi_BoN || pi) and
              KL(pi || pi_BoN) along training: Fig. 2;
  anchor.png  EMA against hard anchor updates: quantile and KL along training: Fig. 5.
Arms that have not evaluated yet are listed as pending; the report can be written at any time.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from bond_jax import evaluate as evaluate_lib


def read_arm(directory: str) -> dict[str, Any] | None:
  """{'history': [...], 'final': {...}} of an arm, or None before its first evaluation."""
  eval_dir = os.path.join(directory, "bond", "eval")
  path = os.path.join(eval_dir, "history.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    history = [json.loads(line) for line in f if line.strip()]
  if not history:
    return None
  with open(os.path.join(eval_dir, f"eval_{history[-1]['step']:06d}.json")) as f:
    final = json.load(f)
  return {"history": history, "final": final}


def _pm(row: dict[str, Any], key: str) -> str:
  """'value +- stderr' of row[key]; a mean's stderr is stored without the '_mean' of its key."""
  value = row.get(key)
  stderr = row.get(f"{key}_stderr", row.get(_stderr_key(key)))
  if value is None:
    return "-"
  return f"{value:.3f} +- {stderr:.3f}" if stderr is not None else f"{value:.3f}"


def table(arms: Sequence[Any], results: dict[str, dict[str, Any] | None]) -> str:
  """The markdown table of the arms' last evaluations (in-distribution, then held-out topics)."""
  head = ("| arm | figure | step | quantile | KL(pi\\|\\|ref) | per position (on where to stop) | reward | "
          "length (BoN-N of ref) | KS to BoN-N | "
          "held-out topics quantile | KL(BoN\\|\\|pi) | KL(pi\\|\\|BoN) |")
  columns = len(head.strip("| ").split(" | "))  # the escaped pipes of KL(pi\\|\\|ref) are no separators
  lines = [head, "|" + "---|" * columns]
  for arm in arms:
    result = results.get(arm.name)
    if result is None:
      lines.append(f"| {arm.name} | {arm.figure} | pending |" + " |" * (columns - 3))
      continue
    row, final = result["history"][-1], result["final"]
    n = final.get("tracked_n", 1.0)
    bon_length = _bon_length(final, n)
    lines.append(f"| {arm.name} | {arm.figure} | {row['step']} | {_pm(row, 'policy_quantile_mean')} | "
                 f"{_pm(row, 'kl_policy_ref')} | {_per_position_kl(row)} | {_pm(row, 'policy_reward')} | "
                 f"{row.get('policy_response_length', 0):.1f} "
                 f"({bon_length}) | {row.get('quantile_ks', float('nan')):.3f} (N={n:.2f}) | "
                 f"{_pm(row, 'held_out_topics_policy_quantile_mean')} | {_pm(row, 'kl_bon_to_policy')} | "
                 f"{_pm(row, 'kl_policy_to_bon')} |")
  return "\n".join(lines)


def _per_position_kl(row: dict[str, Any]) -> str:
  """KL(pi || pi_ref) summed over positions, +- SE, and its part on where to stop (evaluate._kl_parts)."""
  if "kl_policy_ref_exact" not in row:
    return "-"
  return f"{_pm(row, 'kl_policy_ref_exact')} ({row['kl_stopping']:.3f})"


def _bon_length(final: dict[str, Any], n: float) -> str:
  """Response length of Best-of-N of pi_ref at the N in the evaluation nearest to n."""
  bon = final.get("best_of_n", {})
  if not bon:
    return "-"
  nearest = min(bon, key=lambda k: abs(int(k) - n))
  length = bon[nearest].get("response_length")
  return f"BoN-{nearest} {length:.1f}" if length is not None else "-"


def write(study_dir: str, arms: Sequence[Any]) -> list[str]:
  """results.json, results.md and the figures' PNGs in study_dir; returns their paths."""
  os.makedirs(study_dir, exist_ok=True)
  results = {arm.name: read_arm(os.path.join(study_dir, arm.name)) for arm in arms}
  paths = [os.path.join(study_dir, "results.json"), os.path.join(study_dir, "results.md")]
  with open(paths[0], "w") as f:
    json.dump({name: r and {"history": r["history"]} for name, r in results.items()}, f, indent=1)
  with open(paths[1], "w") as f:
    f.write(f"# Study results ({len(arms)} arms)\n\nLast evaluation of each arm, in distribution unless "
            "named; +- one standard error. Overrides per arm: bond_jax/study.py.\n\n")
    f.write(table(arms, results) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  for figure, draw in (("front", _plot_front), ("bond", _plot_bond), ("anchor", _plot_anchor)):
    chosen = [(arm, results[arm.name]) for arm in arms if arm.figure == figure and results[arm.name]]
    if chosen:
      paths.append(os.path.join(study_dir, f"{figure}.png"))
      draw(plt, chosen, paths[-1])
  return paths


def _stderr_key(key: str) -> str:
  """The stderr's key of a metric: a mean's is stored without the '_mean' (policy_quantile_stderr)."""
  return f"{key.removesuffix('_mean')}_stderr"


def _curve(history: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  return (np.array([h.get(key, np.nan) for h in history]),
          np.array([h.get(f"{key}_stderr", h.get(_stderr_key(key), 0.0)) for h in history]))


def _plot_front(plt, chosen, path: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
  for index, (arm, result) in enumerate(chosen):
    history = result["history"]
    kl, kl_se = _curve(history, "kl_policy_ref")
    style = "-" if arm.name.startswith("jbond") else "--"
    for ax, key in ((axes[0], "policy_reward"), (axes[1], "policy_response_length")):
      value, value_se = _curve(history, key)
      ax.errorbar(kl, value, xerr=kl_se, yerr=value_se, fmt="o" + style, ms=3, color=f"C{index % 10}",
                  label=arm.name)
  bon = chosen[0][1]["final"]["best_of_n"]
  ns = sorted(bon, key=int)
  bound = [evaluate_lib.bon_kl_bound(int(n)) for n in ns]
  axes[0].plot(bound, [bon[n]["reward"] for n in ns], "k*:", label="Best-of-N of pi_ref (N=1..16)")
  if all("response_length" in bon[n] for n in ns):
    axes[1].plot(bound, [bon[n]["response_length"] for n in ns], "k*:", label="Best-of-N of pi_ref")
  axes[0].set(xlabel="KL(pi || pi_ref) nats", ylabel="mean reward", title="reward vs KL (+-1 SE)")
  axes[1].set(xlabel="KL(pi || pi_ref) nats", ylabel="response tokens", title="length vs KL")
  axes[0].legend(fontsize=7)
  _save(plt, fig, path)


def _plot_bond(plt, chosen, path: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  grid = np.linspace(0, 1, 101)
  for index, (arm, result) in enumerate(chosen):
    final, history = result["final"], result["history"]
    color = f"C{index % 10}"
    axes[0].hist(final["policy_quantiles"], bins=16, range=(0, 1), density=True, histtype="step", color=color,
                 label=f"{arm.name} (KS {final['quantile_ks']:.3f})")
    steps = [h["step"] for h in history]
    for key, style in (("kl_bon_to_policy", "-"), ("kl_policy_to_bon", "--")):
      value, value_se = _curve(history, key)
      axes[1].errorbar(steps, value, yerr=value_se, fmt="o" + style, ms=3, color=color,
                       label=f"{arm.name}: {'KL(BoN||pi)' if style == '-' else 'KL(pi||BoN)'}")
  for n in sorted({int(r["final"].get("tracked_n", 1)) for _, r in chosen}):
    axes[0].plot(grid, n * grid**(n - 1), "k:", lw=1)
  axes[0].set(xlabel="reference quantile u", ylabel="density", title="final quantiles vs Beta(N, 1) (dotted)")
  axes[1].set(xlabel="step", ylabel="nats", title="distance to Best-of-N of pi_ref")
  axes[0].legend(fontsize=7)
  axes[1].legend(fontsize=6)
  _save(plt, fig, path)


def _plot_anchor(plt, chosen, path: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for index, (arm, result) in enumerate(chosen):
    history = result["history"]
    steps = [h["step"] for h in history]
    for ax, key in ((axes[0], "policy_quantile_mean"), (axes[1], "kl_policy_ref")):
      value, value_se = _curve(history, key)
      ax.errorbar(steps, value, yerr=value_se, fmt="o-", ms=3, color=f"C{index}", label=arm.name)
  axes[0].set(xlabel="step", ylabel="mean reference quantile", title="EMA vs hard anchor: quantile")
  axes[1].set(xlabel="step", ylabel="KL(pi || pi_ref) nats", title="EMA vs hard anchor: KL")
  axes[0].legend(fontsize=8)
  _save(plt, fig, path)


def _save(plt, fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
