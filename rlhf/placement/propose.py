"""Proposing a placement for a cluster: the cost model behind `rlhf plan --propose` (pure, no Ray)."""

from __future__ import annotations

import json
from typing import Any

import yaml

from rlhf.config.loader import to_dict
from rlhf.config.schema import RunConfig
from rlhf.placement.inventory import Inventory, Node, estimate_params, learner_bytes_per_param
from rlhf.placement.memory import GPU_OVERHEAD_GB
from rlhf.placement.plan import active_roles


def gpu_score(node: Node) -> float:
    """Cost model: trained roles want memory (weights+grads+Adam) and FLOPs (backward = 2x forward)."""
    return max(node.gpu_memory_gb, 1.0) * max(node.gpu_tflops, 1.0)


def propose_plan(cfg: RunConfig, inventory: Inventory, param_count: float | None = None) -> dict[str, Any]:
    """Placement overrides (a nested dict for load_config) suited to `inventory`.

    * No GPUs: everything on CPU.
    * One GPU type: colocate all roles on every GPU (vLLM sleeps while the learner trains).
    * Several types: learner/reference/critic on the best type (highest memory x TFLOPs), rollout
      (and the reward model) on the type with the next most capacity; generation is
      memory-bandwidth bound and scales out, training needs the big memory.
    Tensor parallelism and ZeRO settings are raised when the model does not fit.
    """
    roles = active_roles(cfg)
    if inventory.total_gpus == 0:
        return {"placement": {"device": "cpu"}}

    by_type: dict[str, list[Node]] = {}
    for node in inventory.nodes:
        if node.gpus:
            by_type.setdefault(node.gpu_type or "GPU", []).append(node)
    ranked = sorted(by_type, key=lambda t: gpu_score(by_type[t][0]), reverse=True)
    count = {t: sum(n.gpus for n in by_type[t]) for t in ranked}
    memory = {t: min(n.gpu_memory_gb for n in by_type[t]) for t in ranked}
    params = param_count if param_count is not None else estimate_params(cfg.model.path)
    trained = [r for r in ("learner", "reference", "critic") if r in roles]
    serving = [r for r in ("rollout", "reward_model") if r in roles]

    def role(replicas: int, accelerator: str | None) -> dict[str, Any]:
        return {"replicas": replicas, "gpus": 0.0, "accelerator_type": accelerator}

    placement: dict[str, Any] = {"device": "cuda"}
    out: dict[str, Any] = {"placement": placement}
    if len(ranked) == 1:
        gpu_type = ranked[0]
        learner_type, rollout_type = gpu_type, gpu_type
        learners, rollout_gpus = count[gpu_type], count[gpu_type]
        placement["colocate"] = [roles]
    else:
        learner_type = ranked[0]
        rollout_type = max(ranked[1:], key=lambda t: count[t] * gpu_score(by_type[t][0]))
        learners, rollout_gpus = count[learner_type], count[rollout_type]
        placement["colocate"] = [g for g in (trained, serving) if len(g) > 1]

    tp = _tensor_parallel(params, memory[rollout_type], rollout_gpus, colocated=len(ranked) == 1)
    if tp != cfg.rollout.tensor_parallel:
        out["rollout"] = {"tensor_parallel": tp}
    for r in trained:
        placement[r] = role(learners, learner_type)
    placement["rollout"] = role(max(1, rollout_gpus // tp), rollout_type)
    if "reward_model" in roles:
        placement["reward_model"] = role(
            max(1, rollout_gpus // tp) if len(ranked) > 1 else learners, rollout_type
        )

    trainer = _zero_settings(cfg, params, memory[learner_type], learners, colocated=len(ranked) == 1)
    if trainer:
        out["trainer"] = trainer
    return _prune_unchanged(out, to_dict(cfg))


def _prune_unchanged(proposal: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """Keeps only the values that differ from the recipe (shorter, clearer override lists)."""
    kept: dict[str, Any] = {}
    for key, value in proposal.items():
        if isinstance(value, dict) and isinstance(current.get(key), dict):
            sub = _prune_unchanged(value, current[key])
            if sub:
                kept[key] = sub
        elif current.get(key, object()) != value:
            kept[key] = value
    return kept


def _tensor_parallel(params: float | None, gpu_memory_gb: float, gpus: int, colocated: bool) -> int:
    """Smallest power-of-two TP whose bf16 weight shard leaves half the engine's memory for KV cache."""
    if not params or not gpu_memory_gb:
        return 1
    budget = gpu_memory_gb * (0.45 if colocated else 0.85) / 2
    tp = 1
    while params * 2 / 1e9 / tp > budget and tp * 2 <= max(gpus, 1) and tp < 8:
        tp *= 2
    return tp


def _zero_settings(
    cfg: RunConfig, params: float | None, gpu_memory_gb: float, ranks: int, colocated: bool
) -> dict:
    if not params or not gpu_memory_gb:
        return {}
    budget = gpu_memory_gb * 0.9 - GPU_OVERHEAD_GB
    stage, offload = cfg.trainer.zero_stage, cfg.trainer.offload_optimizer

    def need(s: int, off: bool) -> float:
        return params * learner_bytes_per_param(s, ranks, off) / 1e9

    for higher in range(stage, 4):  # the lowest stage that fits (less communication)
        if need(higher, offload) <= budget:
            return {} if higher == stage else {"zero_stage": higher}
    return {"zero_stage": 3, "offload_optimizer": True}


def overrides_to_args(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """{'placement': {'device': 'cuda'}} -> ['placement.device=cuda'] (YAML flow values)."""
    args = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            args += overrides_to_args(value, dotted)
        else:
            simple = isinstance(value, str) and value and yaml.safe_load(value) == value
            args.append(f"{dotted}={value if simple else json.dumps(value)}")
    return args
