"""Atomic run checkpoints: a checkpoint directory either exists whole or not at all.

Layout: RUN_DIR/checkpoints/step_000010/{policy/, critic/, driver.json}. Each is written into a
temporary sibling and renamed into place; `latest` is replaced atomically last, so a crash at any
moment leaves the previous checkpoint intact and discoverable.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, default=_json_default))
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_checkpoint(
    run_dir: Path, step: int, save_models, driver_state: dict[str, Any], keep_last: int
) -> Path:
    """`save_models(tmp_dir)` writes the learners' state into the temporary directory."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_models(tmp)
    _write_json_atomic(tmp / "driver.json", {"step": step, **driver_state})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_json_atomic(root / "latest.json", {"step": step, "dir": final.name})
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest.json` names; if that one is missing or incomplete (the writer was
    killed while replacing it), the newest complete `step_*` directory. Half-written checkpoints
    (`.tmp_step_*`, or no `driver.json`, which is written last) are never returned."""
    root = checkpoint_root(run_dir)
    marker = root / "latest.json"
    if marker.exists():
        ckpt = root / json.loads(marker.read_text())["dir"]
        if (ckpt / "driver.json").exists():
            return ckpt
    complete = sorted(p for p in root.glob("step_*") if (p / "driver.json").exists())
    if marker.exists() and complete:
        logger.warning("%s names an incomplete checkpoint; using %s", marker, complete[-1])
    return complete[-1] if complete else None


def load_driver_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / "driver.json").read_text())
