"""One atomic-write helper (mmdiff.io.atomic) for every file mmdiff writes: a crash or an exception
keeps the previous file, and writers of the same path never take each other's temporary file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmdiff.io.atomic import AtomicFile, atomic_torch_save, write_bytes_atomic, write_text_atomic

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
CKPT_WRITER = Path(__file__).with_name("ckpt_writer.py")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

# A writer that writes half of its file, then waits for a line on stdin: "commit" or "die".
_HALF_WRITER = """
import os, signal, sys
from mmdiff.io.atomic import AtomicFile
f = AtomicFile(sys.argv[1], remove_leftovers=True)
f.file.write(b"NEW-half"); f.file.flush()
print(f.tmp, flush=True)
if sys.stdin.readline().strip() == "die":
    os.kill(os.getpid(), signal.SIGKILL)
f.file.write(b"-rest"); f.commit()
print("done", flush=True)
"""


def _half_writer(path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _HALF_WRITER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV)


def test_write_helpers_replace_the_file_and_leave_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    assert write_text_atomic(target, "é1") == target and target.read_text(encoding="utf-8") == "é1"
    write_bytes_atomic(target, b"2", fsync=False)
    assert target.read_bytes() == b"2" and os.listdir(target.parent) == ["out.json"]


def test_an_exception_while_writing_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with AtomicFile(target) as f:
            f.write(b"new, half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_two_writers_in_one_process_use_their_own_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    first, second = AtomicFile(target, remove_leftovers=True), AtomicFile(target, remove_leftovers=True)
    assert first.tmp != second.tmp and first.tmp.exists()  # the second did not take the first's away
    first.file.write(b"first")
    second.file.write(b"second")
    second.commit()
    first.commit()
    assert target.read_bytes() == b"first" and os.listdir(tmp_path) == ["out.bin"]


def test_a_live_writer_in_another_process_keeps_its_temporary_file(tmp_path: Path) -> None:
    """Ranks sharing a folder: a save with leftover clean-up must not delete a write in progress."""
    target = tmp_path / "out.bin"
    proc = _half_writer(target)
    try:
        theirs = Path(proc.stdout.readline().strip())
        assert theirs.exists()
        write_bytes_atomic(target, b"ours")
        AtomicFile(target, remove_leftovers=True).discard()
        assert theirs.exists()
        proc.stdin.write("commit\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert target.read_bytes() == b"NEW-half-rest" and os.listdir(tmp_path) == ["out.bin"]


def test_a_killed_writer_leaves_the_old_file_and_its_leftover_is_cleared(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    proc = _half_writer(target)
    try:
        leftover = Path(proc.stdout.readline().strip())
        proc.stdin.write("die\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old" and leftover.read_bytes() == b"NEW-half"
    write_bytes_atomic(target, b"plain writes leave others' leftovers alone")
    assert leftover.exists()
    with AtomicFile(target, remove_leftovers=True) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.slow  # starts a Python process that imports torch
def test_a_checkpoint_save_does_not_delete_another_rank_s_save_in_progress(tmp_path: Path) -> None:
    """Two processes saving the same checkpoint path (ranks of one run dir): the save that ends
    first must not remove the other's temporary file (it did, by deleting every ``PATH.tmp-*``)."""
    target = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, str(CKPT_WRITER), "block", str(target)],
                            stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        line = proc.stdout.readline().split()  # blocks until the other save is half done
        assert line[0] == "HALF", line
        theirs = Path(line[1])
        atomic_torch_save({"name": "C"}, target)
        assert theirs.exists()
    finally:
        proc.kill()
        proc.wait(timeout=60)
