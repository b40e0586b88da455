"""Weight sync, what both sides share: the spec, the wire format and the store-backed group.

Three transports share one wire format, a `PackedBucket` (one flat uint8 buffer + per-tensor
metadata), so the engine pays one copy per bucket whatever the transport:

* `object_store`: rank 0 `ray.put`s every packed bucket and returns the ObjectRefs; each engine
  fetches them bucket by bucket. Works everywhere (the CPU default); costs one host copy.
* `broadcast`: a dedicated collective group (gloo on CPU, NCCL on GPU) of learner rank 0 (rank 0)
  and every vLLM worker of every engine (ranks 1..). The driver hosts the `TCPStore` used for
  rendezvous and for the per-bucket metadata, so the group is independent of the learners'
  training group and of vLLM's own groups.
* `cuda_ipc`: learner rank and engine worker share one GPU; the rank hands out CUDA IPC handles of
  each packed bucket through the store and waits for the receivers' acknowledgements before freeing
  it. A colocated run on N GPUs has N such channels, one per GPU, running in parallel.

Which rank feeds which worker over which transport is planned in `rlhf.sync.routes` (a "channel"
is one sender and its receivers; each gets its own `SyncSpec` and store prefix). The sending side
is `rlhf.sync.learner_side`, the receiving side `rlhf.sync.engine_side`.

Groups are created lazily on the first send / receive of a spec, which the driver
(`WeightSync.push`) always starts on both sides at once, so the handshake cannot deadlock.
See docs/weight_sync.md.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rlhf.sync.routes import TRANSPORTS

logger = logging.getLogger(__name__)

NamedTensors = list[tuple[str, torch.Tensor]]
ENGINE_RELOADS = ("auto", "direct", "replay", "layerwise")
_ALIGN = 64  # byte alignment of every tensor inside a packed buffer (any dtype view stays legal)


# ----------------------------------------------------------------------------------------------
# Spec and wire format


@dataclass(frozen=True)
class SyncSpec:
    """Everything both sides need to agree on; small and picklable (it travels with every call)."""

    transport: str
    bucket_bytes: int
    dtype: str | None = None  # cast floating tensors to this before sending (the engine's dtype)
    host: str | None = None  # driver-hosted TCPStore (broadcast, cuda_ipc)
    port: int | None = None
    world_size: int = 1  # 1 sender + every vLLM worker of every engine
    workers_per_engine: int = 1  # tensor-parallel size of each engine
    backend: str = "gloo"  # broadcast: "gloo" (CPU tensors) or "nccl" (CUDA tensors)
    group: str = "rlhf-weight-sync"  # key prefix inside the store
    version: int = 0  # push counter: namespaces the store keys of one push
    timeout_s: float = 600.0
    # How an engine worker writes the weights (see rlhf.sync.engine_extension.reload_mode): "direct"
    # (each parameter's own loader, straight into the live tensors), "replay" (direct once per bucket
    # layout, then its recorded copies replayed: rlhf.sync.engine_replay), "layerwise" (vLLM's
    # layer-wise reload, which redoes post-load processing), "auto" (replay where nothing is
    # post-processed).
    engine_reload: str = "auto"
    # LoRA: None for a push of full weights (what `model.load_weights` takes); for an adapter push
    # the PEFT adapter config (adapter_config.json as a dict) and the push carries only the adapter's
    # tensors, named as PEFT saves them. The engine serves them as a vLLM LoRA adapter.
    adapter: dict | None = None

    @property
    def is_adapter(self) -> bool:
        return self.adapter is not None


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix
    offset: int  # byte offset inside the bucket buffer
    nbytes: int


@dataclass
class PackedBucket:
    """One bucket flattened into a single uint8 buffer (a tensor, or `bytes` after a pickle hop)."""

    metas: list[TensorMeta]
    buffer: torch.Tensor | bytes

    @property
    def nbytes(self) -> int:
        return len(self.buffer) if isinstance(self.buffer, bytes) else self.buffer.numel()


@dataclass
class SyncPayload:
    """What `send_buckets` returns: the object-store refs (if any) and what was sent."""

    transport: str
    refs: list[Any] = field(default_factory=list)  # object_store: one ObjectRef per PackedBucket
    num_bytes: int = 0
    num_tensors: int = 0
    num_buckets: int = 0
    # sender-side seconds: "gather" (producing the buckets: ZeRO-3 all-gathers, casts), "pack"
    # (flattening), "send" (broadcast, or cuda_ipc waiting for the receivers' acks)
    timings: dict[str, float] = field(default_factory=dict)

    def add_time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds


def as_spec(spec: SyncSpec | dict) -> SyncSpec:
    """vLLM's multiprocess engine serialises collective_rpc arguments: a SyncSpec may arrive as a dict."""
    return spec if isinstance(spec, SyncSpec) else SyncSpec(**spec)


