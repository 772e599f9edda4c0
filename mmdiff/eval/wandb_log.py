"""Log a standalone evaluation's numbers to W&B (offline unless configured online)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

log = logging.getLogger(__name__)


def log_eval_to_wandb(result: Dict[str, Any], *, project: str, mode: str, out_dir: str | Path,
                      name: str, config: Dict[str, Any]) -> None:
    """One W&B run (job type ``eval``) whose summary holds ``eval/<key>`` for each number."""
    # Imported here: wandb takes about a second to import; only runs that log to W&B pay it.
    import wandb

    numbers = {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
    run = wandb.init(project=project, mode=mode, dir=str(out_dir), name=name, job_type="eval",
                     config=config, reinit="finish_previous")
    try:
        run.log(numbers)
        run.summary.update({k: v for k, v in result.items() if isinstance(v, str)})
    finally:
        run.finish()
    log.info("logged %d numbers to W&B run %s (%s)", len(numbers), name, mode)


__all__ = ["log_eval_to_wandb"]
