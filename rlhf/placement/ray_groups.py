"""Ray placement groups that realise a plan: one per colocation group, actor options per replica.

This is the thin Ray layer; the planner itself is pure Python (no Ray): `rlhf.placement.plan`
(`make_plan`, `Plan`, `PlacementError`), `rlhf.placement.inventory` (inventories, model size) and
`rlhf.placement.propose` (`propose_plan`); `rlhf.placement` re-exports their public names.
"""

from __future__ import annotations

import contextlib
from typing import Any

from rlhf.config.schema import RunConfig
from rlhf.placement.inventory import PlacementError, inventory_from_ray
from rlhf.placement.memory import ENGINE_ROLES
from rlhf.placement.plan import Plan, _bundle_text, make_plan


class RayPlacement:
    """Creates one Ray placement group per colocation group and hands out actor options per replica."""

    def __init__(self, plan_or_cfg: Plan | RunConfig, timeout_s: float = 120.0, name_prefix: str = "rlhf"):
        import ray
        from ray.util.placement_group import placement_group

        if isinstance(plan_or_cfg, RunConfig):
            plan_or_cfg = make_plan(plan_or_cfg, inventory_from_ray())
        elif not ray.is_initialized():
            ray.init(ignore_reinit_error=True, log_to_driver=False)
        self.plan: Plan = plan_or_cfg
        self.groups = []
        try:
            for spec in self.plan.groups:
                pg = placement_group(spec.bundles, strategy=spec.strategy, name=f"{name_prefix}-{spec.name}")
                self.groups.append(pg)
            for spec, pg in zip(self.plan.groups, self.groups):
                try:
                    ray.get(pg.ready(), timeout=timeout_s)
                except ray.exceptions.GetTimeoutError:
                    available = {
                        k: round(v, 3) for k, v in ray.available_resources().items() if "node:" not in k
                    }
                    raise PlacementError(
                        f"{spec.key}: placement group {spec.name} not ready after {timeout_s:g}s: needs "
                        f"{_bundle_text(spec)}, cluster has free {available}"
                    ) from None
        except BaseException:
            self.remove()
            raise

    def actor_options(self, role: str) -> list[dict[str, Any]]:
        """One `ActorClass.options(**opts)` dict per replica/rank of `role`."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if role not in self.plan.assignments:
            raise PlacementError(
                f"placement.{role}: role is not active in this plan (active: {', '.join(self.plan.roles)})"
            )
        options = []
        for a in self.plan.assignments[role]:
            opts: dict[str, Any] = {
                "num_cpus": a.num_cpus,
                "num_gpus": a.num_gpus,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=self.groups[a.group],
                    placement_group_bundle_index=a.bundle,
                    placement_group_capture_child_tasks=True,
                ),
            }
            if a.resources:
                opts["resources"] = dict(a.resources)
            if role in ENGINE_ROLES and len(a.bundles) > 1:
                # A tensor-parallel engine: vLLM's Ray executor starts one worker per bundle of this
                # replica, each taking the role's share of that bundle's GPU (colocated: a fraction).
                share = self.plan.gpu_share.get(role, 1.0) or 1.0
                env = {
                    "VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, a.bundles)),
                    "VLLM_RAY_PER_WORKER_GPUS": f"{share:g}",
                }
                opts["runtime_env"] = {"env_vars": env}
            options.append(opts)
        return options

    def colocated(self, role_a: str, role_b: str) -> bool:
        return self.plan.colocated(role_a, role_b)

    def placement_group(self, role: str):
        """The role's placement group (vLLM's Ray executor places tensor-parallel workers in it)."""
        return self.groups[self.plan.assignments[role][0].group]

    def gpu_share(self, role: str) -> float:
        """Fraction of each GPU the role uses (e.g. for VLLM_RAY_PER_WORKER_GPUS); 0 on CPU."""
        return self.plan.gpu_share.get(role, 0.0) if self.plan.device == "cuda" else 0.0

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups:
            with contextlib.suppress(Exception):  # the cluster may already be gone at shutdown
                remove_placement_group(pg)
        self.groups = []

    def __enter__(self) -> RayPlacement:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
