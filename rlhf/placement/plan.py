"""Where every role runs: the pure planner (no Ray import).

Planning is separate from Ray so that `rlhf plan` can check a recipe against a cluster description
(an inventory YAML) on a laptop, and so that "does not fit" fails before any model is loaded.
Inventories and model-size estimates live in `rlhf.placement.inventory`, proposing a placement for
a cluster in `rlhf.placement.propose`, the Ray placement groups that realise a plan in
`rlhf.placement.ray_groups`.

Model of a plan:
* Roles: rollout, learner, reference (kl_coef > 0, not with LoRA: the policy with its adapters off), critic (critic.enabled), reward_model
  (a `kind: model` reward source), evaluation (evaluation.separate_engines; engines like rollout's).
  Each role has `replicas` (engines or DeepSpeed ranks).
* Each colocation group (or lone role) becomes one Ray placement group. On GPU, a colocated group
  gets one bundle per GPU of its pool and every role takes a fractional share of each GPU; a lone
  role gets one bundle per GPU of each replica (a fraction of one GPU when `gpus` < 1).
* On CPU every replica gets a small CPU-only bundle, scaled so all roles fit on a laptop's cores.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field

from rlhf.config.schema import RolePlacement, RunConfig
from rlhf.placement.inventory import (
    Inventory,
    PlacementError,
    estimate_params,
    inventory_from_ray,
    local_inventory,
)
from rlhf.placement.memory import (
    ENGINE_ROLES,
    check_gpu_memory,
    check_host_memory_on_cpu,
    estimate_memory,
    memory_by_gpu,
    memory_by_host,
    note_lora_reference,
    rollout_sleeps,
)

ROLES = ("rollout", "learner", "reference", "critic", "reward_model", "evaluation")
# Groups holding the trained model go first: they are the biggest and least flexible.
_ROLE_ORDER = {"learner": 0, "critic": 1, "reference": 2, "reward_model": 3, "rollout": 4, "evaluation": 5}
# On CPU, reserve at most this fraction of the cores for role actors (the driver and Ray need some).
CPU_RESERVE_FRACTION = 0.75


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


@dataclass
class Assignment:
    role: str
    replica: int
    node: str
    gpus: list[int]  # GPU indices on the node ([] on CPU)
    num_gpus: float  # what the actor asks Ray for (a fraction when colocated)
    num_cpus: float
    group: int  # index into Plan.groups
    bundle: int  # first bundle of this replica in the group's placement group
    bundles: list[int]  # all bundles of this replica (tensor-parallel engines span several)
    memory_gb: float | None = None  # estimated peak GPU memory per GPU of this replica (CPU: host)
    resident_gb: float | None = None  # GPU memory it keeps while the roles sharing its GPU compute
    host_gb: float | None = None  # estimated host memory of this replica (GPU runs)
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class GroupSpec:
    name: str  # "learner" or "rollout+learner"
    roles: list[str]
    key: str  # config key for messages
    strategy: str
    bundles: list[dict[str, float]]
    bundle_nodes: list[str]
    accelerator_type: str | None = None
    bundle_gpus: list[list[int]] = field(default_factory=list)  # GPU indices on its node per bundle


@dataclass
class Plan:
    device: str
    roles: list[str]
    groups: list[GroupSpec]
    assignments: dict[str, list[Assignment]]
    inventory: Inventory
    params: float | None = None
    gpu_share: dict[str, float] = field(default_factory=dict)  # role -> fraction of each GPU it uses
    rollout_sleeps: bool = False  # engines release memory while the learners train (time-sharing)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        size = f"~{_human(self.params)} params" if self.params else "size unknown (memory not checked)"
        lines = [f"device: {self.device}   model: {size}", f"inventory: {self.inventory.summary()}", ""]
        cuda = self.device == "cuda"
        mem_header = ("peak/GPU", "host") if cuda else ("host mem",)
        header = ("role", "replica", "node", "gpu", "num_gpus", "num_cpus", *mem_header, "group")
        rows = [header]
        for role in self.roles:
            for a in self.assignments[role]:
                gpu = ",".join(map(str, a.gpus)) if a.gpus else "-"
                mem = [f"~{a.memory_gb:.1f} GB" if a.memory_gb is not None else "-"]
                if cuda:
                    mem.append(f"~{a.host_gb:.0f} GB" if a.host_gb is not None else "-")
                rows.append(
                    (
                        role,
                        str(a.replica),
                        a.node,
                        gpu,
                        f"{a.num_gpus:g}",
                        f"{a.num_cpus:g}",
                        *mem,
                        self.groups[a.group].name,
                    )
                )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        usage = self.gpu_memory_usage()
        if usage:
            lines.append("")
            same: dict[tuple[str, str], list[int]] = {}  # (node, usage text) -> GPUs
            for (node, gpu), (used, total) in sorted(usage.items()):
                cap = f" / {total:.0f} GB" if total else ""
                same.setdefault((node, f"~{used:.1f} GB{cap}"), []).append(gpu)
            for (node, text), gpus in same.items():
                lines.append(
                    f"{node} gpu {','.join(map(str, gpus))}: {text} each"
                    if len(gpus) > 1
                    else f"{node} gpu {gpus[0]}: {text}"
                )
            for node, (used, total) in sorted(memory_by_host(self).items()):
                cap = f" / {total:.0f} GB" if total else ""
                lines.append(f"{node} host memory: ~{used:.0f} GB{cap}")
        lines.append("")
        for i, g in enumerate(self.groups):
            lines.append(
                f"placement group {i} ({g.name}): {g.strategy}, {len(g.bundles)} bundle(s) {_bundle_text(g)}"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def has_role(self, role: str) -> bool:
        return role in self.assignments

    def colocated(self, role_a: str, role_b: str) -> bool:
        """True when both roles are active and share one placement group (and GPUs on cuda)."""
        if not (self.has_role(role_a) and self.has_role(role_b)):
            return False
        return self.assignments[role_a][0].group == self.assignments[role_b][0].group

    def gpu_memory_usage(self) -> dict[tuple[str, int], tuple[float, float]]:
        """(node, gpu) -> (estimated peak GB, capacity GB)."""
        return memory_by_gpu(self)

    def gpu_types(self) -> dict[str, int]:
        """GPU type -> number of GPUs the plan uses."""
        used: set[tuple[str, int]] = set()
        for assignments in self.assignments.values():
            for a in assignments:
                used.update((a.node, g) for g in a.gpus)
        nodes = {n.name: n for n in self.inventory.nodes}
        return dict(Counter(nodes[node].gpu_type or "GPU" for node, _ in used))


def _human(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _bundle_text(group: GroupSpec) -> str:
    counts = Counter(json.dumps(b, sort_keys=True) for b in group.bundles)
    return ", ".join(f"{c} x {b}" for b, c in counts.items())


def active_roles(cfg: RunConfig) -> list[str]:
    roles = ["rollout", "learner"]
    if cfg.algorithm.kl_coef > 0 and cfg.trainer.lora.rank <= 0:  # LoRA: the policy with adapters off
        roles.append("reference")
    if cfg.trainer.critic.enabled:
        roles.append("critic")
    if any(s.kind == "model" for s in cfg.reward.sources):
        roles.append("reward_model")
    if cfg.evaluation.separate_engines:
        roles.append("evaluation")
    return roles


def _groups(cfg: RunConfig, roles: list[str]) -> list[tuple[list[str], str]]:
    """Colocation groups of active roles (lone roles form their own group), biggest first."""
    groups: list[tuple[list[str], str]] = []
    placed: set[str] = set()
    for i, group in enumerate(cfg.placement.colocate):
        members = [r for r in group if r in roles]
        if members:
            key = f"placement.colocate[{i}]" if len(members) > 1 else f"placement.{members[0]}"
            groups.append((members, key))
            placed.update(members)
    groups += [([r], f"placement.{r}") for r in roles if r not in placed]
    return sorted(groups, key=lambda g: min(_ROLE_ORDER[r] for r in g[0]))


def _replica_gpus(cfg: RunConfig, role: str, rp: RolePlacement) -> int:
    """Whole GPUs one replica spans (its footprint)."""
    if rp.gpus >= 1:
        return int(rp.gpus)
    if rp.gpus > 0:
        return 1
    return cfg.rollout.tensor_parallel if role in ENGINE_ROLES else 1


class _Free:
    """Mutable free capacity of the inventory while bundles are placed."""

    def __init__(self, inventory: Inventory):
        self.nodes = inventory.nodes
        self.cpus = [n.cpus for n in inventory.nodes]
        self.gpu_free = [[1.0] * n.gpus for n in inventory.nodes]
        self.resources = [dict(n.resources) for n in inventory.nodes]

    def fits(self, i: int, bundle: dict[str, float], gpu_type: str | None) -> list[int] | None:
        """GPU indices the bundle would take on node i, or None if it does not fit."""
        node = self.nodes[i]
        if bundle.get("CPU", 0) > self.cpus[i] + 1e-9:
            return None
        for name, amount in bundle.items():
            if name in ("CPU", "GPU") or name.startswith("accelerator_type:"):
                continue
            if self.resources[i].get(name, 0) + 1e-9 < amount:
                return None
        need = bundle.get("GPU", 0)
        if need <= 0:
            return []
        if gpu_type and (node.gpu_type or "").upper() != gpu_type.upper():
            return None
        if need >= 1:
            whole = [g for g, free in enumerate(self.gpu_free[i]) if free >= 1 - 1e-9]
            return whole[: int(need)] if len(whole) >= need else None
        # Fractional: the fullest GPU that still has room (packs shares tightly).
        candidates = [g for g, free in enumerate(self.gpu_free[i]) if free + 1e-9 >= need]
        return [min(candidates, key=lambda g: self.gpu_free[i][g])] if candidates else None

    def take(self, i: int, bundle: dict[str, float], gpus: list[int]) -> None:
        self.cpus[i] -= bundle.get("CPU", 0)
        for name, amount in bundle.items():
            if name in self.resources[i]:
                self.resources[i][name] -= amount
        need = bundle.get("GPU", 0)
        for g in gpus:
            self.gpu_free[i][g] -= min(1.0, need)


def make_plan(cfg: RunConfig, inventory: Inventory | None = None, param_count: float | None = None) -> Plan:
    """Assigns every replica of every active role to a node (and GPUs); raises PlacementError.

    Without an inventory: the connected Ray cluster if Ray is initialised, else this machine.
    """
    if inventory is None:
        ray = sys.modules.get("ray")
        inventory = inventory_from_ray() if ray is not None and ray.is_initialized() else local_inventory()
    device = cfg.placement.device
    if device == "auto":
        device = "cuda" if inventory.total_gpus > 0 else "cpu"
    if device == "cuda" and inventory.total_gpus == 0:
        raise PlacementError(f"placement.device: cuda but {inventory.source} has no GPUs")

    roles = active_roles(cfg)
    params = param_count if param_count is not None else estimate_params(cfg.model.path)
    plan = Plan(
        device=device,
        roles=roles,
        groups=[],
        assignments={r: [] for r in roles},
        inventory=inventory,
        params=params,
    )
    free = _Free(inventory)
    cpu_scale = _cpu_scale(cfg, roles, inventory) if device == "cpu" else 1.0
    if cpu_scale < 1:
        plan.notes.append(
            f"CPU reservations scaled by {cpu_scale:.2f} so all roles share this machine's cores"
        )

    placed_names: list[str] = []
    for members, key in _groups(cfg, roles):
        group_index = len(plan.groups)
        if device == "cpu":
            spec, slots = _cpu_group(cfg, members, key, cpu_scale)
        else:
            spec, slots = _gpu_group(cfg, members, key, plan)
        _place_bundles(spec, free, inventory, placed_names)
        for role, replica, bundles, num_gpus, num_cpus in slots:
            node = spec.bundle_nodes[bundles[0]]
            gpus = [g for b in bundles for g in spec.bundle_gpus[b]]
            plan.assignments[role].append(
                Assignment(
                    role=role,
                    replica=replica,
                    node=node,
                    gpus=gpus,
                    num_gpus=num_gpus,
                    num_cpus=num_cpus,
                    group=group_index,
                    bundle=bundles[0],
                    bundles=bundles,
                    resources=dict(getattr(cfg.placement, role).resources),
                )
            )
        plan.groups.append(spec)
        placed_names.append(spec.name)

    if device == "cuda":
        plan.rollout_sleeps = rollout_sleeps(cfg, plan)
        estimate_memory(cfg, plan)
        check_gpu_memory(cfg, plan)
    elif params is not None:
        check_host_memory_on_cpu(cfg, plan, params)
    note_lora_reference(cfg, plan)
    return plan


def _cpu_scale(cfg: RunConfig, roles: list[str], inventory: Inventory) -> float:
    demand = sum(getattr(cfg.placement, r).replicas * getattr(cfg.placement, r).cpus for r in roles)
    budget = CPU_RESERVE_FRACTION * sum(n.cpus for n in inventory.nodes)
    return 1.0 if demand <= budget or demand == 0 else budget / demand


def _cpu_group(cfg: RunConfig, members: list[str], key: str, scale: float):
    bundles: list[dict[str, float]] = []
    slots = []
    for role in members:
        rp: RolePlacement = getattr(cfg.placement, role)
        cpus = round(max(0.01, rp.cpus * scale), 4)
        for replica in range(rp.replicas):
            slots.append((role, replica, [len(bundles)], 0.0, cpus))
            bundles.append({"CPU": cpus, **rp.resources})
    strategy = getattr(cfg.placement, members[0]).strategy
    return GroupSpec("+".join(members), members, key, strategy, bundles, []), slots


def _gpu_group(cfg: RunConfig, members: list[str], key: str, plan: Plan):
    pl = cfg.placement
    types = {getattr(pl, r).accelerator_type for r in members} - {None}
    if len(types) > 1:
        raise PlacementError(
            f"{key}: colocated roles ask for different accelerator types ({', '.join(sorted(types))})"
        )
    accelerator = types.pop() if types else None
    strategy = next((getattr(pl, r).strategy for r in members if getattr(pl, r).strategy != "PACK"), "PACK")
    footprint = {r: _replica_gpus(cfg, r, getattr(pl, r)) for r in members}
    extra: dict[str, float] = {f"accelerator_type:{accelerator}": 0.001} if accelerator else {}
    bundles: list[dict[str, float]] = []
    slots = []

    if len(members) == 1:
        role = members[0]
        rp: RolePlacement = getattr(pl, role)
        share = rp.gpus if 0 < rp.gpus < 1 else 1.0
        plan.gpu_share[role] = share
        for replica in range(rp.replicas):
            first = len(bundles)
            for k in range(footprint[role]):
                cpus = rp.cpus if k == 0 else 0.01
                bundles.append({"CPU": cpus, "GPU": share, **(rp.resources if k == 0 else {}), **extra})
            indices = list(range(first, len(bundles)))
            # A tensor-parallel engine leaves its GPUs to the workers vLLM starts in its bundles.
            slots.append((role, replica, indices, share if footprint[role] == 1 else 0.0, rp.cpus))
    else:
        explicit = {r: getattr(pl, r).gpus for r in members if 0 < getattr(pl, r).gpus < 1}
        rest = [r for r in members if r not in explicit]
        left = 1.0 - sum(explicit.values())
        if rest and left <= 1e-9:
            raise PlacementError(f"{key}: explicit gpu fractions leave nothing for {', '.join(rest)}")
        shares = {**explicit, **{r: round(left / len(rest), 4) for r in rest}}
        plan.gpu_share.update(shares)
        pool = max(getattr(pl, r).replicas * footprint[r] for r in members)
        bundles = [{"CPU": 0.0, "GPU": 1.0, **extra} for _ in range(pool)]
        for role in members:
            rp = getattr(pl, role)
            for replica in range(rp.replicas):
                indices = list(range(replica * footprint[role], (replica + 1) * footprint[role]))
                bundles[indices[0]]["CPU"] += rp.cpus
                for name, amount in rp.resources.items():
                    bundles[indices[0]][name] = bundles[indices[0]].get(name, 0) + amount
                num_gpus = shares[role] if footprint[role] == 1 else 0.0
                slots.append((role, replica, indices, num_gpus, rp.cpus))
        for b in bundles:
            b["CPU"] = round(max(b["CPU"], 0.01), 4)
    spec = GroupSpec("+".join(members), members, key, strategy, bundles, [], accelerator)
    return spec, slots


def _place_bundles(spec: GroupSpec, free: _Free, inventory: Inventory, placed: list[str]) -> None:
    """First-fit of the group's bundles onto nodes, honouring the Ray strategy."""
    n_nodes = len(inventory.nodes)
    bundle_gpus: list[list[int]] = []
    nodes_used: list[int] = []
    order = list(range(n_nodes))
    if spec.strategy == "STRICT_PACK":
        for i in order:
            trial = _Free.__new__(_Free)
            trial.nodes, trial.cpus = free.nodes, list(free.cpus)
            trial.gpu_free = [list(g) for g in free.gpu_free]
            trial.resources = [dict(r) for r in free.resources]
            got = []
            for b in spec.bundles:
                gpus = trial.fits(i, b, spec.accelerator_type)
                if gpus is None:
                    break
                trial.take(i, b, gpus)
                got.append(gpus)
            if len(got) == len(spec.bundles):
                for b, gpus in zip(spec.bundles, got):
                    free.take(i, b, gpus)
                spec.bundle_nodes = [inventory.nodes[i].name] * len(got)
                spec.bundle_gpus = got
                return
        raise _no_fit(spec, spec.bundles[0], inventory, free, placed, strict="on one node (STRICT_PACK)")

    cursor = 0
    for b in spec.bundles:
        if spec.strategy in ("SPREAD", "STRICT_SPREAD"):
            candidates = order[cursor:] + order[:cursor]
        else:
            candidates = order
        chosen = None
        for i in candidates:
            if spec.strategy == "STRICT_SPREAD" and i in nodes_used:
                continue
            gpus = free.fits(i, b, spec.accelerator_type)
            if gpus is not None:
                chosen = (i, gpus)
                break
        if chosen is None:
            strict = "on distinct nodes (STRICT_SPREAD)" if spec.strategy == "STRICT_SPREAD" else ""
            raise _no_fit(spec, b, inventory, free, placed, strict=strict)
        i, gpus = chosen
        free.take(i, b, gpus)
        nodes_used.append(i)
        bundle_gpus.append(gpus)
        cursor = (i + 1) % n_nodes
    spec.bundle_nodes = [inventory.nodes[i].name for i in nodes_used]
    spec.bundle_gpus = bundle_gpus


