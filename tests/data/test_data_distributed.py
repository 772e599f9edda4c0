"""Two real ranks (gloo): disjoint training streams, balanced validation on uneven shards."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from datakit import img2dataset_sample, mixed_aspect_shards, sized_shards, write_tar
from multiproc import free_port, run_all

HERE = Path(__file__).resolve().parent


def _run_two_ranks(tmp_path: Path, spec: dict) -> list[dict]:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    port = str(free_port())
    env = {k: v for k, v in os.environ.items()  # no launcher/cluster settings leak into the ranks
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))}
    run_all([[sys.executable, str(HERE / "ddp_worker.py"), str(rank), "2", port, str(spec_path),
              str(tmp_path / f"rank{rank}.json")] for rank in range(2)], tmp_path / "logs", env, 100)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.xdist_group("multirank")  # make test: one xdist worker runs these one after another
@pytest.mark.timeout(150)
def test_acceptance_b_two_ranks(tmp_path: Path) -> None:
    many = sized_shards(tmp_path / "many", [6] * 8, prefix="many")
    uneven = sized_shards(tmp_path / "uneven", [5, 17, 40], prefix="uneven")
    # one shard with a corrupt sample: still balanced, counted once across ranks
    single = [write_tar(tmp_path / "single.tar", [img2dataset_sample(f"s{i:03d}", i) for i in range(9)]
                        + [("sbad", {"jpg": b"junk", "txt": b"bad"})])]
    mixed, _ = mixed_aspect_shards(tmp_path / "mixed", 61, shards=4)
    spec = {
        "shards": {"train": [str(p) for p in many], "val": [str(p) for p in many], "workers": 0},
        "uneven": {"train": [str(p) for p in uneven], "val": [str(p) for p in uneven], "workers": 2},
        "single": {"train": [str(p) for p in single], "val": [str(p) for p in single], "workers": 0},
        "buckets": {"train": [str(p) for p in mixed], "val": [str(p) for p in mixed], "workers": 2,
                    "data": {"image_size": 32, "buckets": {"enabled": True, "step": 8}}},
    }
    ranks = _run_two_ranks(tmp_path, spec)
    totals = {"shards": 48, "uneven": 62, "single": 9, "buckets": 61}
    for name, (r0, r1) in ((n, (ranks[0][n], ranks[1][n])) for n in spec):
        assert len(r0["train"]) == len(r1["train"]) == 6 * 4, name
        assert not set(r0["train"]) & set(r1["train"]), f"{name}: ranks share training samples"
        assert r0["val_batches"] == r1["val_batches"] == r0["val_len"], name
        val = r0["val"] + r1["val"]
        assert len(val) == len(set(val)) == totals[name], name
    assert ranks[0]["single"]["val_skipped"] + ranks[1]["single"]["val_skipped"] == 1
    # aspect-ratio buckets: one-shape batches of several buckets, still in lockstep (above)
    assert len({tuple(s) for r in ranks for s in r["buckets"]["val_shapes"]}) == 3
    # Lightning DDP: the callback's counts are summed over ranks; validation stays in lockstep
    fit0, fit1 = ranks[0]["fit"], ranks[1]["fit"]
    assert fit0["skipped_val"] == fit1["skipped_val"] == 1
    assert fit0["skipped_train"] == fit1["skipped_train"] >= 1
    assert fit0["val_batches"] == fit1["val_batches"] == 3  # 10 samples → 5 per rank → 3 batches of 2
