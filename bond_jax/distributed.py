"""Multi-process start-up: one call before any other JAX work, `initialize(mode, ...)`.

Modes:
  none      single process; nothing is initialised.
  auto      Cloud TPU VM pods (and any cluster JAX detects itself): jax.distributed.initialize() with no
            arguments; on a TPU VM, JAX reads the worker list and ids from the TPU metadata server.
  slurm     SLURM, one process per NODE that drives all of the node's GPUs (launch/slurm_gpu.sbatch).
            Read from the environment that srun sets: num_processes = SLURM_NTASKS, process_id =
            SLURM_PROCID, coordinator = the first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST)
            at port JAX_COORDINATOR_PORT, else 61440 + SLURM_JOB_ID % 4096 (JAX's own choice).
            Why not jax.distributed.initialize() with no arguments: JAX 0.10's SlurmCluster detector
            (jax/_src/clusters/slurm_cluster.py) reads the same variables but also sets
            local_device_ids = [SLURM_LOCALID], i.e. it assumes one process per GPU; with one process per
            node that would leave each process only GPU 0. So this mode passes the values explicitly with
            cluster_detection_method='deactivate' and all local GPUs stay visible. With several tasks per
            node (SLURM_NTASKS_PER_NODE > 1) it follows JAX's convention instead: local_device_ids =
            [SLURM_LOCALID], and every task must see all of the node's GPUs (no --gpus-per-task binding).
  explicit  coordinator_address, num_processes and process_id from flags (e.g. two processes on one host
            in tests: 127.0.0.1:PORT).

`resolve` does the argument resolution and validation without touching JAX (unit-tested); `initialize`
calls it and then jax.distributed.initialize.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Mapping

MODES = ("none", "auto", "slurm", "explicit")


@dataclasses.dataclass(frozen=True)
class Resolved:
  """Keyword arguments for jax.distributed.initialize (`kwargs`), or none to pass (`mode` none/auto)."""
  mode: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  def kwargs(self) -> dict:
    if self.mode in ("none", "auto"):
      return {}
    out = dict(coordinator_address=self.coordinator_address, num_processes=self.num_processes,
               process_id=self.process_id, cluster_detection_method="deactivate")
    if self.local_device_ids is not None:
      out["local_device_ids"] = list(self.local_device_ids)
    return out


def first_host(nodelist: str) -> str:
  """First host of a SLURM node list: 'gpu[003-010,12],cpu1' -> 'gpu003', 'a1,a2' -> 'a1'."""
  match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
  if not match or not nodelist.strip():
    raise ValueError(f"SLURM node list {nodelist!r} has no host name")
  prefix, ranges = match.groups()
  if ranges is None:
    return prefix
  return prefix + re.split(r"[,-]", ranges)[0]


def _int(env: Mapping[str, str], name: str) -> int:
  if name not in env:
    raise ValueError(f"{name} is not set; run under srun inside a SLURM allocation, or use mode 'explicit'")
  try:
    return int(env[name])
  except ValueError:
    raise ValueError(f"{name}={env[name]!r} is not an integer") from None


def _validate(num_processes: int, process_id: int) -> None:
  if num_processes < 1:
    raise ValueError(f"num_processes={num_processes} must be >= 1")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is outside [0, {num_processes}) for num_processes="
                     f"{num_processes}")


def _tasks_per_node(env: Mapping[str, str]) -> int:
  """SLURM_NTASKS_PER_NODE (e.g. '8', or '8(x2)' in SLURM_STEP_TASKS_PER_NODE); 1 if unset."""
  for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    if env.get(name):
      return int(re.match(r"\d+", env[name]).group())
  return 1


def resolve(mode: str, coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, env: Mapping[str, str] | None = None) -> Resolved:
  """Validate and complete the start-up arguments of `mode` (env defaults to os.environ)."""
  env = os.environ if env is None else env
  if mode not in MODES:
    raise ValueError(f"distributed mode {mode!r} is not known; allowed: {', '.join(MODES)}")
  if mode in ("none", "auto"):
    given = [
        name for name, value in (("coordinator_address", coordinator_address),
                                 ("num_processes", num_processes), ("process_id", process_id))
        if value is not None
    ]
    if given:
      raise ValueError(f"{given[0]} is only used by modes 'explicit' and 'slurm', not {mode!r}")
    return Resolved(mode)
  if mode == "explicit":
    if not coordinator_address:
      raise ValueError("mode 'explicit' needs coordinator_address (HOST:PORT)")
    if num_processes is None or process_id is None:
      raise ValueError("mode 'explicit' needs num_processes and process_id")
    _validate(num_processes, process_id)
    return Resolved(mode, coordinator_address, num_processes, process_id)
  # slurm: flags given explicitly win over the environment
  if num_processes is None:
    num_processes = _int(env, "SLURM_NTASKS")
  if process_id is None:
    process_id = _int(env, "SLURM_PROCID")
  _validate(num_processes, process_id)
  if not coordinator_address:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
      raise ValueError("SLURM_STEP_NODELIST / SLURM_JOB_NODELIST are not set; run under srun or pass "
                       "coordinator_address")
    if env.get("JAX_COORDINATOR_PORT"):
      port = _int(env, "JAX_COORDINATOR_PORT")
    else:
      port = 61440 + _int(env, "SLURM_JOB_ID") % 4096
    coordinator_address = f"{first_host(nodelist)}:{port}"
  local = None
  if _tasks_per_node(env) > 1:
    local = (_int(env, "SLURM_LOCALID"),)
  return Resolved(mode, coordinator_address, num_processes, process_id, local)


def initialize(mode: str, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Resolved:
  """Start the JAX distributed system for `mode` (see the module docstring); returns what was used."""
  resolved = resolve(mode, coordinator_address, num_processes, process_id)
  if mode != "none":
    import jax
    jax.distributed.initialize(**resolved.kwargs())
  return resolved


def define_flags() -> Callable[[], Resolved]:
  """Define --distributed, --coordinator_address, --num_processes, --process_id (absl) for a CLI, and
  return a function that calls `initialize` with their values (call it first thing in main)."""
  from absl import flags
  mode = flags.DEFINE_enum("distributed", "none", MODES, "Multi-process start-up (bond_jax/distributed.py).")
  address = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (explicit, slurm).")
  count = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit; slurm: SLURM_NTASKS).")
  index = flags.DEFINE_integer("process_id", None, "This process's id (explicit; slurm: SLURM_PROCID).")
  return lambda: initialize(mode.value, address.value, count.value, index.value)
