"""Placement: which role runs where.

The planner is pure Python (no Ray): `plan` (`make_plan`, `Plan`), `inventory` (inventories, model
size, `PlacementError`), `memory` (peak GPU and host memory per role), `propose` (`propose_plan`); `ray_groups` realises a plan as Ray placement
groups; `k8s` writes it as a KubeRay RayJob. The public names are re-exported here.
"""

from __future__ import annotations

from rlhf.placement.inventory import (
    BUILTIN_PARAMS,
    GPU_SPECS,
    Inventory,
    Node,
    NodeSpec,
    PlacementError,
    estimate_params,
    inventory_from_ray,
    learner_bytes_per_param,
    load_inventory,
    local_inventory,
    params_from_hf_config,
)
from rlhf.placement.memory import ENGINE_ROLES, GPU_OVERHEAD_GB, RoleMemory, engine_memory, learner_memory
from rlhf.placement.plan import (
    CPU_RESERVE_FRACTION,
    ROLES,
    Assignment,
    GroupSpec,
    Plan,
    active_roles,
    make_plan,
)
from rlhf.placement.propose import gpu_score, overrides_to_args, propose_plan
from rlhf.placement.ray_groups import RayPlacement

__all__ = [
    "BUILTIN_PARAMS",
    "CPU_RESERVE_FRACTION",
    "ENGINE_ROLES",
    "GPU_OVERHEAD_GB",
    "RoleMemory",
    "engine_memory",
    "learner_memory",
    "GPU_SPECS",
    "ROLES",
    "Assignment",
    "GroupSpec",
    "Inventory",
    "Node",
    "NodeSpec",
    "PlacementError",
    "Plan",
    "RayPlacement",
    "active_roles",
    "estimate_params",
    "gpu_score",
    "inventory_from_ray",
    "learner_bytes_per_param",
    "load_inventory",
    "local_inventory",
    "make_plan",
    "overrides_to_args",
    "params_from_hf_config",
    "propose_plan",
]
