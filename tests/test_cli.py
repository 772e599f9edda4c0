"""`mmdiff` argument errors: one line on stderr and exit code 2, before any work starts."""
from __future__ import annotations

import pytest

from mmdiff.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "x.ckpt", "--prompt", "a", "--n", "0"], "mmdiff sample: argument --n: must be a positive number, got 0"),
        (["sample", "x.ckpt", "--prompt", "a", "--batch-size", "-3"], "argument --batch-size: must be a positive number, got -3"),
        (["sample", "x.ckpt", "--n", "four"], "argument --n: must be a whole number, got 'four'"),
        (["bench", "c.yaml", "--rounds", "0"], "mmdiff bench: argument --rounds: must be a positive number"),
        (["bench", "c.yaml", "--threads", "0"], "argument --threads: must be a positive number"),
        (["bench", "c.yaml", "--warmup", "-1"], "argument --warmup: must be zero or more, got -1"),
        (["caption", "x.ckpt", "y.png", "--beam-size", "0"], "argument --beam-size: must be a positive number"),
        (["eval", "fid", "x.ckpt", "--n-reference", "0"], "argument --n-reference: must be a positive number"),
        (["shards", "folder", "src", "out", "--shard-size", "0"], "argument --shard-size: must be a positive number"),
        (["precompute", "c.yaml", "--out", "d", "--batch-size", "0"], "argument --batch-size: must be a positive number"),
        (["sample"], "mmdiff sample: the following arguments are required: ckpt"),
        (["nosuch"], "invalid choice: 'nosuch'"),
    ],
)
def test_argument_errors_are_one_line(argv: list, message: str, capsys) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and message in err and "--help" in err


def test_help_still_prints_usage_and_exits_zero(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--help"])
    assert exit_info.value.code == 0 and "usage: mmdiff sample" in capsys.readouterr().out
