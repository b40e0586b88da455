"""Peak memory of each role on GPU runs, per GPU and on the host, before anything starts.

Learners (policy, critic), bf16 with fp32 Adam (what `trainer/ds_config.py` builds), P parameters,
R ranks, ZeRO stage s:

* states: 2P weights (/R at s=3), 2P gradients (/R at s>=2), 12P fp32 master weights and Adam
  moments (/R at s>=1) on the GPU, or pinned in host memory with `trainer.offload_optimizer`
  (DeepSpeed's CPU Adam; the fp32 gradient partition goes with them), `trainer.offload_ratio` of
  them with partial offload;
* the optimizer step adds the fp32 gradient partition (4P, /R at s>=1), after the activations are
  freed;
* one micro-batch of `trainer.micro_batch_tokens` tokens keeps its activations for the backward:
  16 h + 4 kv + 8 i bytes per token and layer (h hidden size, kv the key/value width, i the MLP's
  intermediate size: the tensors a Llama-style block saves, the norms' inputs in float32, q/k/v and
  the attention output, the SwiGLU's four intermediates), or with `trainer.gradient_checkpointing`
  each layer's input (2h bytes) plus one layer recomputed; and its logits, 4 bytes per token and
  vocabulary entry (bf16 logits and their gradient) plus the float32 chunks of the log-prob kernels.
  These are counts, not fits: the benchmark prints the measured peaks beside them.

A colocated vLLM engine takes `rollout.gpu_memory_utilization` of the GPU while it generates and
about `ENGINE_ASLEEP_GB` while it sleeps (`rollout.sleep_level` 1: its weights wait in host memory;
2: they are discarded). While the engine
generates, a learner keeps what PyTorch's caching allocator reserved at its training peak; with
`trainer.release_cache_before_wake` only its weights and GPU-resident optimizer states, and with
`trainer.offload_during_generation` nothing (they wait in host memory).

Without the model's shape (a size read from a name) activations and logits are left out.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlhf.config.schema import RunConfig, TrainerConfig
from rlhf.placement.inventory import PlacementError, estimate_params, learner_bytes_per_param, model_shape

if TYPE_CHECKING:
    from rlhf.placement.plan import Plan

# Roles that are vLLM engines (footprint of `rollout.tensor_parallel` GPUs, memory of a KV cache).
ENGINE_ROLES = ("rollout", "evaluation")

# Spare memory per GPU for the CUDA context, allocator fragmentation and small buffers.
GPU_OVERHEAD_GB = 2.0
# Host memory of one role process (Python, torch, Ray worker, CUDA host state).
HOST_BASE_GB = 3.0
# The driver process and Ray's own daemons, on the node that runs the driver (the inventory's first).
DRIVER_HOST_GB = 2.0
# What a sleeping vLLM engine keeps on its GPU (CUDA graphs, context).
ENGINE_ASLEEP_GB = 1.0
# Tokens per float32 chunk of the log-prob/entropy kernels (rlhf.algorithms.losses).
LOGPROB_CHUNK_TOKENS = 1024
GB = 1e9
# A GPU's memory as inventories carry it (the vendor's "141 GB", torch's total_memory / 2**30) is in
# GiB; the plan counts bytes / 1e9, and vLLM's gpu_memory_utilization is a share of the bytes.
GPU_GB_PER_STATED = 2**30 / GB


@dataclass
class RoleMemory:
    """GB of one replica: its GPU peak while it computes, what it keeps on the GPU while the roles it
    shares the GPU with compute (learners while engines generate; a sleeping engine while learners
    train), and its host memory."""

    peak_gpu_gb: float | None
    resident_gpu_gb: float | None
    host_gb: float | None


def activation_bytes_per_token(shape: dict[str, Any], checkpointing: bool) -> float:
    """Bytes one token of a micro-batch keeps for the backward pass, over all layers."""
    hidden = shape["hidden_size"]
    inter = shape.get("intermediate_size", 4 * hidden)
    layers = shape["num_hidden_layers"]
    heads = shape.get("num_attention_heads", 1)
    kv = (shape.get("num_key_value_heads") or heads) * (shape.get("head_dim") or hidden // heads)
    per_layer = 16.0 * hidden + 4.0 * kv + 8.0 * inter
    if checkpointing:
        return layers * 2.0 * hidden + per_layer
    return layers * per_layer


def logits_bytes(shape: dict[str, Any], tokens: int, backward: bool = True) -> float:
    """The logits of `tokens` tokens (bf16, and their gradient) and the kernels' float32 chunks."""
    vocab = shape["vocab_size"]
    return tokens * vocab * (4.0 if backward else 2.0) + 2 * LOGPROB_CHUNK_TOKENS * vocab * 4.0


