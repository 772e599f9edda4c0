"""W&B runs that follow the experiment: one run id per run dir across starts, group and job type,
checkpoints as artifacts (all offline, read back from the run files)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, List

import pytest

from mmdiff.cli import main
from mmdiff.run import wandb_run
from mmdiff.run.wandb_run import RUN_ID_FILE, wandb_run_id

from tiny_configs import toy_config
from wandb_offline import read_run


@pytest.fixture
def toy_wandb(tmp_path: Path, demo_shards: Path) -> Path:
    return toy_config(tmp_path, demo_shards, name="toy-exp", sampling={"every_n_steps": 100000},
                      trainer={"max_steps": 3, "val_every_n_steps": 100000},
                      logger={"kind": "wandb", "mode": "offline"})


def _runs(run_dir: Path) -> List[Dict[str, Any]]:
    """Every start's offline run, in start order."""
    return [read_run(p) for p in sorted((run_dir / "wandb").glob("offline-run-*"))]


def test_run_id_is_written_once_and_ignores_the_slurm_job(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "111")
    first = wandb_run_id(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "222")  # a resubmitted job: another job id, same run dir
    assert wandb_run_id(tmp_path) == first
    assert (tmp_path / "wandb_run_id").read_text().strip() == first
    assert wandb_run_id(tmp_path / "other") != first