def make_spec(
    transport: str,
    bucket_bytes: int,
    *,
    dtype: str | torch.dtype | None = None,
    host: str | None = None,
    port: int | None = None,
    num_engines: int = 1,
    workers_per_engine: int = 1,
    backend: str | None = None,
    group: str = "rlhf-weight-sync",
    timeout_s: float = 600.0,
    engine_reload: str = "auto",
    adapter: dict | None = None,
) -> SyncSpec:
    """Validated `SyncSpec`; `backend` defaults to gloo (use "nccl" for GPU broadcast)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"sync.transport: unknown transport {transport!r}; expected one of {TRANSPORTS}")
    if bucket_bytes <= 0:
        raise ValueError(f"sync.bucket_mb must be positive, got {bucket_bytes} bytes")
    if num_engines < 1 or workers_per_engine < 1:
        raise ValueError(
            f"weight sync needs at least one engine worker, got {num_engines}x{workers_per_engine}"
        )
    backend = backend or "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight sync backend must be 'gloo' or 'nccl', got {backend!r}")
    if engine_reload not in ENGINE_RELOADS:
        raise ValueError(f"sync.engine_reload: expected one of {ENGINE_RELOADS}, got {engine_reload!r}")
    if transport in ("broadcast", "cuda_ipc") and (host is None or port is None):
        raise ValueError(f"sync transport {transport!r} needs the store host and port")
    if adapter is not None and not isinstance(adapter, dict):
        raise ValueError(
            f"weight sync adapter config must be a dict (adapter_config.json), got {type(adapter)}"
        )
    world_size = 1 + num_engines * workers_per_engine
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"weight sync dtype {dtype!r} is not a torch dtype")
    return SyncSpec(
        transport=transport,
        bucket_bytes=int(bucket_bytes),
        dtype=dtype,
        host=host,
        port=port,
        world_size=world_size,
        workers_per_engine=workers_per_engine,
        backend=backend,
        group=group,
        timeout_s=timeout_s,
        engine_reload=engine_reload,
        adapter=adapter,
    )


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[NamedTensors]:
    """Group (name, tensor) pairs into lists of at most `bucket_bytes` (a bigger tensor goes alone)."""
    bucket: NamedTensors = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def pack_bucket(
    bucket: Iterable[tuple[str, torch.Tensor]],
    dtype: str | None = None,
    device: torch.device | str | None = None,
) -> PackedBucket:
    """Copy a bucket into one contiguous uint8 buffer on `device` (default: the tensors' device)."""
    target = getattr(torch, dtype) if dtype else None
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, t in bucket:
        t = t.detach()
        if target is not None and t.is_floating_point() and t.dtype != target:
            t = t.to(target)
        tensors.append((name, t))
    if not tensors:
        raise ValueError("pack_bucket: empty bucket")
    device = torch.device(device) if device is not None else tensors[0][1].device
    metas, offset = [], 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        metas.append(TensorMeta(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), offset, nbytes))
        offset = _align(offset + nbytes)
    buffer = torch.empty(offset, dtype=torch.uint8, device=device)
    for meta, (_, t) in zip(metas, tensors):
        if meta.nbytes:
            buffer[meta.offset : meta.offset + meta.nbytes].copy_(
                t.contiguous().reshape(-1).view(torch.uint8)
            )
    return PackedBucket(metas, buffer)


def bucket_on(packed: PackedBucket, device: torch.device | str | None = None) -> PackedBucket:
    """The same bucket with its buffer a tensor on `device` (default: where it is)."""
    buffer = packed.buffer
    if isinstance(buffer, bytes | bytearray | memoryview):
        buffer = torch.frombuffer(bytearray(buffer), dtype=torch.uint8)
    if device is not None and buffer.device != torch.device(device):
        buffer = buffer.to(device)
    return packed if buffer is packed.buffer else PackedBucket(packed.metas, buffer)


def unpack_bucket(packed: PackedBucket, device: torch.device | str | None = None) -> NamedTensors:
    """Views into the packed buffer (moved to `device` first); consumers copy them into params."""
    packed = bucket_on(packed, device)
    buffer = packed.buffer
    out = []
    for meta in packed.metas:
        flat = buffer[meta.offset : meta.offset + meta.nbytes].view(getattr(torch, meta.dtype))
        out.append((meta.name, flat.view(meta.shape)))
    return out


