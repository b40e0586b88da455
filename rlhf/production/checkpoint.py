"""Atomic run checkpoints: a checkpoint directory either exists whole or not at all.

Layout: RUN_DIR/checkpoints/step_000010/{policy/, critic/, manifest.json, driver.json}. On a local
file system each is written into a temporary sibling and renamed into place; `latest.json` is replaced
atomically last, so a crash at any moment leaves the previous checkpoint intact and discoverable.

On an object store (RUN_DIR an s3:// or gs:// URI, rlhf/production/storage.py) there is no rename: the
learner ranks upload their shards into `step_N/`, then `driver.json` is written, then `latest.json`.
A `step_N/` without `driver.json` is never read, and `latest.json` only ever names a complete one.
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

from rlhf.production import storage

logger = logging.getLogger(__name__)


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


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
    run_dir: Path | str, step: int, save_models, driver_state: dict[str, Any], keep_last: int
) -> Path | str:
    """`save_models(target)` writes the learners' state into `target`: a temporary directory (a
    local run directory) or the checkpoint's own URI (an object store). Returns the checkpoint."""
    if storage.is_remote(run_dir):
        return _save_remote(str(run_dir), step, save_models, driver_state, keep_last)
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


def save_or_skip(
    run_dir: Path | str,
    step: int,
    save_models,
    driver_state: dict[str, Any],
    keep_last: int,
    final: bool,
    warn=logger.warning,
) -> Path | str | None:
    """`save_checkpoint`, where a storage failure (after its retries) skips this checkpoint with one
    warning and the run goes on: `latest.json` still names the previous checkpoint and the next one
    tries again. At the final checkpoint the run stops with that line (`RunStopped`)."""
    try:
        return save_checkpoint(run_dir, step, save_models, driver_state, keep_last)
    except Exception as exc:
        failure = storage.storage_failure(exc)
        if failure is None:
            raise
        line = f"checkpoint {step_name(step)} not written: {failure}"
        if final:
            from rlhf.actor_group import RunStopped

            raise RunStopped(f"{line}; this was the final checkpoint, the run stopped") from exc
        warn(f"warning: {line}; resume reads the previous checkpoint, the next checkpoint tries again")
        return None


def _save_remote(run_uri: str, step: int, save_models, driver_state: dict[str, Any], keep_last: int) -> str:
    root = storage.join(run_uri, "checkpoints")
    final = storage.join(root, step_name(step))
    # A re-save of this step (after a resume): its driver.json goes first, so it is never complete
    # while it is being replaced.
    storage.delete(storage.join(final, "driver.json"))
    storage.delete(final)
    save_models(final)
    payload = json.dumps({"step": step, **driver_state}, default=_json_default).encode()
    storage.write_bytes(storage.join(final, "driver.json"), payload)
    storage.write_json(storage.join(root, "latest.json"), {"step": step, "dir": step_name(step)})
    if keep_last > 0:
        steps = [n for n in storage.list_names(root) if n.startswith("step_")]
        for old in steps[:-keep_last]:
            try:
                storage.delete(storage.join(root, old))
            except storage.StorageError as exc:  # the next checkpoint prunes it
                logger.warning("%s", exc)
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path | str) -> Path | str | None:
    """The checkpoint `latest.json` names; if that one is missing or incomplete (the writer was
    killed while replacing it), the newest complete `step_*` directory. Half-written checkpoints
    (`.tmp_step_*`, or no `driver.json`, which is written last) are never returned."""
    if storage.is_remote(run_dir):
        return _latest_remote(str(run_dir))
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


def _latest_remote(run_uri: str) -> str | None:
    root = storage.join(run_uri, "checkpoints")
    marker = storage.join(root, "latest.json")
    try:
        named = storage.join(root, storage.read_json(marker)["dir"])
    except FileNotFoundError:
        named = None
    if named is not None and storage.exists(storage.join(named, "driver.json")):
        return named
    names = [n for n in storage.list_names(root) if n.startswith("step_")]
    complete = [storage.join(root, n) for n in names if storage.exists(storage.join(root, n, "driver.json"))]
    if named is not None and complete:
        logger.warning("%s names an incomplete checkpoint; using %s", marker, complete[-1])
    return complete[-1] if complete else None


def load_driver_state(ckpt: Path | str) -> dict[str, Any]:
    if storage.is_remote(ckpt):
        return storage.read_json(storage.join(ckpt, "driver.json"))
    return json.loads((Path(ckpt) / "driver.json").read_text())
