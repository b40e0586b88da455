"""experiments/gpu_lease.sh: queues start detached on their GPUs, wait for the queues they follow, and
their outputs come back as one archive per queue (the lease tool returns at most 8 files)."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "gpu_lease.sh"


def _lease(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "LEASE": str(tmp_path / "lease"), "LEASE_POLL_S": "1"}
    done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_queues_run_on_their_gpus_in_order_and_are_collected(tmp_path):
    lease = tmp_path / "lease"
    _lease(
        tmp_path, "start", "first", "0", 'sleep 1; echo "gpus $CUDA_VISIBLE_DEVICES" > $LEASE/first/out.txt'
    )
    _lease(
        tmp_path,
        "start",
        "second",
        "2,3",
        "after=first",
        "cat $LEASE/first/out.txt > $LEASE/second/seen.txt; exit 3",
    )
    status = _lease(tmp_path, "wait", "30")
    assert "first: done rc=0" in status and "second: done rc=3" in status
    assert (lease / "first" / "out.txt").read_text() == "gpus 0\n"
    assert (lease / "second" / "seen.txt").read_text() == "gpus 0\n"  # it started after `first` ended
    _lease(tmp_path, "collect", str(tmp_path / "out"))
    with tarfile.open(tmp_path / "out" / "second.tgz") as tar:
        assert "second/seen.txt" in tar.getnames()
    with tarfile.open(tmp_path / "out" / "logs.tgz") as tar:
        assert {"first.log", "second.log"} <= set(tar.getnames())
