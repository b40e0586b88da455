"""A driver killed with SIGKILL while it writes a checkpoint never leaves a half checkpoint behind
that a resume would read: the resume takes the last complete one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rlhf.production.checkpoint import latest_checkpoint, load_driver_state, save_checkpoint

WRITER = """
import sys, time
from pathlib import Path
from rlhf.production.checkpoint import save_checkpoint

run_dir, step, slow = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "slow"

def save_models(tmp):
    (tmp / "policy").mkdir()
    with open(tmp / "policy" / "weights.bin", "wb") as f:
        for _ in range(200 if slow else 1):
            f.write(b"x" * 4096)
            f.flush()
            if slow:
                (run_dir / "writing").touch()
                time.sleep(0.05)

save_checkpoint(run_dir, step, save_models, {"data": {"position": step}}, keep_last=3)
"""


def write(run_dir: Path, step: int, slow: bool) -> subprocess.Popen:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(run_dir), str(step), "slow" if slow else "fast"], env=env
    )


def test_sigkill_during_a_checkpoint_write_keeps_the_last_complete_one(tmp_path):
    assert write(tmp_path, 1, slow=False).wait(timeout=60) == 0
    assert latest_checkpoint(tmp_path).name == "step_000001"

    writer = write(tmp_path, 2, slow=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "writing").exists():  # the writer is inside save_models
        assert time.monotonic() < deadline and writer.poll() is None
        time.sleep(0.02)
    writer.send_signal(signal.SIGKILL)
    assert writer.wait(timeout=30) == -signal.SIGKILL

    root = tmp_path / "checkpoints"
    assert (root / ".tmp_step_000002").is_dir()  # the half-written one is there ...
    ckpt = latest_checkpoint(tmp_path)  # ... and never read
    assert ckpt.name == "step_000001" and load_driver_state(ckpt)["step"] == 1
    assert json.loads((root / "latest.json").read_text())["dir"] == "step_000001"

    # The next save of that step starts clean and becomes the latest.
    assert write(tmp_path, 2, slow=False).wait(timeout=60) == 0
    assert latest_checkpoint(tmp_path).name == "step_000002"
    assert not (root / ".tmp_step_000002").exists()


def test_latest_naming_a_removed_checkpoint_falls_back_to_the_newest_complete_one(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, lambda tmp: None, {"data": {}}, keep_last=3)
    root = tmp_path / "checkpoints"
    # Killed while re-saving step 2: the old directory is gone, the new one not yet renamed in.
    for f in (root / "step_000002").iterdir():
        f.unlink()
    (root / "step_000002").rmdir()
    (root / ".tmp_step_000002").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_000001"
    assert latest_checkpoint(tmp_path / "nothing-here") is None
