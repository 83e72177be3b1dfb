"""Benchmarks run end to end on a micro model (their timings are not checked here: they live in bench/)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = [
    "--presets=micro", "--dtypes=float32", "--repeats=1", "--batch=2", "--num_samples=2", "--new_tokens=4",
    "--prompt_len=4", "--scenarios=short", "--peers=transformers"
]


def _bench(module, *args, **env_vars):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a user's shell: 1 CPU device
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=240, env=dict(env, JAX_PLATFORMS="cpu", **env_vars))


def _rows(stdout):
  return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
          if line.startswith("| micro |")]


def test_sampling_bench_times_both_sides_on_two_cpu_devices():
  out = _bench("bench.sampling", *MICRO[:-2], "--scenarios=short,eos", "--peers=transformers",
               "--cpu_devices=2")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "ours on 2 x cpu" in out.stdout
  row, eos_row = _rows(out.stdout)
  assert row[10] == "n/a" and float(eos_row[10].rstrip("x")) > 0  # compact vs plain: EOS rows only
  theirs, ours = (float(row[i].replace(",", "")) for i in (3, 5))
  ratio = float(row[6].rstrip("x"))
  assert row[4] == row[7] == "n/a"  # vLLM not asked for
  assert theirs > 0 and ours > 0
  # their time / ours, from the same best times; the tok/s cells are printed rounded to integers, which
  # alone moves ours / theirs by up to 0.5 / theirs + 0.5 / ours relative (15 tok/s on a loaded machine)
  rounding = 0.5 / theirs + 0.5 / ours
  assert abs(ratio - ours / theirs) <= 0.01 + (0.01 + rounding) * ratio
  assert float(row[13].rstrip("%")) > 0  # products share: the floor ran on the same mesh


def test_sampling_bench_refuses_a_device_count_that_does_not_split_the_rows():
  out = _bench("bench.sampling", *MICRO, "--cpu_devices=3")
  assert out.returncode == 2
  assert "--cpu_devices=3 is not allowed: need >= 1 and dividing B * N = 4" in out.stderr.splitlines()[-1]
  out = _bench("bench.sampling", *MICRO, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  assert out.returncode == 2
  assert "8 JAX devices (from the environment, e.g. XLA_FLAGS) do not divide B * N = 4" in out.stderr


def test_jbond_step_bench_reports_every_phase():
  out = _bench("bench.jbond_step", "--presets=micro", "--new_tokens=4", "--batch=2", "--repeats=1",
               "--rounds=1",
               "--against=")  # this tree only (the recorded runs compare with a previous commit)
  assert out.returncode == 0, out.stderr[-2000:]
  (row,) = _rows(out.stdout)
  assert row[1] == "this" and row[-1] == "0"  # no compilation during the timed steps
  assert row[-2].endswith("%") and all(cell.split()[0].isdigit() for cell in row[3:8])


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


def test_gpu_script_runs_the_1b_class_shapes_on_cpu():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(["bash", "bench/gpu.sh"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(env, JAX_PLATFORMS="cpu", SMOKE="1", PYTHON=sys.executable))
  assert out.returncode == 0, out.stderr[-2000:]
  rows = {
      r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines())
      if r[0] in ("llama_1b", "gemma_2b")
  }
  assert set(rows) == {"llama_1b", "gemma_2b"}, out.stdout
  for row in rows.values():  # the presets' widths and head layouts, 1 layer: decode and update both ran
    assert row[2] == "bfloat16" and row[5] == "n/a"  # CPU: no HBM figure
    assert float(row[4].replace(",", "")) > 0 and float(row[-1].rstrip("%")) > 0
