"""Interpolation resolvers mmdiff adds to OmegaConf for configs: ``${slurm_job:}``.

``${slurm_job:}`` is the SLURM job a config is loaded in: ``<array job id>_<task id>`` in a job
array task (SLURM's ``%A_%a``), ``<job id>`` in any other job, ``local`` outside SLURM. A
requeued job keeps its ids, so ``run_dir: runs/${name}/${slurm_job:}`` gives every submission its
own run directory and a requeue finds that directory again. It reads only these SLURM variables,
never the rest of the environment, which is why the guard (:mod:`mmdiff.config.guard`) allows it.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from omegaconf import OmegaConf

SLURM_JOB = "slurm_job"

#: The resolvers mmdiff registers, all allowed in configs.
RESOLVERS = (SLURM_JOB,)


def slurm_job_key(env: Optional[Mapping[str, str]] = None) -> str:
    """The value of ``${slurm_job:}`` in ``env`` (default: this process's environment)."""
    env = os.environ if env is None else env
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env.get("SLURM_JOB_ID") or "local"


def register_resolvers() -> None:
    """Register mmdiff's resolvers with OmegaConf (once per process; later calls do nothing)."""
    if not OmegaConf.has_resolver(SLURM_JOB):
        # OmegaConf 2.4 renamed register_new_resolver (2.3) and warns on the old name.
        register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
        # Uncached: one process may load configs in and out of a job.
        register(SLURM_JOB, lambda: slurm_job_key(), use_cache=False)


__all__ = ["RESOLVERS", "SLURM_JOB", "register_resolvers", "slurm_job_key"]
