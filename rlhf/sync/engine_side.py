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