def test_resume_continues_one_run_in_the_experiment_group(toy_wandb: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert main(["fit", str(toy_wandb)]) == 0
    assert main(["fit", str(toy_wandb), "trainer.max_steps=6", "--resume", "last"]) == 0
    first, second = _runs(run_dir)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert first["run"]["id"] == second["run"]["id"] == run_id
    for start in (first, second):
        assert start["run"]["group"] == "toy-exp" and start["run"]["job_type"] == "toy"
        assert start["exit_code"] == 0
    steps = [int(h["trainer/global_step"]) for h in second["history"] if "train/loss" in h]
    assert min(steps) == 3  # the second start logs where the first stopped


def test_fresh_start_gets_a_new_run_id_and_keeps_the_old_one(toy_wandb: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert main(["fit", str(toy_wandb)]) == 0
    old_id = (run_dir / RUN_ID_FILE).read_text()
    assert main(["fit", str(toy_wandb), "--fresh"]) == 0
    [moved] = (run_dir / "superseded").iterdir()
    assert (moved / RUN_ID_FILE).read_text() == old_id
    new_id = (run_dir / RUN_ID_FILE).read_text()
    assert new_id != old_id
    assert [start["run"]["id"] for start in _runs(moved) + _runs(run_dir)] == [old_id.strip(), new_id.strip()]


def test_group_and_job_type_keys(toy_wandb: Path, tmp_path: Path) -> None:
    assert main(["fit", str(toy_wandb), "logger.group=sweep-7", "logger.job_type=finetune"]) == 0
    (run,) = _runs(tmp_path / "run")
    assert (run["run"]["group"], run["run"]["job_type"]) == ("sweep-7", "finetune")


@pytest.mark.parametrize("mode, aliases", [
    ("none", []),
    ("last", [["last"]]),
    ("all", [["step0000003"], ["step0000006"], ["last"]]),
])
def test_log_checkpoints_uploads_artifacts(toy_wandb: Path, tmp_path: Path, mode: str, aliases: list) -> None:
    assert main(["fit", str(toy_wandb), "trainer.max_steps=6", f"logger.log_checkpoints={mode}"]) == 0
    (run,) = _runs(tmp_path / "run")
    artifacts = run["artifacts"]
    # W&B adds `latest` to every version it logs; ours are the others.
    assert [[x for x in a["aliases"] if x != "latest"] for a in artifacts] == aliases
    for artifact in artifacts:
        assert artifact["name"] == f"checkpoints-{run['run']['id']}" and artifact["type"] == "model"
    if mode == "last":
        assert artifacts[0]["files"] == ["last.ckpt"]


@pytest.mark.parametrize("override, message", [
    ("logger.log_checkpoints=last", "logger.log_checkpoints: last needs logger.kind: wandb (it is csv)."),
    ("logger.group=g", "logger.group is a W&B setting; it needs logger.kind: wandb (it is csv)."),
    ("logger.job_type=j", "logger.job_type is a W&B setting; it needs logger.kind: wandb (it is csv)."),
])
def test_wandb_keys_without_wandb_are_refused(toy_wandb: Path, capsys, override: str, message: str) -> None:
    assert main(["fit", str(toy_wandb), "logger.kind=csv", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_eval_run_joins_the_training_group_with_its_entity(toy_wandb: Path, tmp_path: Path) -> None:
    """`mmdiff eval`'s W&B run: the training config's project/entity, its group, job type eval,
    the training run's id in its config."""
    from mmdiff.config import load_config
    from mmdiff.eval.wandb_log import log_eval_to_wandb
    from mmdiff.run.wandb_run import eval_run_options

    cfg = load_config(toy_wandb, ["logger.entity=my-team", "logger.project=digits"])
    training_id = wandb_run_id(Path(cfg.run_dir))
    options = eval_run_options(cfg)
    assert options.pop("training_run_id") == training_id
    log_eval_to_wandb({"fid": 12.5}, out_dir=tmp_path / "eval", name="toy-exp-eval-fid",
                      config={"training_run_id": training_id}, **options)
    (folder,) = (tmp_path / "eval" / "wandb").glob("offline-run-*")
    run = read_run(folder)
    assert run["run"]["group"] == "toy-exp" and run["run"]["job_type"] == "eval"
    assert (run["run"]["entity"], run["run"]["project"]) == ("my-team", "digits")
    assert run["config"]["training_run_id"] == training_id
    assert [h["eval/fid"] for h in run["history"]] == [12.5]


def test_checkpoint_upload_survives_a_second_finalize(tmp_path: Path) -> None:
    """The requeue handler finalizes and closes the run before Lightning finalizes again."""
    from types import SimpleNamespace

    from mmdiff.run.wandb_run import RunWandbLogger

    last = tmp_path / "last.ckpt"
    last.write_bytes(b"weights")
    logger = RunWandbLogger(project="p", save_dir=str(tmp_path), id="abc123", mode="offline", offline=True,
                            log_checkpoints="last")
    assert logger.experiment.id == "abc123"  # started, as build_loggers' log_hyperparams does
    logger.after_save_checkpoint(SimpleNamespace(best_k_models={}, last_model_path=str(last)))
    logger.finalize("success")
    logger.experiment.finish()
    logger.finalize("success")  # must neither raise nor upload again
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    assert [sorted(a["aliases"]) for a in read_run(folder)["artifacts"]] == [["last", "latest"]]


def test_a_run_dir_from_before_the_id_file_keeps_its_wandb_run(tmp_path: Path) -> None:
    """A run dir whose W&B runs were `slurm-<job id>` continues the newest of them."""
    for name in ("offline-run-20260101_000000-slurm-41", "run-20260102_000000-slurm-42", "debug-internal.log"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert wandb_run_id(tmp_path) == "slurm-42"
    assert (tmp_path / "wandb_run_id").read_text().strip() == "slurm-42"



def test_ranks_racing_for_the_run_id_all_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank of a job may ask for the id at once: the first writer's id is every rank's."""
    ranks = 4
    everyone_looked = threading.Barrier(ranks)

    def no_earlier_run(wandb_dir: Path) -> None:
        everyone_looked.wait(timeout=30)  # all ranks have seen no id file before any writes one
        return None

    monkeypatch.setattr(wandb_run, "_existing_run_id", no_earlier_run)
    ids: List[str] = []
    threads = [threading.Thread(target=lambda: ids.append(wandb_run_id(tmp_path))) for _ in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(ids) == ranks and len(set(ids)) == 1, ids
    assert ids[0] == (tmp_path / RUN_ID_FILE).read_text().strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_ID_FILE]  # no staged file left behind


def test_a_wandb_service_gone_ends_wandb_logging_not_the_fit(tmp_path: Path, caplog) -> None:
    """SLURM's SIGTERM reaches W&B's service process too: the socket error of the next log call is
    one warning, and later calls do not touch the dead run (the fit must reach its SIGTERM save)."""
    from mmdiff.run.wandb_run import RunWandbLogger

    calls = []

    class GoneRun:
        def log(self, data):
            calls.append(data)
            raise ConnectionResetError(104, "Connection reset by peer")

    logger = RunWandbLogger(project="p", save_dir=str(tmp_path), mode="offline", offline=True)
    logger._experiment = GoneRun()
    with caplog.at_level("WARNING", logger="mmdiff.run.wandb_run"):
        logger.log_metrics({"train/loss": 1.0}, step=3)
        logger.log_metrics({"train/loss": 0.9}, step=4)
    assert len(calls) == 1
    assert [r.getMessage() for r in caplog.records if "W&B stopped answering" in r.getMessage()]
