"""Checkpoints and datasets as W&B artifacts, so a run's lineage shows in W&B as well as on disk.

* The dataset a run trains on is a `dataset` artifact: a local file or directory by reference (W&B
  records its path and checksums, nothing is uploaded), a built-in task or hub dataset as a small
  JSON of what identifies it; the metadata is `rlhf.production.lineage.data_fingerprint`.
* Every saved checkpoint is a `model` artifact named `<run>-checkpoint` (one version per save, aliased
  `step_N` and `latest`): its lineage `manifest.json` as a file and the checkpoint directory by
  reference (no checksum pass over the weights), with the manifest's hashes as metadata.
* Lineage edges: online, the run `use`s the dataset artifact and the parent checkpoint's artifact (a
  checkpoint this run resumed from or started from), so W&B draws dataset -> run -> checkpoint and
  parent -> run -> checkpoint. W&B cannot record a use in offline mode (`use_artifact` raises there);
  offline runs keep the same edges in the checkpoint artifact's metadata (`dataset`, `parent`).
* A checkpoint on a storage URI (s3://...) is recorded by its URI in the metadata (`uri`), with its
  manifest as a file; no reference, so W&B needs no credentials for the bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from rlhf.production import lineage, storage


def artifact_name(text: str) -> str:
    """W&B artifact names allow letters, digits, dashes, underscores and dots."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:120] or "artifact"


def dataset_artifact(data_cfg):
    """The `dataset` artifact of a DataConfig (built the same way every time: equal data, equal digest)."""
    import wandb

    fingerprint = lineage.data_fingerprint(data_cfg)
    source = data_cfg.source
    art = wandb.Artifact(
        artifact_name(f"data-{Path(source).name or source}"), type="dataset", metadata=fingerprint
    )
    path = os.path.expanduser(source)
    if not source.startswith("builtin:") and os.path.exists(path):
        art.add_reference(Path(path).resolve().as_uri(), name=Path(path).name)
    else:
        settings = {"source": source, "split": data_cfg.split, "task_args": data_cfg.task_args}
        if source.startswith("builtin:"):
            settings.update(seed=data_cfg.seed, num_train=data_cfg.num_train)
        with art.new_file("dataset.json") as f:
            f.write(json.dumps(settings, sort_keys=True))
    return art


def checkpoint_artifact(checkpoint_dir: str | os.PathLike):
    """The `model` artifact of a checkpoint directory with a lineage manifest (None without one)."""
    import wandb

    manifest_path = lineage.find_manifest(checkpoint_dir)
    if manifest_path is None:
        return None
    remote = storage.is_remote(checkpoint_dir)
    text = storage.read_bytes(manifest_path)
    manifest = json.loads(text)
    run = storage.basename(manifest["run_dir"])
    # the same digest as lineage.hash_path of the local file: its name, then its bytes
    digest = hashlib.sha256(lineage.MANIFEST.encode() + text).hexdigest()
    metadata: dict[str, Any] = {
        "step": manifest["step"],
        "manifest_sha256": digest if remote else lineage.hash_path(manifest_path),
        "config_hash": manifest["config_hash"],
        "code": manifest["code"],
        "base_model": manifest["base_model"],
        "data": {k: v for k, v in manifest["data"].items() if k != "state"},
        "parent": manifest["parent"],
        "metrics": manifest["metrics"],
    }
    art = wandb.Artifact(artifact_name(f"{run}-checkpoint"), type="model", metadata=metadata)
    if remote:
        art.metadata["uri"] = str(checkpoint_dir)
        with art.new_file("manifest.json") as f:
            f.write(text.decode())
        return art
    art.add_file(str(manifest_path), name="manifest.json")
    art.add_reference(Path(checkpoint_dir).resolve().as_uri(), name="checkpoint", checksum=False)
    return art


def offline(run) -> bool:
    return bool(getattr(getattr(run, "settings", None), "_offline", False))


class ArtifactLog:
    """A W&B run's artifacts: the dataset once, then one checkpoint version per save."""

    def __init__(self, run):
        self.run = run
        self.dataset_name: str | None = None

    def log_dataset(self, data_cfg) -> None:
        art = dataset_artifact(data_cfg)
        self.dataset_name = art.name
        if offline(self.run):
            self.run.log_artifact(art, aliases=["latest"])
        else:
            self.run.use_artifact(art)  # an input of the run (created on first use)

    def log_checkpoint(self, checkpoint_dir: str | os.PathLike, parent: str | None) -> None:
        art = checkpoint_artifact(checkpoint_dir)
        if art is None:
            return
        art.metadata["dataset"] = self.dataset_name
        parent_art = checkpoint_artifact(parent) if parent else None
        if parent_art is not None:
            art.metadata["parent_artifact"] = parent_art.name
            if not offline(self.run) and parent_art.name != art.name:
                self.run.use_artifact(parent_art)  # same content, same digest: the parent's version
        self.run.log_artifact(art, aliases=[f"step_{art.metadata['step']}", "latest"])