def _no_fit(
    spec, bundle, inventory: Inventory, free: _Free, placed: list[str], strict: str = ""
) -> PlacementError:
    key, total_bundles = spec.key, len(spec.bundles)
    if spec.roles and len(spec.roles) > 1:
        key = f"{key} ({', '.join(spec.roles)})"
    cluster = ", ".join(f"{t}: {c}" for t, c in inventory.gpu_counts().items()) or "no GPUs"
    gpu_need = math.ceil(sum(b.get("GPU", 0) for b in spec.bundles) - 1e-9)
    if gpu_need:
        typ = spec.accelerator_type
        of_type = f" of type {typ}" if typ else ""
        matching = [
            i
            for i, n in enumerate(inventory.nodes)
            if n.gpus and (not typ or (n.gpu_type or "").upper() == typ.upper())
        ]
        have = sum(inventory.nodes[i].gpus for i in matching)
        free_now = sum(sum(1 for f in free.gpu_free[i] if f >= 1 - 1e-9) for i in matching)
        if have < gpu_need:
            return PlacementError(
                f"{key}: needs {gpu_need} GPUs{of_type} but the cluster has {have} ({cluster})"
            )
        if free_now < gpu_need and placed:
            return PlacementError(
                f"{key}: needs {gpu_need} GPUs{of_type} but only {free_now} are free after placing "
                f"{', '.join(placed)} ({cluster}); colocate roles or lower replicas"
            )
    need_cpu = bundle.get("CPU", 0)
    if need_cpu > max(free.cpus, default=0) + 1e-9:
        most = max((n.cpus for n in inventory.nodes), default=0)
        return PlacementError(
            f"{key}: a bundle needs {need_cpu:g} CPUs but the most free on one node is "
            f"{max(free.cpus, default=0):g} (largest node has {most:g}); lower cpus"
        )
    for name, amount in bundle.items():
        if name in ("CPU", "GPU") or name.startswith("accelerator_type:"):
            continue
        have_res = sum(n.resources.get(name, 0) for n in inventory.nodes)
        if have_res + 1e-9 < amount * total_bundles:
            return PlacementError(
                f"{key}.resources.{name}: needs {amount * total_bundles:g} in total but the cluster has {have_res:g}"
            )
    detail = f" {strict}" if strict else ""
    return PlacementError(
        f"{key}: cannot place {total_bundles} bundle(s) {_bundle_text(spec)}{detail} ({cluster})"
    )
