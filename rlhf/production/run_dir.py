"""A run's directory: a local path, or a storage URI (s3://, gs://) with a local copy beside it.

Checkpoints go straight to the run directory (rlhf/production/checkpoint.py). The run's own files,
`config.yaml`, `metrics.jsonl`, `samples.jsonl` and `reward_curve.png`, are appended to on every step,
which an object store cannot do: a run on a URI keeps them in a local directory
(`$RLHF_CACHE/runs/<name>-<hash>`) and uploads them to the run directory at each checkpoint and at
the end. A resume from a URI downloads them first, so the files continue where they were uploaded.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf.config.loader import ConfigError
from rlhf.production import storage


@dataclass
class RunDir:
    local: Path  # where the run's own files are written during the run
    uri: str  # where checkpoints go; str(local) for a local run
    name: str

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.uri)


def open_run_dir(cfg) -> RunDir:
    """The directory `resume` names (it must exist), else a new one under `logging.output_dir`."""
    if cfg.resume:
        if storage.is_remote(cfg.resume):
            uri = cfg.resume.rstrip("/")
            if not storage.exists(storage.join(uri, "config.yaml")):
                raise ConfigError(f"resume: run directory {uri} does not exist (no config.yaml there)")
            name = storage.basename(uri)
            local = _local_copy(uri, name)
            storage.download(uri, local, keep=lambda rel: "/" not in rel)  # the run's files, no checkpoint
            return RunDir(local, uri, name)
        run_dir = storage.local_path(cfg.resume)  # a path or file:// URI
        if not run_dir.is_dir():
            raise ConfigError(f"resume: run directory {run_dir} does not exist")
        return RunDir(run_dir, str(run_dir), run_dir.name)
    stem = Path(cfg.source_file).stem if cfg.source_file else "run"
    name = cfg.logging.run_name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if storage.is_remote(cfg.logging.output_dir):
        uri = storage.join(cfg.logging.output_dir, name)
        if storage.exists(storage.join(uri, "config.yaml")):
            raise ConfigError(f"logging.run_name: run directory {uri} exists already (resume={uri}?)")
        return RunDir(_local_copy(uri, name), uri, name)
    run_dir = storage.local_path(cfg.logging.output_dir) / name
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:  # never write over another run's files
        raise ConfigError(
            f"logging.run_name: run directory {run_dir} exists already; choose another name, or resume={run_dir}"
        ) from None
    return RunDir(run_dir, str(run_dir), name)


def _local_copy(uri: str, name: str) -> Path:
    """A fresh local directory for a remote run's files (the remote copy is the one that counts)."""
    from rlhf.data.models import cache_root

    local = Path(cache_root()) / "runs" / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    return local


def upload_run_files(run: RunDir) -> list[str]:
    """Copy the run's own files (the top level of its local directory) to its URI; returns one
    warning line per file that could not be written (the next checkpoint uploads it again)."""
    if not run.remote:
        return []
    problems = []
    for path in sorted(run.local.iterdir()):
        if path.is_file() and not path.name.endswith(".tmp"):
            try:
                storage.write_bytes(storage.join(run.uri, path.name), path.read_bytes())
            except storage.StorageError as exc:
                problems.append(str(exc))
    return problems
