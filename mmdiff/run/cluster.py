"""SLURM helpers: read the job's allocation, make the trainer agree with it, find and prune requeue checkpoints.

Pure functions over environment variables and paths; nothing here imports Lightning, so the module
is cheap to import from the CLI and easy to test with a fake environment.

How a SLURM run fits together (see ``slurm/README.md``):

- ``sbatch slurm/train.sbatch CONFIG`` starts one task per device with ``srun``; Lightning detects
  SLURM (``SLURM_NTASKS`` set, job name not ``bash``/``interactive``) and takes ranks from it.
  Lightning refuses to start when ``trainer.devices`` / ``trainer.num_nodes`` disagree with
  ``--ntasks-per-node`` / ``--nodes``; :func:`apply_slurm_allocation` makes them agree.
- ``--signal=SIGUSR1@90``: mmdiff's :class:`~mmdiff.callbacks.requeue.RequeueOnSignal` (Lightning's
  own handler is turned off) has all ranks save ``hpc_ckpt_<N+1>.ckpt`` at the next batch boundary
  in the trainer's ``default_root_dir`` (mmdiff's run directory, *not* ``checkpoints/``), then rank 0
  runs ``scontrol requeue``. The requeued job keeps its ``SLURM_JOB_ID`` and reruns the same command.
- The rerun (``SLURM_RESTART_COUNT > 0``) resumes like any rerun in a run directory that holds
  checkpoints: from the newest complete one, ``hpc_ckpt_N.ckpt`` or ``checkpoints/*.ckpt``
  (:mod:`mmdiff.run.resume`; Lightning's own pick-up of ``hpc_ckpt_N.ckpt`` is turned off).
"""
from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

from omegaconf import DictConfig

from mmdiff.errors import ConfigError

log = logging.getLogger(__name__)

#: File name the requeue callback (``RequeueOnSignal``) writes, Lightning's ``hpc_ckpt_<N>.ckpt``, N = 1, 2, ...
HPC_CHECKPOINT_PATTERN = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")

# Lightning treats jobs with these names as interactive allocations, not as SLURM-managed runs.
_INTERACTIVE_JOB_NAMES = ("bash", "interactive")

Allocation = Dict[str, Union[str, int]]
PathLike = Union[str, "os.PathLike[str]"]


# ------------------------------------------------------------------------------- allocation
def parse_tasks_per_node(value: str) -> List[int]:
    """Expand SLURM's compressed tasks-per-node list: ``"2(x3),1"`` → ``[2, 2, 2, 1]``.

    Accepts the forms of ``SLURM_TASKS_PER_NODE`` / ``SLURM_NTASKS_PER_NODE`` (``"4"``,
    ``"2(x3)"``, ``"2(x2),1"``). Raises ``ValueError`` on anything else.
    """
    counts: List[int] = []
    for part in str(value).strip().split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(f"cannot parse SLURM tasks-per-node value '{value}'")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _int_env(env: Mapping[str, str], *names: str) -> Optional[int]:
    for name in names:
        raw = env.get(name)
        if raw is not None and str(raw).strip().isdigit():
            return int(raw)
    return None


