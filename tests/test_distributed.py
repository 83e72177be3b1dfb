"""distributed.resolve: SLURM environment parsing and validation; one real 2-process start-up."""

import os
import socket
import subprocess
import sys

import pytest

from bond_jax import distributed

SLURM = dict(SLURM_JOB_ID="123457", SLURM_NTASKS="4", SLURM_PROCID="2", SLURM_LOCALID="0",
             SLURM_STEP_NODELIST="gpu[003-010,12],cpu1", SLURM_JOB_NODELIST="other[1-4]")


@pytest.mark.parametrize("nodelist, host", [("node001", "node001"), ("node001,host2", "node001"),
                                            ("gpu[003-010,12],cpu1", "gpu003"), ("n[7,9-10]", "n7"),
                                            ("a-b[12-13]", "a-b12")])
def test_first_host(nodelist, host):
  assert distributed.first_host(nodelist) == host


def test_slurm_reads_environment_like_jax():
  r = distributed.resolve("slurm", env=SLURM)
  # port = 61440 + SLURM_JOB_ID % 4096, as jax/_src/clusters/slurm_cluster.py: 123457 % 4096 = 577
  assert r.kwargs() == dict(coordinator_address="gpu003:62017", num_processes=4, process_id=2,
                            cluster_detection_method="deactivate")
  assert r.local_device_ids is None  # one process per node: every local GPU stays visible


def test_slurm_job_nodelist_port_override_and_flags_win():
  env = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
  env["JAX_COORDINATOR_PORT"] = "1234"
  r = distributed.resolve("slurm", env=env)
  assert (r.coordinator_address, r.num_processes, r.process_id) == ("other1:1234", 4, 2)
  r = distributed.resolve("slurm", coordinator_address="h:9", num_processes=8, process_id=7, env=env)
  assert (r.coordinator_address, r.num_processes, r.process_id) == ("h:9", 8, 7)


def test_slurm_one_process_per_gpu_binds_local_device():
  env = dict(SLURM, SLURM_NTASKS="16", SLURM_PROCID="11", SLURM_LOCALID="3",
             SLURM_STEP_TASKS_PER_NODE="8(x2)")
  r = distributed.resolve("slurm", env=env)
  assert r.kwargs()["local_device_ids"] == [3] and r.num_processes == 16 and r.process_id == 11


def test_explicit_and_simple_modes():
  r = distributed.resolve("explicit", "10.0.0.1:8476", 2, 1, env={})
  assert r.kwargs() == dict(coordinator_address="10.0.0.1:8476", num_processes=2, process_id=1,
                            cluster_detection_method="deactivate")
  assert distributed.resolve("auto", env={}).kwargs() == {}
  assert distributed.resolve("none", env={}).kwargs() == {}
  assert distributed.initialize("none").mode == "none"


@pytest.mark.parametrize("args, env, message", [
    (("explicit", None, 2, 0), {}, "needs coordinator_address"),
    (("explicit", "h:1", None, 0), {}, "needs num_processes and process_id"),
    (("explicit", "h:1", 0, 0), {}, "num_processes=0 must be >= 1"),
    (("explicit", "h:1", 2, 2), {}, r"process_id=2 is outside \[0, 2\)"),
    (("explicit", "h:1", 2, -1), {}, r"process_id=-1 is outside \[0, 2\)"),
    (("slurm", None, None, None), {}, "SLURM_NTASKS is not set"),
    (("slurm", None, None, None), dict(SLURM, SLURM_PROCID="4"), r"process_id=4 is outside \[0, 4\)"),
    (("slurm", None, None, None), dict(SLURM, SLURM_NTASKS="x"), "SLURM_NTASKS='x' is not an integer"),
    (("slurm", None, None, None), {
        k: v for k, v in SLURM.items() if "NODELIST" not in k
    }, "NODELIST"),
    (("auto", "h:1", None, None), {}, "coordinator_address is only used by modes"),
    (("mpi", None, None, None), {}, "distributed mode 'mpi' is not known; allowed: none, auto, slurm"),
])
def test_errors_are_one_line(args, env, message):
  with pytest.raises(ValueError, match=message) as info:
    distributed.resolve(*args, env=env)
  assert "\n" not in str(info.value)


_CHILD = """
import jax
from bond_jax import distributed
r = distributed.initialize('slurm')
print('RESULT', r.process_id, jax.process_count(), jax.device_count(), len(jax.local_devices()), flush=True)
"""


def test_two_processes_start_from_slurm_environment():
  """Two local processes with srun-like variables form one JAX system (gloo over 127.0.0.1)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  procs = []
  for pid in range(2):
    env = dict(os.environ, SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_PROCID=str(pid), SLURM_LOCALID=str(pid),
               SLURM_STEP_NODELIST="localhost", JAX_COORDINATOR_PORT=str(port), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs.append(
        subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True))
  outputs = [p.communicate(timeout=60)[0] for p in procs]
  results = sorted(line for out in outputs for line in out.splitlines() if line.startswith("RESULT"))
  assert results == ["RESULT 0 2 4 2", "RESULT 1 2 4 2"], outputs