# LoRA adapter parameters per unit of rank of each projection a Llama-style block has (h hidden,
# kv key/value width, i intermediate size): rank x (inputs + outputs).
_LORA_SHAPES = {
    "q_proj": ("h", "h"),
    "k_proj": ("h", "kv"),
    "v_proj": ("h", "kv"),
    "o_proj": ("h", "h"),
    "gate_proj": ("h", "i"),
    "up_proj": ("h", "i"),
    "down_proj": ("i", "h"),
}


def adapter_params(params: float, shape: dict[str, Any] | None, lora) -> float:
    """Parameters of the LoRA adapters (`trainer.lora`) on a model of that shape; without a shape 1 %
    of the model."""
    if not shape:
        return 0.01 * params
    hidden = shape["hidden_size"]
    heads = shape.get("num_attention_heads", 1)
    sizes = {
        "h": hidden,
        "kv": (shape.get("num_key_value_heads") or heads) * (shape.get("head_dim") or hidden // heads),
        "i": shape.get("intermediate_size", 4 * hidden),
    }
    targets = set(_LORA_SHAPES) if "all-linear" in lora.target_modules else set(lora.target_modules)
    per_layer = sum(sizes[a] + sizes[b] for name, (a, b) in _LORA_SHAPES.items() if name in targets)
    return float(lora.rank * per_layer * shape["num_hidden_layers"])


def learner_memory(
    params: float,
    shape: dict[str, Any] | None,
    trainer: TrainerConfig,
    ranks: int,
    trainable: bool = True,
    lora: bool = False,
) -> RoleMemory:
    """Peak GPU, GPU kept during generation, and host GB of one learner rank (`trainable` False: the
    frozen reference, weights only; `lora`: frozen weights, gradients and optimizer states for the
    adapters of `trainer.lora` only)."""
    stage = trainer.zero_stage
    offloaded = trainer.offload_ratio if trainer.offload_optimizer else 0.0  # share on the host
    weights = 2.0 * params / (ranks if stage >= 3 else 1)
    tokens = trainer.micro_batch_tokens
    if not trainable:
        work = logits_bytes(shape, tokens, backward=False) if shape else 0.0
        peak = (weights + work) / GB + GPU_OVERHEAD_GB / 2
        return RoleMemory(peak, weights / GB, HOST_BASE_GB)
    trained = params
    if lora:
        trained = adapter_params(params, shape, trainer.lora)
        weights += 2.0 * trained / (ranks if stage >= 3 else 1)
    grads = 2.0 * trained / (ranks if stage >= 2 else 1)
    optim_share = ranks if stage >= 1 else 1
    states = 12.0 * trained / optim_share
    step_grads = 4.0 * trained / optim_share  # the fp32 gradient partition of the optimizer step
    gpu_states = states * (1.0 - offloaded)
    work = 0.0
    if shape:
        work = tokens * activation_bytes_per_token(shape, trainer.gradient_checkpointing)
        work += logits_bytes(shape, tokens)
    step = step_grads * (1.0 - offloaded)
    peak = (weights + grads + gpu_states + max(work, step)) / GB + GPU_OVERHEAD_GB
    host = HOST_BASE_GB + offloaded * (states + step_grads) / GB
    if stage >= 3 and offloaded > 0:
        # DeepSpeed's stage 3 with `offload_optimizer` (runtime/zero/stage3.py) also pins, in host
        # memory, every parameter's gradient partition in the training dtype (one flat buffer), and
        # makes each sub-group's fp32 gradient buffer pinned on the host before moving those of the
        # GPU's sub-groups: their blocks stay in torch's caching host allocator. Without these two
        # the 7B plan was 27 % under the measured host peak.
        host += (2.0 + 4.0 * (1.0 - offloaded)) * trained / optim_share / GB
    resident = peak  # the allocator keeps the blocks of the training peak for the next step
    if trainer.release_cache_before_wake or trainer.offload_during_generation:
        # ZeRO-3 keeps its gradient partitions allocated between steps (measured: a 7B learner
        # held its bf16 gradients beside its weights and states while the engine generated).
        resident = (weights + gpu_states + (grads if stage >= 3 else 0.0)) / GB
    if trainer.offload_during_generation:
        host += resident
        resident = 0.0
    return RoleMemory(peak, resident, host)


def engine_memory(
    params: float | None, utilization: float, gpu_gb: float, tp: int, sleeps: bool, sleep_level: int = 1
) -> RoleMemory:
    """A vLLM engine per GPU: its share of the GPU awake; asleep, its weights wait on the host (level 1)
    or are gone (level 2)."""
    weights_host = (2.0 * params / tp / GB) if (sleeps and params and sleep_level == 1) else 0.0
    asleep = ENGINE_ASLEEP_GB if sleeps else utilization * gpu_gb
    return RoleMemory(utilization * gpu_gb, asleep, HOST_BASE_GB + weights_host)


# ---------------------------------------------------------------------------------------------- a plan
def check_host_memory_on_cpu(cfg: RunConfig, plan: Plan, params: float) -> None:
    """On CPU everything is fp32 in host RAM: learner weights+grads+Adam, engine weights + KV cache."""
    nodes = {n.name: n for n in plan.inventory.nodes}
    kv_fraction = cfg.rollout.gpu_memory_utilization or 0.1
    per_node: Counter[str] = Counter()
    for role in plan.roles:
        ranks = getattr(cfg.placement, role).replicas
        for a in plan.assignments[role]:
            if role in ("learner", "critic"):
                gb = params * learner_bytes_per_param(cfg.trainer.zero_stage, ranks, False) * 2 / 1e9  # fp32
            elif role in ENGINE_ROLES:
                gb = params * 4 / 1e9 + kv_fraction * nodes[a.node].memory_gb
            else:
                gb = params * 4 / 1e9
            a.memory_gb = gb
            per_node[a.node] += gb
    for node, used in per_node.items():
        if used > nodes[node].memory_gb:
            role = max(
                plan.roles, key=lambda r: sum(a.memory_gb or 0 for a in plan.assignments[r] if a.node == node)
            )
            raise PlacementError(
                f"placement.{role}: the roles need ~{used:.0f} GB of host RAM for a {params / 1e9:.1f}B-parameter model "
                f"on CPU but {node} has {nodes[node].memory_gb:.0f} GB; use a smaller model.path"
            )
    plan.notes.append(
        "CPU memory: learner fp32 weights+grads+Adam, engine fp32 weights + KV cache "
        f"({kv_fraction:g} x host RAM); mem column is host GB per replica"
    )


def estimate_memory(cfg: RunConfig, plan: Plan) -> None:
    """GPU and host GB of each replica (rlhf/placement/memory.py); engines take a fixed fraction."""
    params, shape = plan.params, model_shape(cfg.model.path)
    pl = cfg.placement
    colocated_rollout = any("rollout" in g.roles and len(g.roles) > 1 for g in plan.groups)
    nodes = {n.name: n for n in plan.inventory.nodes}
    for role in plan.roles:
        ranks = getattr(pl, role).replicas
        for a in plan.assignments[role]:
            gpu_mem = nodes[a.node].gpu_memory_gb * GPU_GB_PER_STATED
            if role in ENGINE_ROLES:
                util = cfg.rollout.gpu_memory_utilization or (0.45 if colocated_rollout else 0.85)
                sleeps = plan.rollout_sleeps and role == "rollout"
                m = engine_memory(
                    params, util, gpu_mem or 0.0, cfg.rollout.tensor_parallel, sleeps, cfg.rollout.sleep_level
                )
                if not gpu_mem:
                    m = RoleMemory(None, None, m.host_gb)
            elif params is None:
                m = RoleMemory(None, None, None)
            elif role in ("learner", "critic"):
                lora = role == "learner" and cfg.trainer.lora.rank > 0
                m = learner_memory(params, shape, cfg.trainer, ranks, lora=lora)
            elif role == "reference":
                m = learner_memory(params, shape, cfg.trainer, ranks, trainable=False)
            else:  # reward_model
                rm_path = next((s.path for s in cfg.reward.sources if s.kind == "model"), None)
                rm_gb = (estimate_params(rm_path) or params) * 2 / 1e9 + GPU_OVERHEAD_GB / 2
                m = RoleMemory(rm_gb, rm_gb, HOST_BASE_GB)
            a.memory_gb, a.resident_gb, a.host_gb = m.peak_gpu_gb, m.resident_gpu_gb, m.host_gb


def note_lora_reference(cfg: RunConfig, plan: Plan) -> None:
    """With LoRA and a KL term the reference is the policy with its adapters off: say what that saves."""
    if cfg.trainer.lora.rank <= 0 or cfg.algorithm.kl_coef <= 0 or not plan.params:
        return
    ranks = cfg.placement.reference.replicas
    shape = model_shape(cfg.model.path)
    ref = learner_memory(plan.params, shape, cfg.trainer, ranks, trainable=False)
    saved = f"~{ref.peak_gpu_gb:.1f} GB of GPU memory per replica" if plan.device == "cuda" else "its weights"
    plan.notes.append(
        f"LoRA: the reference is the policy with its adapters switched off: no reference replicas "
        f"({saved} saved)"
    )


def rollout_sleeps(cfg: RunConfig, plan: Plan) -> bool:
    sleeps = cfg.rollout.sleep_between_steps
    colocated = any("rollout" in g.roles and len(g.roles) > 1 for g in plan.groups)
    return colocated if sleeps is None else sleeps


def memory_by_gpu(plan: Plan) -> dict[tuple[str, int], tuple[float, float]]:
    """Peak per GPU over the two phases of a colocated step: engines generating (the other roles keep
    what is resident) and the other roles computing (engines keep what they keep asleep)."""
    if plan.device != "cuda":
        return {}
    nodes = {n.name: n for n in plan.inventory.nodes}
    generating: Counter[tuple[str, int]] = Counter()
    computing: Counter[tuple[str, int]] = Counter()
    for role in plan.roles:
        engine = role in ENGINE_ROLES
        for a in plan.assignments[role]:
            if a.memory_gb is None:
                continue
            for g in a.gpus:
                generating[(a.node, g)] += a.memory_gb if engine else a.resident_gb
                computing[(a.node, g)] += a.resident_gb if engine else a.memory_gb
    return {
        key: (max(generating[key], computing[key]), nodes[key[0]].gpu_memory_gb * GPU_GB_PER_STATED)
        for key in set(generating) | set(computing)
    }


def memory_by_host(plan: Plan) -> dict[str, tuple[float, float]]:
    """Host GB per node (every replica is a process of its own, the driver and Ray's daemons on the
    first node) and the node's memory."""
    nodes = {n.name: n for n in plan.inventory.nodes}
    used: Counter[str] = Counter()
    if plan.inventory.nodes:
        used[plan.inventory.nodes[0].name] += DRIVER_HOST_GB
    for role in plan.roles:
        for a in plan.assignments[role]:
            used[a.node] += a.host_gb or 0.0
    return {node: (gb, nodes[node].memory_gb) for node, gb in used.items()}


def check_gpu_memory(cfg: RunConfig, plan: Plan) -> None:
    tp = cfg.rollout.tensor_parallel
    for a in plan.assignments["rollout"]:
        if plan.params and a.memory_gb is not None:
            weights = plan.params * 2 / 1e9 / tp
            if weights > 0.9 * a.memory_gb:
                raise PlacementError(
                    f"placement.rollout: bf16 weights ~{weights:.1f} GB per GPU (tensor_parallel={tp}) do not fit "
                    f"the engine's ~{a.memory_gb:.1f} GB (gpu_memory_utilization x GPU memory) with room for a KV "
                    f"cache; raise rollout.tensor_parallel or rollout.gpu_memory_utilization"
                )
    for (node, gpu), (used, total) in sorted(memory_by_gpu(plan).items()):
        if not total or used <= total:
            continue
        on_gpu = [(r, a) for r in plan.roles for a in plan.assignments[r] if a.node == node and gpu in a.gpus]
        role, _ = max(on_gpu, key=lambda ra: ra[1].memory_gb or 0)
        parts = ", ".join(f"{r} ~{a.memory_gb:.1f}" for r, a in on_gpu if a.memory_gb)
        gpu_type = next(n.gpu_type for n in plan.inventory.nodes if n.name == node)
        raise PlacementError(
            f"placement.{role}: needs ~{used:.1f} GB on {node} gpu {gpu} ({parts}) but a {gpu_type} has "
            f"{total:.0f} GB; {_memory_hint(cfg, plan)}"
        )
    for node, (used, total) in sorted(memory_by_host(plan).items()):
        if not total or used <= total:
            continue
        on_node = [(r, a) for r in plan.roles for a in plan.assignments[r] if a.node == node and a.host_gb]
        role, _ = max(on_node, key=lambda ra: ra[1].host_gb or 0)
        parts = ", ".join(f"{r} ~{a.host_gb:.0f}" for r, a in on_node)
        raise PlacementError(
            f"placement.{role}: needs ~{used:.0f} GB of host memory on {node} ({parts}) but it has "
            f"{total:.0f} GB; {_memory_hint(cfg, plan)}"
        )


# Settings tried, in order, when the roles do not fit: the first that fits is named. Partial offload
# keeps as much of the optimizer on the GPU as fits (the smallest host share first: the fastest step).
_FULL_OFFLOAD = {"trainer.offload_optimizer": True, "trainer.gradient_checkpointing": True}
_PARTIAL_OFFLOAD = [
    {
        "trainer.zero_stage": 3,
        "trainer.offload_optimizer": True,
        "trainer.offload_ratio": ratio,
        "trainer.gradient_checkpointing": True,
        "trainer.release_cache_before_wake": True,
        **extra,
    }
    for extra in ({}, {"rollout.sleep_level": 2})
    for ratio in (0.25, 0.5, 0.75, 1.0)
]
_MEMORY_FIXES = (
    {"trainer.gradient_checkpointing": True},
    {"trainer.offload_optimizer": True},
    _FULL_OFFLOAD,
    *_PARTIAL_OFFLOAD,
)


def _set(cfg: RunConfig, dotted: str, value: Any) -> bool:
    """Set `dotted` on `cfg`; whether it changed."""
    section, key = dotted.split(".")
    target = getattr(cfg, section)
    changed = getattr(target, key) != value
    setattr(target, key, value)
    return changed


def _memory_hint(cfg: RunConfig, plan: Plan) -> str:
    """The first settings that make the plan fit (GPU and host), as `key=value`s; otherwise what else
    can help."""
    for fix in _MEMORY_FIXES:
        trial_cfg, trial = copy.deepcopy(cfg), copy.deepcopy(plan)
        changed = [key for key, value in fix.items() if _set(trial_cfg, key, value)]
        if not changed:
            continue
        estimate_memory(trial_cfg, trial)
        gpu = memory_by_gpu(trial)
        host = memory_by_host(trial)
        if all(not t or u <= t for u, t in gpu.values()) and all(not t or u <= t for u, t in host.values()):
            keys = [f"{k}={str(fix[k]).lower()}" for k in changed]
            keys = ", ".join(keys[:-1]) + " and " + keys[-1] if len(keys) > 1 else keys[0]
            peak = max((u for u, _ in gpu.values()), default=0.0)
            host_peak = max((u for u, _ in host.values()), default=0.0)
            return f"set {keys} (then ~{peak:.0f} GB per GPU, ~{host_peak:.0f} GB host)"
    return (
        "add learner replicas, use trainer.zero_stage=3, trainer.offload_optimizer=true (trainer.offload_ratio) "
        "or trainer.gradient_checkpointing=true, lower trainer.micro_batch_tokens or "
        "rollout.gpu_memory_utilization, or use GPUs or hosts with more memory"
    )
