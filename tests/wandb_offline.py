"""Read back what a W&B offline run logged (its ``run-*.wandb`` file), for tests.

wandb ≥ 0.18 keeps no Python reader for this file, so this parses it directly: a 7-byte header
(``:W&B``, magic, version) then LevelDB-log framing (32 KiB blocks, records with a 7-byte header
crc32/length/type) around serialized ``wandb_internal_pb2.Record`` messages.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Dict, Iterator, List

import wandb
from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            pending = payload
        elif kind in (FIRST, MIDDLE):
            pending = (pending if kind == MIDDLE else b"") + payload
            continue
        elif kind == LAST:
            pending += payload
        record = pb.Record()
        record.ParseFromString(pending)
        yield record


def read_run(run_dir: Path) -> Dict[str, Any]:
    """``{"config": {key: value}, "history": [{key: value}, ...], "exit_code": int or None,
    "run": {"id", "group", "job_type", "entity", "project"}, "artifacts": [{"name", "type",
    "aliases", "files"}, ...]}`` from an offline run folder (``exit_code`` is None while the run
    was never finished).

    ``run.finish()`` returns once the W&B service has handled the exit record, but the service
    (a separate process) writes and closes the file on its own time; ``wandb.teardown()`` waits
    for that process to exit, after which every run this process started is on disk. The next
    ``wandb.init`` starts a new service."""
    wandb.teardown()
    (wandb_file,) = Path(run_dir).glob("run-*.wandb")
    config: Dict[str, Any] = {}
    history: List[Dict[str, Any]] = []
    exit_code = None
    run: Dict[str, Any] = {}
    artifacts: List[Dict[str, Any]] = []
    for record in records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = {"id": r.run_id, "group": r.run_group, "job_type": r.job_type, "entity": r.entity,
                   "project": r.project}
        elif kind == "artifact":
            a = record.artifact
            artifacts.append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                              "files": [e.path for e in a.manifest.contents]})
        if kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            for item in updates:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            history.append({item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {"config": config, "history": history, "exit_code": exit_code, "run": run, "artifacts": artifacts}