def slurm_allocation(env: Optional[Mapping[str, str]] = None) -> Optional[Allocation]:
    """The SLURM allocation this process runs in, or ``None`` outside a SLURM-managed run.

    Returns ``{"job_id": str, "num_nodes": int, "tasks_per_node": int, "world_size": int}``.
    ``None`` follows Lightning's own detection, so the two never disagree: no ``SLURM_JOB_ID``,
    no ``SLURM_NTASKS`` (e.g. a plain ``sbatch`` batch step without task options), or a job named
    ``bash``/``interactive`` (an ``salloc``/``srun --pty`` shell where you launch ranks yourself).

    ``num_nodes`` comes from ``SLURM_NNODES`` (the current step; else ``SLURM_JOB_NUM_NODES``),
    ``tasks_per_node`` from ``SLURM_NTASKS_PER_NODE`` (else ``SLURM_TASKS_PER_NODE``, which may
    look like ``2(x3)``), ``world_size`` from ``SLURM_NTASKS``. Raises :class:`ConfigError` when
    nodes run different numbers of tasks, which Lightning cannot use.
    """
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id or "SLURM_NTASKS" not in env:
        return None
    if env.get("SLURM_JOB_NAME") in _INTERACTIVE_JOB_NAMES:
        return None

    num_nodes = _int_env(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES") or 1
    world_size = _int_env(env, "SLURM_NTASKS", "SLURM_NPROCS")
    raw_tpn = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE") or env.get(
        "SLURM_TASKS_PER_NODE"
    )
    if raw_tpn:
        try:
            counts = parse_tasks_per_node(raw_tpn)
        except ValueError:
            raise ConfigError(
                f"cannot read SLURM's tasks per node '{raw_tpn}'; submit with --ntasks-per-node=N."
            ) from None
        if len(set(counts)) > 1:
            raise ConfigError(
                f"SLURM placed an uneven number of tasks per node ({raw_tpn}); submit with "
                "--nodes=N --ntasks-per-node=M so every node runs the same number of ranks."
            )
        tasks_per_node = counts[0]
    else:
        tasks_per_node = max(1, (world_size or num_nodes) // num_nodes)
    if world_size is None:
        world_size = num_nodes * tasks_per_node
    if world_size != num_nodes * tasks_per_node:
        raise ConfigError(
            f"SLURM job {job_id} has {world_size} tasks on {num_nodes} node(s) with "
            f"{tasks_per_node} per node; submit with --nodes=N --ntasks-per-node=M instead of --ntasks."
        )
    return {
        "job_id": str(job_id),
        "num_nodes": num_nodes,
        "tasks_per_node": tasks_per_node,
        "world_size": world_size,
    }


def apply_slurm_allocation(cfg: DictConfig, env: Optional[Mapping[str, str]] = None) -> DictConfig:
    """A copy of ``cfg`` whose ``trainer.num_nodes`` / ``trainer.devices`` match the SLURM job.

    Under SLURM the allocation decides (one rank per task: ``devices`` = tasks per node), so a
    config written for one GPU runs unchanged on ``--nodes=4 --ntasks-per-node=8``. A differing
    user value is logged as a warning (``"auto"`` is replaced silently). Outside SLURM ``cfg`` is
    returned unchanged.
    """
    alloc = slurm_allocation(env)
    if alloc is None:
        return cfg
    out = copy.deepcopy(cfg)
    t = out.trainer
    devices, num_nodes = str(alloc["tasks_per_node"]), int(alloc["num_nodes"])
    if str(t.devices) not in ("auto", devices):
        log.warning(
            "trainer.devices=%s overridden by SLURM job %s: %s task(s) per node, one device each",
            t.devices, alloc["job_id"], devices,
        )
    if int(t.num_nodes) != num_nodes:
        log.warning(
            "trainer.num_nodes=%s overridden by SLURM job %s: %d node(s)",
            t.num_nodes, alloc["job_id"], num_nodes,
        )
    t.devices = devices
    t.num_nodes = num_nodes
    log.info(
        "SLURM job %s: %d node(s) x %s rank(s) = world size %d",
        alloc["job_id"], num_nodes, devices, alloc["world_size"],
    )
    return out


def slurm_run_dir(
    cfg: DictConfig, per_job: bool = False, env: Optional[Mapping[str, str]] = None
) -> Path:
    """The run directory: ``cfg.run_dir``, plus ``/slurm-<job id>`` when ``per_job`` under SLURM.

    The default (``per_job=False``) is right for requeue: a requeued job keeps its
    ``SLURM_JOB_ID`` *and* its ``run_dir``, so it finds its ``hpc_ckpt_N.ckpt`` and W&B run again;
    resubmitting the same config also continues the same run. ``per_job=True`` gives every
    submission its own directory (same config, several independent jobs). The YAML can key its run
    directory by job without code: ``run_dir: runs/${name}/${slurm_job:}``
    (:mod:`mmdiff.config.resolvers`).
    """
    run_dir = Path(str(cfg.run_dir))
    if not per_job:
        return run_dir
    alloc = slurm_allocation(env)
    return run_dir / f"slurm-{alloc['job_id']}" if alloc else run_dir


# -------------------------------------------------------------------------- requeue files
def _hpc_checkpoints(run_dir: PathLike) -> List[tuple[int, Path]]:
    folder = Path(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = HPC_CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def hpc_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The newest ``hpc_ckpt_N.ckpt`` (highest N) directly in ``run_dir``, or ``None``.

    This is the file :class:`~mmdiff.callbacks.requeue.RequeueOnSignal` writes (into the trainer's
    ``default_root_dir``, which mmdiff sets to the run directory, under Lightning's file name) and
    the one Lightning itself resumes from when ``fit(ckpt_path=None)`` runs under SLURM.
    """
    found = _hpc_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_hpc_checkpoints(run_dir: PathLike, keep: int = 1) -> List[Path]:
    """Delete all but the ``keep`` newest ``hpc_ckpt_N.ckpt`` in ``run_dir``; returns what was deleted.

    ``keep=0`` removes them all: do that once a run has finished, or a later job with
    ``ckpt_path=None`` would resume from the stale requeue checkpoint. Call from global rank 0 only.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    found = _hpc_checkpoints(run_dir)
    doomed = [path for _, path in (found[:-keep] if keep else found)]
    for path in doomed:
        path.unlink(missing_ok=True)
        log.info("removed old requeue checkpoint %s", path)
    return doomed


__all__ = [
    "HPC_CHECKPOINT_PATTERN",
    "parse_tasks_per_node",
    "slurm_allocation",
    "apply_slurm_allocation",
    "slurm_run_dir",
    "hpc_checkpoint",
    "prune_hpc_checkpoints",
]