def bucket_to_bytes(packed: PackedBucket) -> PackedBucket:
    """Same bucket with a `bytes` buffer: survives any serializer (vLLM's multiprocess RPC)."""
    if isinstance(packed.buffer, bytes):
        return packed
    return PackedBucket(packed.metas, packed.buffer.cpu().numpy().tobytes())


# ----------------------------------------------------------------------------------------------
# The store-backed group (broadcast, cuda_ipc)


def store_key(spec: SyncSpec, bucket: int, suffix: str = "") -> str:
    """Store key of bucket `bucket` of the spec's push (with `suffix`: a receiver's acknowledgement)."""
    return f"v{spec.version}/b{bucket}{suffix}"


class _SyncGroup:
    """One rank's membership: a client of the driver's TCPStore plus, for broadcast, a collective."""

    def __init__(self, spec: SyncSpec, rank: int, device: torch.device):
        self.rank = rank
        self.device = device
        timeout = timedelta(seconds=spec.timeout_s)
        base = dist.TCPStore(spec.host, spec.port, is_master=False, timeout=timeout, wait_for_workers=False)
        self.store = dist.PrefixStore(f"{spec.group}/", base)
        self.comm: Any = None
        self.sent_keys: list[str] = []  # rank 0: keys of the previous push, deleted on the next one
        if spec.transport != "broadcast":
            return
        if spec.backend == "gloo":
            self.comm = dist.ProcessGroupGloo(
                dist.PrefixStore("gloo/", self.store), rank, spec.world_size, timeout
            )
        else:
            # vLLM's own NCCL wrapper: it is what vLLM workers are built to run next to.
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup

            group = StatelessProcessGroup(
                rank=rank, world_size=spec.world_size, store=dist.PrefixStore("nccl/", self.store)
            )
            self.comm = PyNcclCommunicator(group, device=device)

    def broadcast(self, tensor: torch.Tensor) -> None:
        if isinstance(self.comm, dist.ProcessGroupGloo):
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self.comm.broadcast([tensor], opts).wait()
        else:
            self.comm.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
            torch.cuda.current_stream().synchronize()

    def publish(self, key: str, obj: Any) -> None:
        self.store.set(key, pickle.dumps(obj))
        self.sent_keys.append(key)

    def fetch(self, key: str) -> Any:
        return pickle.loads(self.store.get(key))

    def forget_previous_push(self) -> None:
        for key in self.sent_keys:
            self.store.delete_key(key)
        self.sent_keys = []


_GROUPS: dict[tuple, _SyncGroup] = {}


def comm_device(spec: SyncSpec, device: torch.device | str | None = None) -> torch.device:
    """Where the bucket buffers live: the GPU for NCCL / CUDA IPC, host memory otherwise."""
    if spec.transport == "cuda_ipc" or (spec.transport == "broadcast" and spec.backend == "nccl"):
        device = torch.device(device) if device is not None else torch.device("cuda")
        if device.type != "cuda":
            raise ValueError(
                f"sync transport {spec.transport}/{spec.backend} needs a CUDA device, got {device}"
            )
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def join_group(spec: SyncSpec, rank: int, device: torch.device | str | None = None) -> _SyncGroup:
    """This process's membership of the spec's group (created once; blocks until all ranks join)."""
    key = (spec.host, spec.port, spec.group, rank)
    if key not in _GROUPS:
        start = time.perf_counter()
        _GROUPS[key] = _SyncGroup(spec, rank, comm_device(spec, device))
        logger.info(
            "weight sync: rank %d joined %s group in %.1fs", rank, spec.transport, time.perf_counter() - start
        )
    return _GROUPS[key]


def destroy_groups() -> None:
    """Forget this process's sync groups (a new `WeightSync` makes new ones)."""
    _GROUPS.clear()


def logprob_diff(a: list[list[float]], b: list[list[float]]) -> float:
    """Mean |a - b| over all tokens of aligned per-sequence logprob lists (the sync audit metric)."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("logprob_diff: the two sides have different sequence/token counts")
    flat_a = torch.tensor([v for seq in a for v in seq], dtype=torch.float64)
    flat_b = torch.tensor([v for seq in b for v in seq], dtype=torch.float64)
    return float((flat_a - flat_b).abs().mean()) if flat_a.numel() else 0.0
