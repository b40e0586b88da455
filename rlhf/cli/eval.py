"""`rlhf eval CHECKPOINT_OR_MODEL --config CFG [--out report.json]`: score any checkpoint or model on a
recipe's eval sets (`evaluation.sets`, else its held-out prompts) with vLLM engines, outside training.

The report names exactly what was evaluated: the model directory, the recipe and its hash, and, when
the path carries a lineage manifest (a checkpoint or its HF export), the manifest's own hash and the
config hash, step and run it records, so a number in a table can be traced to its checkpoint.

A checkpoint, model or run directory on a storage URI (s3://..., gs://...) is downloaded first into
`$RLHF_CACHE/checkpoints/` (its HF export, adapter and manifest; not the optimizer states).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rlhf.config.schema import RunConfig
from rlhf.evaluation import sets as evaluation
from rlhf.production import checkpoint as ckpt
from rlhf.production import lineage, storage


def resolve_model_dir(path: str | Path) -> Path:
    """A checkpoint (its `policy/hf` export), an HF model directory, or a run directory (its latest
    checkpoint); anything else is one line naming the path."""
    path = Path(path)
    if (path / "policy" / "hf" / "config.json").is_file():
        return path / "policy" / "hf"
    adapter = path / "policy" / "adapter"
    if (adapter / "adapter_config.json").is_file():  # a LoRA checkpoint without its merged export
        from rlhf.production.lineage import hash_path
        from rlhf.trainer.lora import merge_adapter

        cache = Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf")) / "merged"
        return merge_adapter(adapter, cache / hash_path(adapter)[:16])
    if (path / "config.json").is_file():
        return path
    if (path / "checkpoints").is_dir() and (latest := ckpt.latest_checkpoint(path)) is not None:
        return resolve_model_dir(latest)
    raise FileNotFoundError(
        f"rlhf eval: {path} is not a checkpoint (with policy/hf or policy/adapter), an HF model directory (with "
        "config.json) or a run directory with checkpoints"
    )


def fetch(path: str | Path) -> Path:
    """A local copy of a checkpoint, HF model or run directory (its latest checkpoint) on a storage
    URI; a local path as it is."""
    if not storage.is_remote(path):
        return storage.local_path(path)
    from rlhf.data.models import cache_root

    uri = str(path).rstrip("/")
    if not storage.is_file(storage.join(uri, "config.json")) and storage.exists(
        storage.join(uri, "checkpoints")
    ):
        uri = ckpt.latest_checkpoint(uri) or uri  # a run directory: its latest checkpoint
    local = Path(cache_root()) / "checkpoints" / lineage.sha256_text(uri)[:16]

    def wanted(rel: str) -> bool:  # the models and the manifest, not the DeepSpeed states
        return "/" not in rel or rel.startswith(("policy/hf/", "policy/adapter/"))

    shutil.rmtree(local, ignore_errors=True)
    if not storage.download(uri, local, keep=wanted):
        raise FileNotFoundError(f"rlhf eval: nothing at {path}")
    return local


def lineage_of(path: str | Path, model_dir: Path) -> dict[str, Any] | None:
    manifest_path = lineage.find_manifest(path) or lineage.find_manifest(model_dir)
    if manifest_path is None:
        return None
    manifest = json.loads(manifest_path.read_text())
    return {
        "manifest": str(manifest_path),
        "manifest_sha256": lineage.hash_path(manifest_path),
        "config_hash": manifest.get("config_hash"),
        "step": manifest.get("step"),
        "run_dir": manifest.get("run_dir"),
        "base_model": manifest.get("base_model", {}).get("path"),
    }


def _reward_pipeline(cfg: RunConfig, sets, device: str):
    """The recipe's reward sources, only when a set is scored with them (`reward: reward`)."""
    if all(es.rule is not None for es in sets):
        return None
    from rlhf.reward import RewardPipeline
    from rlhf.tasks import get_task

    source = cfg.data.source
    name = (
        source.removeprefix("builtin:") if source.startswith("builtin:") else cfg.data.task_args.get("task")
    )
    return RewardPipeline(cfg.reward, task=get_task(name) if name else None, device=device)


def run(path: str | Path, cfg: RunConfig, out: str | Path | None = None) -> dict[str, Any]:
    """Evaluate `path` on the recipe's eval sets; returns (and writes to `out`) the report."""
    from transformers import AutoTokenizer

    from rlhf.config.loader import resolve_device, to_yaml
    from rlhf.data.models import check_engine_can_run
    from rlhf.loop.driver import init_ray
    from rlhf.production.monitoring import engine_actor_options
    from rlhf.rollout import RolloutGroup

    storage.set_endpoint(cfg.logging.storage_endpoint)
    local = fetch(path)
    model_dir = resolve_model_dir(local)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=str(model_dir)),
        # the engines are sized like the evaluation role's (one engine unless placement.evaluation says more)
        placement=dataclasses.replace(cfg.placement, rollout=cfg.placement.evaluation),
        # the model is evaluated as it is (a LoRA checkpoint's adapter is merged in): no LoRA engines
        trainer=dataclasses.replace(cfg.trainer, lora=dataclasses.replace(cfg.trainer.lora, rank=0)),
    )
    device = resolve_device(cfg)
    check_engine_can_run(str(model_dir), device)
    sets = evaluation.build_sets(cfg, AutoTokenizer.from_pretrained(str(model_dir)))
    if not sets:
        raise ValueError("rlhf eval: the config has no eval sets (set evaluation.sets, or data.num_eval > 0)")
    found = lineage_of(local, model_dir)
    started = init_ray(device)
    engines = reward = None
    start = time.perf_counter()
    try:
        options = engine_actor_options([{}] * cfg.placement.rollout.replicas, "rlhf-eval", "evaluation")
        engines = RolloutGroup(cfg, str(model_dir), device, options)
        reward = _reward_pipeline(cfg, sets, device)
        result = evaluation.evaluate(engines, sets, step=(found or {}).get("step") or 0, reward=reward)
    finally:
        for role in (engines, reward):
            if role is not None:
                role.shutdown()
        if started:
            import ray

            ray.shutdown()
    config_text = to_yaml(cfg)
    report = {
        "model": str(path),
        "model_dir": str(model_dir),
        "config": cfg.source_file,
        "config_hash": lineage.sha256_text(config_text),
        "lineage": found,
        "sets": result.summaries,
        "settings": {es.cfg.name: {**dataclasses.asdict(es.cfg), "prompts": len(es.prompts)} for es in sets},
        "versions": lineage.library_versions(),
        "seconds": time.perf_counter() - start,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if out:
        Path(out).write_text(json.dumps(report, indent=1, default=str))
    return report


def describe(report: dict[str, Any]) -> str:
    lines = []
    for name, summary in report["sets"].items():
        figures = [f"reward {summary['reward_mean']:.3f}", f"solved {summary['solved_frac']:.3f}"]
        figures += [f"{k} {v:.3f}" for k, v in summary.items() if k.startswith("pass@")]
        lines.append(f"{name}: " + ", ".join(figures) + f" ({summary['samples']:.0f} samples)")
    found = report["lineage"]
    if found:
        lines.append(
            f"lineage: step {found['step']} of {found['run_dir']}, manifest {found['manifest_sha256'][:12]}"
        )
    return "\n".join(lines)
