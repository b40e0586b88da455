"""Weight sync, the sending side (learner ranks): pack each bucket and ship it over every channel.

`send_to_channels` is what a learner rank runs for one push (`trainer/learner.py`), `BackgroundSend`
the same on a thread while the rank trains on. An adapter push (LoRA, `spec.adapter` set) goes the
same way; its buckets hold only the adapter's tensors (`weight_buckets(..., adapter_only=True)`). The wire format and the transports are in
`rlhf.sync.wire`; the receiving side is `rlhf.sync.engine_side`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from datetime import timedelta

import torch

from rlhf.sync.wire import (
    NamedTensors,
    SyncPayload,
    SyncSpec,
    comm_device,
    join_group,
    pack_bucket,
    store_key,
)


class BucketSender:
    """One channel's sending side: `send` each bucket as the learner produces it, then `finish`."""

    def __init__(self, spec: SyncSpec):
        self.spec = spec
        self.payload = SyncPayload(spec.transport)
        self.device = comm_device(spec)
        self.group = None
        if spec.transport != "object_store":
            self.group = join_group(spec, 0, self.device)
            self.group.forget_previous_push()

    def send(self, bucket: NamedTensors) -> None:
        spec, group, payload = self.spec, self.group, self.payload
        if spec.adapter is not None:
            check_adapter_bucket(bucket)
        start = time.perf_counter()
        packed = pack_bucket(bucket, spec.dtype, self.device)
        sent = time.perf_counter()
        payload.add_time("pack", sent - start)
        index = payload.num_buckets
        if spec.transport == "object_store":
            import ray

            payload.refs.append(ray.put(packed))
        elif spec.transport == "broadcast":
            group.publish(store_key(spec, index), (packed.metas, packed.nbytes))
            group.broadcast(packed.buffer)
        else:  # cuda_ipc
            from torch.multiprocessing.reductions import reduce_tensor

            torch.cuda.current_stream().synchronize()
            group.publish(store_key(spec, index), (packed.metas, reduce_tensor(packed.buffer)))
            acks = [store_key(spec, index, f"/ack{r}") for r in range(1, spec.world_size)]
            group.store.wait(acks, timedelta(seconds=spec.timeout_s))
            group.sent_keys.extend(acks)
        payload.add_time("send", time.perf_counter() - sent)
        payload.num_bytes += packed.nbytes
        payload.num_tensors += len(packed.metas)
        payload.num_buckets += 1
        del packed  # cuda_ipc: the receivers have acknowledged, the buffer may go

    def finish(self) -> SyncPayload:
        if self.group is not None:
            self.group.publish(store_key(self.spec, self.payload.num_buckets), None)  # end of this push
        return self.payload


def is_adapter_tensor(name: str) -> bool:
    """A LoRA adapter tensor as PEFT names it (`...q_proj.lora_A.weight`, `...lora_embedding_B`)."""
    return ".lora_" in name


def check_adapter_bucket(bucket: NamedTensors) -> None:
    """An adapter push carries only adapter tensors: anything else means the learner sent full weights."""
    others = [name for name, _ in bucket if not is_adapter_tensor(name)]
    if others:
        raise ValueError(
            f"adapter push: {len(others)} tensor(s) are not LoRA adapter weights (e.g. {others[0]!r}); the "
            "learner must send named_weight_buckets(bucket_bytes, adapter_only=True) for adapter pushes"
        )


def weight_buckets(learner, bucket_bytes: int, adapter_only: bool = False):
    """What a learner rank sends in one push: its full weights (`named_weight_buckets(bucket_bytes)`,
    merged with its adapters in a LoRA run) or, `adapter_only`, the LoRA adapter's tensors alone."""
    if adapter_only:
        return learner.named_weight_buckets(bucket_bytes, adapter_only=True)
    return learner.named_weight_buckets(bucket_bytes)


def send_buckets(spec: SyncSpec, buckets: Iterable[NamedTensors]) -> SyncPayload:
    """Ship every bucket over one channel; returns the payload the engines' `receive_weights` take."""
    return send_to_channels([spec], buckets)[0]


def send_to_channels(specs: list[SyncSpec], buckets: Iterable[NamedTensors]) -> list[SyncPayload]:
    """One learner rank: ship every bucket over each of its channels (none: just drain `buckets`,
    which under ZeRO-3 is this rank's part of the all-gathers). One payload per spec."""
    senders = [BucketSender(spec) for spec in specs]
    gather_s = 0.0
    iterator = iter(buckets)
    while True:
        start = time.perf_counter()
        bucket = next(iterator, None)
        gather_s += time.perf_counter() - start
        if bucket is None:
            break
        for sender in senders:
            sender.send(bucket)
    payloads = [sender.finish() for sender in senders]
    for payload in payloads:
        payload.add_time("gather", gather_s)
    return payloads


class BackgroundSend:
    """`send_to_channels(specs, staged)` on a thread and, on a GPU, on a side stream: NCCL kernels
    waiting for a busy engine must not block the training kernels queued on the default stream.
    `staged` is a copy of the weights (buckets of named tensors), freed once sent."""

    def __init__(self, specs: list, staged: list, device: torch.device):
        self._payloads: list = []
        self._error: BaseException | None = None
        stream = None
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # the staging copies come first

        def run() -> None:
            try:
                if stream is None:
                    self._payloads = send_to_channels(specs, staged)
                    return
                with torch.cuda.device(device), torch.cuda.stream(stream):
                    self._payloads = send_to_channels(specs, staged)
                    stream.synchronize()
            except BaseException as exc:  # re-raised in result()
                self._error = exc
            finally:
                staged.clear()

        self._thread = threading.Thread(target=run, name="rlhf-weight-send", daemon=True)
        self._thread.start()

    def result(self) -> list:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._payloads
