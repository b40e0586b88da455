"""A KubeRay `RayJob` for a recipe: the cluster shape follows the placement plan.

One worker group per GPU type (nvidia.com/gpu limits, a nodeSelector for the type, GPU taint
toleration); the head runs only the driver (num-cpus 0). The image must contain this repository
(the recipe path in the entrypoint is relative to the image's working directory) with `rlhf`
installed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from rlhf.config.schema import RunConfig
from rlhf.placement.inventory import Inventory, Node, _gpu_spec
from rlhf.placement.plan import ROLES, PlacementError, Plan, make_plan

# GPU feature discovery's `nvidia.com/gpu.product` label for common types; an inventory node's
# `labels` replace this guess (cloud providers use their own keys, e.g. cloud.google.com/gke-accelerator).
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRODUCTS = {
    "H100": "NVIDIA-H100-80GB-HBM3",
    "H200": "NVIDIA-H200",
    "A100": "NVIDIA-A100-SXM4-80GB",
    "L4": "NVIDIA-L4",
    "L40S": "NVIDIA-L40S",
    "A10G": "NVIDIA-A10G",
    "T4": "Tesla-T4",
}
HEAD_CPUS, HEAD_MEMORY_GB = 4, 16


def rayjob_manifest(
    cfg: RunConfig,
    image: str,
    entrypoint: str | None = None,
    *,
    inventory: Inventory | None = None,
    overrides: Sequence[str] = (),
    gpus_per_node: int = 8,
    name: str | None = None,
) -> dict[str, Any]:
    """The RayJob as a dict (dump it with `manifest_yaml`).

    Without an inventory the worker nodes are sized from the roles: nodes of `gpus_per_node` GPUs
    per accelerator type, enough CPUs for the role reservations.
    """
    plan = make_plan(cfg, inventory or _inventory_for(cfg, gpus_per_node))
    config_path = cfg.source_file or "config.yaml"
    entrypoint = entrypoint or shlex.join(["rlhf", "train", config_path, *overrides])
    job_name = _dns_name(name or cfg.logging.run_name or f"rlhf-{Path(config_path).stem}")
    runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1", "WANDB_PROJECT": cfg.logging.project}}
    if plan.device == "cpu":
        runtime_env["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": job_name, "labels": {"app.kubernetes.io/name": "rlhf"}},
        "spec": {
            "entrypoint": entrypoint,
            "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 0,
            "rayClusterSpec": {
                "rayVersion": _ray_version(),
                "headGroupSpec": _head_group(image),
                "workerGroupSpecs": _worker_groups(plan, image),
            },
        },
    }


def manifest_yaml(manifest: dict[str, Any]) -> str:
    return yaml.safe_dump(manifest, sort_keys=False, width=120)


def _ray_version() -> str:
    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return "2.60.0"


def _dns_name(text: str) -> str:
    """Kubernetes object names: lowercase alphanumerics and '-', at most 63 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return (name[:63].rstrip("-")) or "rlhf"


def _inventory_for(cfg: RunConfig, gpus_per_node: int) -> Inventory:
    """A cluster just big enough for the recipe: the planner's bundles packed into uniform nodes."""
    probe_nodes = []
    # Plan on an oversized cluster per GPU type first, then keep the nodes the plan used.
    pl = cfg.placement
    types = {getattr(pl, r).accelerator_type for r in ROLES}
    wants_gpu = pl.device == "cuda" or any(t for t in types) or any(getattr(pl, r).gpus > 0 for r in ROLES)
    if not wants_gpu:
        demand = sum(getattr(pl, r).replicas * getattr(pl, r).cpus for r in ROLES)
        cpus = max(4, math.ceil(demand / 0.75))
        node = Node("cpu", cpus=cpus, memory_gb=4 * cpus, resources=_custom_resources(cfg))
        return Inventory([node], source="sized from the recipe")
    needed = sum(getattr(pl, r).replicas * max(1, math.ceil(getattr(pl, r).gpus)) for r in ROLES)
    needed *= max(1, cfg.rollout.tensor_parallel)

    for gpu_type in sorted(types, key=str) or [None]:
        memory, tflops = _gpu_spec(gpu_type)
        for k in range(math.ceil(needed / gpus_per_node)):
            probe_nodes.append(
                Node(
                    f"{(gpu_type or 'gpu').lower()}-{k}",
                    cpus=64.0 * gpus_per_node,
                    memory_gb=256.0 * gpus_per_node,
                    gpus=gpus_per_node,
                    gpu_type=gpu_type,
                    gpu_memory_gb=memory,
                    gpu_tflops=tflops,
                    resources=_custom_resources(cfg),
                )
            )
    probe = Inventory(probe_nodes, source="sized from the recipe")
    plan = make_plan(cfg, probe)
    # Shrink each used node to what the plan takes: its GPUs, the bundles' CPUs plus headroom.
    gpus_used: dict[str, set[int]] = {}
    cpus_used: dict[str, float] = {}
    for group in plan.groups:
        for bundle, node, gpus in zip(group.bundles, group.bundle_nodes, group.bundle_gpus):
            gpus_used.setdefault(node, set()).update(gpus)
            cpus_used[node] = cpus_used.get(node, 0.0) + bundle.get("CPU", 0.0)
    fitted = []
    for node in probe_nodes:
        if node.name not in cpus_used:
            continue
        gpus = len(gpus_used[node.name])
        cpus = max(math.ceil(cpus_used[node.name]) + 2, 4 * gpus)
        memory = max(32.0, (node.gpu_memory_gb or 64) * gpus + 4 * cpus)
        fitted.append(replace(node, gpus=gpus, cpus=cpus, memory_gb=memory))
    inventory = Inventory(fitted, source="sized from the recipe")
    try:
        make_plan(cfg, inventory)
    except PlacementError:
        return Inventory([n for n in probe_nodes if n.name in cpus_used], source="sized from the recipe")
    return inventory


