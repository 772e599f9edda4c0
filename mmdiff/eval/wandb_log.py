"""Log a standalone evaluation's numbers to W&B (offline unless configured online)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)


def log_eval_to_wandb(result: Dict[str, Any], *, project: str, mode: str, out_dir: str | Path,
                      name: str, config: Dict[str, Any], entity: Optional[str] = None,
                      group: Optional[str] = None) -> None:
    """One W&B run (job type ``eval``) whose summary holds ``eval/<key>`` for each number.

    ``entity``/``project`` are the training config's ``logger:`` ones and ``group`` its run group,
    so the evaluation appears beside the training run it measures."""
    # Imported here: wandb takes about a second to import; only runs that log to W&B pay it.
    import wandb

    numbers = {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
    run = wandb.init(project=project, entity=entity, group=group, mode=mode, dir=str(out_dir), name=name,
                     job_type="eval", config=config, reinit="finish_previous")
    try:
        run.log(numbers)
        run.summary.update({k: v for k, v in result.items() if isinstance(v, str)})
    finally:
        run.finish()
    log.info("logged %d numbers to W&B run %s (%s)", len(numbers), name, mode)


__all__ = ["log_eval_to_wandb"]
