"""Benchmarks run end to end on a micro model (their timings are not checked here: they live in bench/)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = [
    "--presets=micro", "--dtypes=float32", "--repeats=1", "--batch=2", "--num_samples=2", "--new_tokens=4",
    "--prompt_len=4"
]


def _bench(module, *args, **env_vars):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a user's shell: 1 CPU device
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=240, env=dict(env, JAX_PLATFORMS="cpu", **env_vars))


def _rows(stdout):
  return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
          if line.startswith("| micro |")]


def test_sampling_bench_times_both_sides_on_two_cpu_devices():
  out = _bench("bench.sampling", *MICRO, "--cpu_devices=2")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "ours on 2 x cpu" in out.stdout
  (row,) = _rows(out.stdout)
  theirs, ours = (float(c.replace(",", "")) for c in row[2:4])
  ratio = float(row[4].rstrip("x"))
  assert theirs > 0 and ours > 0
  # their time / ours, from the same best times; the tok/s cells are printed rounded to integers, which
  # alone moves ours / theirs by up to 0.5 / theirs + 0.5 / ours relative (15 tok/s on a loaded machine)
  rounding = 0.5 / theirs + 0.5 / ours
  assert abs(ratio - ours / theirs) <= 0.01 + (0.01 + rounding) * ratio
  assert float(row[9].rstrip("%")) > 0  # products share: the floor ran on the same mesh


def test_sampling_bench_refuses_a_device_count_that_does_not_split_the_rows():
  out = _bench("bench.sampling", *MICRO, "--cpu_devices=3")
  assert out.returncode == 2
  assert "--cpu_devices=3 is not allowed: need >= 1 and dividing B * N = 4" in out.stderr.splitlines()[-1]
  out = _bench("bench.sampling", *MICRO, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  assert out.returncode == 2
  assert "8 JAX devices (from the environment, e.g. XLA_FLAGS) do not divide B * N = 4" in out.stderr


def test_jbond_step_bench_reports_every_phase():
  out = _bench("bench.jbond_step", "--presets=micro", "--new_tokens=4", "--batch=2", "--repeats=1")
  assert out.returncode == 0, out.stderr[-2000:]
  (row,) = _rows(out.stdout)
  assert row[-1].endswith("%") and all(cell.split()[0].isdigit() for cell in row[2:7])


def test_reward_routes_bench_times_both_routes():
  out = _bench("bench.reward_routes", "--preset=micro", "--batch=2", "--samples=2", "--new_tokens=4",
               "--repeats=1", "--conversations=450")
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [
      line.strip("|").split("|") for line in out.stdout.splitlines()
      if line.startswith("| ") and " ms" not in line
  ]
  times = {r[0].strip(): float(r[1]) for r in rows if r[1].strip().replace(".", "").isdigit()}
  assert len(times) == 3 and all(t > 0 for t in times.values()), out.stdout
