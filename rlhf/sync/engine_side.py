"""Weight sync, the receiving side (inside each vLLM worker): every bucket of a push, one at a time.

`receive_buckets` is called by `rlhf.sync.engine_extension` with the model's loader. The wire format
and the transports are in `rlhf.sync.wire`; the sending side is `rlhf.sync.learner_side`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from rlhf.sync.wire import (
    NamedTensors,
    PackedBucket,
    SyncPayload,
    SyncSpec,
    bucket_on,
    comm_device,
    join_group,
    store_key,
    unpack_bucket,
)


def _rebuild_ipc_tensor(handle: tuple, device: torch.device) -> torch.Tensor:
    """Open a CUDA IPC handle made by `reduce_tensor` on this process's view of the same GPU."""
    rebuild, args = handle
    args = list(args)
    # storage_device: the sender's device index need not be ours (different CUDA_VISIBLE_DEVICES)
    args[6] = device.index if device.index is not None else torch.cuda.current_device()
    return rebuild(*args)


def receive_buckets(
    spec: SyncSpec,
    payload: SyncPayload | list | None,
    load_weights: Callable[[NamedTensors], Any],
    device: torch.device | str | None = None,
    rank: int = 1,
    load_bucket: Callable[[PackedBucket, NamedTensors], Any] | None = None,
) -> dict[str, int]:
    """One engine worker: feed every bucket of this push to `load_weights`, one bucket at a time.

    `payload` is the sender's `SyncPayload` (object_store: refs) or a list of ObjectRefs /
    `PackedBucket`s; it is ignored by broadcast and cuda_ipc, which read the store instead.
    `rank` is this worker's rank in its channel (planned by `rlhf.sync.routes`).
    `load_bucket(packed, tensors)`, if given, is called instead of `load_weights(tensors)`: it also
    sees the bucket's buffer and layout (the tensors are views into it), which the replay path needs.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    stats = {"num_bytes": 0, "num_tensors": 0, "num_buckets": 0, "load_s": 0.0, "wait_s": 0.0}

    def load(packed: PackedBucket) -> None:
        start = time.perf_counter()
        packed = bucket_on(packed, device)
        tensors = unpack_bucket(packed)
        if load_bucket is None:
            load_weights(tensors)
        else:
            load_bucket(packed, tensors)
        stats["load_s"] += time.perf_counter() - start
        stats["num_bytes"] += packed.nbytes
        stats["num_tensors"] += len(packed.metas)
        stats["num_buckets"] += 1

    if spec.transport == "object_store":
        items = payload.refs if isinstance(payload, SyncPayload) else payload
        if items is None:
            raise ValueError("object_store weight sync needs the sender's payload (the bucket refs)")
        for item in items:
            if not isinstance(item, PackedBucket):
                import ray

                item = ray.get(item)
            load(item)
        return stats

    if not 1 <= rank < spec.world_size:
        raise ValueError(f"weight sync receiver rank {rank} outside 1..{spec.world_size - 1}")
    buffer_device = comm_device(spec, device)
    group = join_group(spec, rank, buffer_device)
    index = 0
    while True:
        start = time.perf_counter()
        message = group.fetch(store_key(spec, index))
        stats["wait_s"] += time.perf_counter() - start  # the sender producing the bucket, and the store
        if message is None:
            break
        metas, extra = message
        if spec.transport == "broadcast":
            buffer = torch.empty(extra, dtype=torch.uint8, device=buffer_device)
            group.broadcast(buffer)
            load(PackedBucket(metas, buffer))
        else:  # cuda_ipc: `extra` is the IPC handle of the sender's buffer
            # Copy out (device to device) and release the sender at once: vLLM's layerwise
            # reload may hold on to the loaded views until a whole layer has arrived.
            buffer = _rebuild_ipc_tensor(extra, buffer_device).clone()
            torch.cuda.current_stream().synchronize()
            group.store.set(store_key(spec, index, f"/ack{rank}"), b"1")
            load(PackedBucket(metas, buffer))
        index += 1
    return stats


# ----------------------------------------------------------------------------------------------
# LoRA: adapter-only pushes

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_directory(prefix: str = "rlhf-lora-") -> str:
    """A fresh directory for one pushed adapter: in /dev/shm (memory) where there is one."""
    import os
    import tempfile

    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def write_adapter(directory: str, tensors: NamedTensors, config: dict) -> int:
    """Save an adapter the way PEFT's `save_pretrained` does (adapter_config.json +
    adapter_model.safetensors, tensors under their PEFT state-dict names), which vLLM's LoRA loader
    reads. Returns the bytes of the tensors written."""
    import json
    import os

    from safetensors.torch import save_file

    if not tensors:
        raise ValueError("adapter push: no tensors received")
    names = [name for name, _ in tensors]
    if len(set(names)) != len(names):
        raise ValueError("adapter push: a tensor name came twice")
    not_lora = [name for name in names if ".lora_" not in name]
    if not_lora:
        raise ValueError(
            f"adapter push: {len(not_lora)} tensor(s) are not LoRA weights (e.g. {not_lora[0]!r}); "
            "only lora_A / lora_B tensors can be served as an adapter"
        )
    state = {name: t.detach().to("cpu").contiguous() for name, t in tensors}
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f)
    return sum(t.numel() * t.element_size() for t in state.values())


def receive_adapter(
    spec: SyncSpec,
    payload: SyncPayload | list | None,
    directory: str | None,
    device: torch.device | str | None = None,
    rank: int = 1,
    keep: bool = False,
) -> tuple[dict[str, Any], NamedTensors]:
    """One receiver of an adapter push: every bucket of the push (`receive_buckets`). With
    `directory` the tensors are written there in PEFT format with the spec's adapter config; with
    `keep` they are returned as copies on `device` (for an in-place swap into the engine's LoRA
    layers). A tensor-parallel engine's workers that do neither take part in the transport (a
    broadcast needs every member) and drop what they received. Returns (stats, tensors kept)."""
    if spec.adapter is None:
        raise ValueError("receive_adapter: the push is not an adapter push (spec.adapter is None)")
    received: NamedTensors = []

    def collect(tensors: NamedTensors) -> None:
        if keep:  # the views die with their bucket: copy out
            received.extend((name, t.detach().clone()) for name, t in tensors)
        elif directory is not None:
            received.extend((name, t.detach().to("cpu", copy=True)) for name, t in tensors)

    stats: dict[str, Any] = dict(receive_buckets(spec, payload, collect, device=device, rank=rank))
    if directory is not None:
        start = time.perf_counter()
        stats["adapter_bytes"] = write_adapter(directory, received, spec.adapter)
        stats["adapter_tensors"] = len(received)
        stats["write_s"] = time.perf_counter() - start
    return stats, received


def swap_adapter(worker, lora_id: int, tensors, config: dict) -> None:
    """Replace, in one vLLM worker, the weights of the LoRA adapter it serves as `lora_id` with
    `tensors` (PEFT names, on the worker's device), without a file: the worker's LoRA manager builds
    the adapter from the tensors as its file loader would (`LoRAModel.from_lora_tensors`: names
    mapped, q/k/v and gate/up packed, this worker's tensor-parallel shard taken) and activates it in
    the same slot under the same id."""
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager  # vLLM's WorkerLoRAManager
    adapters = manager._adapter_manager
    if lora_id not in adapters.list_adapters():
        raise RuntimeError(f"adapter {lora_id} is not registered in this worker")
    peft = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": manager.max_position_embeddings})
    peft.validate_legal(manager.lora_config)
    model = adapters.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    device = tensors[0][1].device if tensors else "cpu"
    lora = manager._lora_model_cls.from_lora_tensors(
        lora_model_id=lora_id,
        tensors=dict(tensors),
        peft_helper=peft,
        device=str(device),
        dtype=manager.lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size,
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
        skip_prefixes=getattr(model, "lora_skip_prefixes", None),
    )
    adapters.remove_adapter(lora_id)
    adapters.add_adapter(lora)
    adapters.activate_adapter(lora_id)