def _custom_resources(cfg: RunConfig) -> dict[str, float]:
    total: dict[str, float] = {}
    for role in ROLES:
        rp = getattr(cfg.placement, role)
        for key, amount in rp.resources.items():
            total[key] = total.get(key, 0) + amount * rp.replicas
    return total


def _head_group(image: str) -> dict[str, Any]:
    return {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "ray-head",
                        "image": image,
                        "resources": _resources(HEAD_CPUS, HEAD_MEMORY_GB, 0),
                        "ports": [
                            {"containerPort": 6379, "name": "gcs-server"},
                            {"containerPort": 8265, "name": "dashboard"},
                            {"containerPort": 10001, "name": "client"},
                        ],
                    }
                ]
            }
        },
    }


def _resources(cpus: float, memory_gb: float, gpus: int) -> dict[str, dict[str, Any]]:
    limits: dict[str, Any] = {"cpu": f"{cpus:g}", "memory": f"{math.ceil(memory_gb)}Gi"}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"limits": limits, "requests": dict(limits)}


def _worker_groups(plan: Plan, image: str) -> list[dict[str, Any]]:
    """One group per (GPU type, node shape) among the nodes the plan uses."""
    used = {a.node for assignments in plan.assignments.values() for a in assignments}
    shapes: dict[str, tuple[Node, int]] = {}
    for node in plan.inventory.nodes:
        if node.name not in used:
            continue
        key = json.dumps(
            [node.gpu_type, node.gpus, node.cpus, node.memory_gb, node.resources, node.labels], sort_keys=True
        )
        first, count = shapes.get(key, (node, 0))
        shapes[key] = (first, count + 1)
    groups = []
    names: set[str] = set()
    for node, count in shapes.values():
        base = f"{(node.gpu_type or 'gpu').lower()}-workers" if node.gpus else "cpu-workers"
        group_name = _dns_name(base if base not in names else f"{base}-{len(names)}")
        names.add(group_name)
        start = {"num-cpus": f"{int(node.cpus)}"}
        if node.gpus:
            start["num-gpus"] = str(node.gpus)
        if node.resources:
            start["resources"] = shlex.quote(json.dumps(node.resources))
        pod: dict[str, Any] = {
            "containers": [
                {
                    "name": "ray-worker",
                    "image": image,
                    "resources": _resources(node.cpus, node.memory_gb, node.gpus),
                }
            ]
        }
        selector = dict(node.labels)
        if node.gpus and not selector and node.gpu_type in GPU_PRODUCTS:
            selector = {GPU_PRODUCT_LABEL: GPU_PRODUCTS[node.gpu_type]}
        if selector:
            pod["nodeSelector"] = selector
        if node.gpus:
            pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        groups.append(
            {
                "groupName": group_name,
                "replicas": count,
                "minReplicas": count,
                "maxReplicas": count,
                "rayStartParams": start,
                "template": {"spec": pod},
            }
        )
    return groups


def validate_manifest(manifest: dict[str, Any], crd_path: str | Path) -> None:
    """Checks `manifest` against the RayJob CRD's openAPIV3Schema (needs `jsonschema`).

    Kubernetes silently prunes unknown fields, so objects with declared properties are made
    closed (additionalProperties: false) unless marked x-kubernetes-preserve-unknown-fields:
    a misspelt field fails here instead of vanishing on the cluster. `x-kubernetes-int-or-string`
    fields already carry an `anyOf: [integer, string]` that jsonschema understands.
    """
    version = manifest.get("apiVersion", "ray.io/v1").split("/")[-1]
    _crd_validator(str(Path(crd_path).resolve()), version).validate(manifest)


@functools.lru_cache(maxsize=4)
def _crd_validator(crd_path: str, version: str):
    import jsonschema

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 25k lines: libyaml is ~10x faster
    with open(crd_path) as f:
        crd = yaml.load(f, Loader=loader)
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)
    return jsonschema.Draft7Validator(_closed(schema))


def _closed(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out
