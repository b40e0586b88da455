"""The inputs of a plan: what the cluster has (an inventory) and how big the model is.

Pure Python, no Ray at import time: `inventory_from_ray()` imports Ray only when it is called.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Dense bf16 TFLOPs and memory of common data-centre GPUs, for the cost model and live inventories.
GPU_SPECS: dict[str, tuple[float, float]] = {  # type: (memory GB, TFLOPs)
    "B200": (180, 2250),
    "H200": (141, 989),
    "H100": (80, 989),
    "A100": (80, 312),
    "L40S": (48, 362),
    "L40": (48, 181),
    "A10G": (24, 125),
    "L4": (24, 121),
    "V100": (32, 125),
    "T4": (16, 65),
}
BUILTIN_PARAMS = {"smollm2-135m-instruct": 135e6}


class PlacementError(ValueError):
    """The recipe's roles do not fit the cluster; one line naming the role and the config key."""


# ----------------------------------------------------------------------------------------------
# Inventory
# ----------------------------------------------------------------------------------------------


@dataclass
class NodeSpec:
    """One machine (or `count` identical machines) of an inventory file."""

    name: str = "node"
    count: int = 1
    cpus: float = 8
    memory_gb: float = 32
    gpus: int = 0
    gpu_type: str | None = None  # Ray accelerator type: "H100", "L4", ...
    gpu_memory_gb: float | None = None  # None: looked up from gpu_type
    gpu_tflops: float | None = None  # None: looked up from gpu_type
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    labels: dict[str, str] = field(default_factory=dict)  # Kubernetes nodeSelector for `rlhf k8s`


@dataclass
class Node:
    name: str
    cpus: float
    memory_gb: float
    gpus: int = 0
    gpu_type: str | None = None
    gpu_memory_gb: float = 0.0  # 0: unknown (memory is not checked)
    gpu_tflops: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Inventory:
    nodes: list[Node]
    source: str = "<inventory>"

    @property
    def total_gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    def gpu_counts(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for node in self.nodes:
            if node.gpus:
                counts[node.gpu_type or "GPU"] += node.gpus
        return dict(counts)

    def summary(self) -> str:
        gpus = ", ".join(f"{t} x{c}" for t, c in self.gpu_counts().items()) or "no GPUs"
        cpus = sum(n.cpus for n in self.nodes)
        return f"{self.source}: {len(self.nodes)} node(s), {cpus:g} CPUs, {gpus}"


def _gpu_spec(gpu_type: str | None) -> tuple[float, float]:
    return GPU_SPECS.get((gpu_type or "").upper(), (0.0, 0.0))


def _node_from_spec(spec: NodeSpec, name: str) -> Node:
    memory, tflops = _gpu_spec(spec.gpu_type)
    return Node(
        name=name,
        cpus=spec.cpus,
        memory_gb=spec.memory_gb,
        gpus=spec.gpus,
        gpu_type=spec.gpu_type,
        gpu_memory_gb=spec.gpu_memory_gb if spec.gpu_memory_gb is not None else memory,
        gpu_tflops=spec.gpu_tflops if spec.gpu_tflops is not None else tflops,
        resources=dict(spec.resources),
        labels=dict(spec.labels),
    )


def load_inventory(path: str | os.PathLike) -> Inventory:
    """Reads an inventory YAML: `nodes: [{name, count, cpus, memory_gb, gpus, gpu_type, ...}]`."""
    from rlhf.config.loader import ConfigError, _Builder

    path = Path(path)
    shown = str(path)
    if not path.is_file():
        raise ConfigError(f"{shown}: inventory file not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("nodes"), list) or not raw["nodes"]:
        raise ConfigError(f"{shown}: nodes: must be a non-empty list of nodes")
    unknown = set(raw) - {"nodes", "description"}
    if unknown:
        raise ConfigError(f"{shown}: {sorted(unknown)[0]}: unknown key; valid keys: nodes, description")
    specs = _Builder({}, shown).build(list[NodeSpec], raw["nodes"], "nodes")
    nodes = []
    for i, spec in enumerate(specs):
        for key, ok in (("count", spec.count >= 1), ("cpus", spec.cpus > 0), ("gpus", spec.gpus >= 0)):
            if not ok:
                raise ConfigError(f"{shown}: nodes[{i}].{key}: must be positive (got {getattr(spec, key)!r})")
        if spec.gpus and not spec.gpu_type:
            raise ConfigError(f"{shown}: nodes[{i}].gpu_type: required when gpus > 0 (e.g. H100, L4)")
        for k in range(spec.count):
            nodes.append(_node_from_spec(spec, f"{spec.name}-{k}" if spec.count > 1 else spec.name))
    return Inventory(nodes, source=shown)


def _short_gpu_type(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100' (Ray's accelerator_type naming)."""
    words = device_name.replace("NVIDIA", "").replace("Tesla", "").split()
    return words[0].split("-")[0].upper() if words else "GPU"


def local_inventory() -> Inventory:
    """This machine as a one-node inventory."""
    import psutil
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    node = Node(name="local", cpus=float(cpus), memory_gb=psutil.virtual_memory().total / 1e9)
    if torch.cuda.is_available() and torch.cuda.device_count():
        props = torch.cuda.get_device_properties(0)
        node.gpus = torch.cuda.device_count()
        node.gpu_type = _short_gpu_type(props.name)
        node.gpu_memory_gb = props.total_memory / 2**30
        node.gpu_tflops = _gpu_spec(node.gpu_type)[1]
    return Inventory([node], source="local machine")


def inventory_from_ray() -> Inventory:
    """The live Ray cluster (connects with `ray.init()` when needed, honouring RAY_ADDRESS)."""
    import ray

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    nodes = []
    for info in ray.nodes():
        if not info.get("Alive", True):
            continue
        res = dict(info.get("Resources", {}))
        gpu_type = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None)
        memory, tflops = _gpu_spec(gpu_type)
        custom = {
            k: v
            for k, v in res.items()
            if k not in ("CPU", "GPU", "memory", "object_store_memory")
            and not k.startswith(("node:", "accelerator_type:"))
        }
        nodes.append(
            Node(
                name=info.get("NodeName") or info.get("NodeManagerAddress") or info.get("NodeID", "?")[:8],
                cpus=float(res.get("CPU", 0)),
                # Ray splits the node's memory into task memory and its object store (shared
                # memory): the processes the planner counts can use both.
                memory_gb=(float(res.get("memory", 0)) + float(res.get("object_store_memory", 0))) / 1e9,
                gpus=int(res.get("GPU", 0)),
                gpu_type=gpu_type if res.get("GPU") else None,
                gpu_memory_gb=memory,
                gpu_tflops=tflops,
                resources=custom,
                labels=dict(info.get("Labels") or {}),
            )
        )
    return Inventory(nodes, source=f"ray cluster {os.environ.get('RAY_ADDRESS', 'local')}")


# ----------------------------------------------------------------------------------------------
# Model size and memory estimates
# ----------------------------------------------------------------------------------------------


def estimate_params(model_path: str | None) -> float | None:
    """Parameter count from a local HF config.json, a built-in name, or a size in the name ('7B')."""
    if not model_path:
        return None
    config_file = Path(model_path).expanduser() / "config.json"
    if config_file.is_file():
        try:
            return params_from_hf_config(json.loads(config_file.read_text()))
        except (KeyError, TypeError, ValueError):
            pass
    if model_path in BUILTIN_PARAMS:
        return BUILTIN_PARAMS[model_path]
    from rlhf.data.shapes import MODEL_SHAPES

    if model_path in MODEL_SHAPES:  # a shape name: plan before the checkpoint exists
        return params_from_hf_config(MODEL_SHAPES[model_path])
    match = re.search(r"(\d+(?:\.\d+)?)\s*([bBmM])(?![a-zA-Z])", Path(model_path).name)
    if match:
        return float(match.group(1)) * (1e9 if match.group(2).lower() == "b" else 1e6)
    return None


def model_shape(model_path: str | None) -> dict[str, Any] | None:
    """The size fields of the model's config (a local config.json or a shape name), or None."""
    if not model_path:
        return None
    from rlhf.data.shapes import MODEL_SHAPES

    if model_path in MODEL_SHAPES:
        return dict(MODEL_SHAPES[model_path])
    config_file = Path(model_path).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    try:
        hf = json.loads(config_file.read_text())
    except (ValueError, OSError):
        return None
    if isinstance(hf, dict):
        hf = hf.get("text_config", hf)  # multimodal configs keep the language model's fields inside
    needed = ("hidden_size", "num_hidden_layers", "vocab_size")
    return hf if isinstance(hf, dict) and all(isinstance(hf.get(k), int) for k in needed) else None


def params_from_hf_config(hf: dict[str, Any]) -> float:
    """Decoder-only transformer (Llama/Qwen/Mistral shape): embeddings + layers (+ untied head)."""
    hidden = hf["hidden_size"]
    layers = hf["num_hidden_layers"]
    vocab = hf["vocab_size"]
    inter = hf.get("intermediate_size", 4 * hidden)
    heads = hf.get("num_attention_heads", 1)
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hidden // heads
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * inter
    per_layer = attention + mlp + 2 * hidden
    head = 0 if hf.get("tie_word_embeddings", False) else vocab * hidden
    return float(vocab * hidden + layers * per_layer + hidden + head)


def learner_bytes_per_param(zero_stage: int, ranks: int, offload_optimizer: bool) -> float:
    """Mixed-precision Adam: 2 B weights + 2 B grads + 12 B fp32 master/m/v; ZeRO shards over ranks."""
    weights, grads, optim = 2.0, 2.0, 0.0 if offload_optimizer else 12.0
    if zero_stage >= 1:
        optim /= ranks
    if zero_stage >= 2:
        grads /= ranks
    if zero_stage >= 3:
        weights /= ranks
    return weights + grads + optim
