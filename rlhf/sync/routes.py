"""Which learner rank feeds which engine worker, and over which transport: a pure planner.

Inputs are the GPU each learner rank runs on and the GPU of every worker of every engine (CUDA
device UUIDs, as the actors report them; None on CPU). A worker that shares its GPU with a learner
rank gets the weights from that rank over CUDA IPC (no copy across devices, no NCCL: two NCCL ranks
on one device fail with "invalid usage"). Every other worker joins one broadcast channel rooted at
learner rank 0 (NCCL on GPU, gloo on CPU) or, on CPU by default, fetches from the object store.

So a colocated hybrid engine on N GPUs (learner rank g and engine worker g on GPU g) gets N CUDA IPC
channels that run in parallel, one per GPU; a disaggregated run gets one broadcast channel; a mixed
layout gets both. See docs/weight_sync.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TRANSPORTS = ("object_store", "broadcast", "cuda_ipc")


class SyncRouteError(ValueError):
    """The requested transport cannot reach some engine worker from this placement."""


@dataclass
class Channel:
    """One sender and its receivers; receiver i has rank i + 1 inside the channel."""

    transport: str
    sender: int  # learner rank
    receivers: list[tuple[int, int]] = field(default_factory=list)  # (engine, tensor-parallel worker)


@dataclass(frozen=True)
class Route:
    """How one engine worker is fed: the channel it joins and its rank there."""

    channel: int
    rank: int


def plan_routes(
    requested: str,
    device: str,
    learner_gpus: list[str | None],
    worker_gpus: list[list[str | None]],
) -> tuple[list[Channel], list[list[Route]]]:
    """Channels, and for engine e worker w the route `routes[e][w]`.

    `requested` is `sync.transport`: auto, object_store, broadcast or cuda_ipc."""
    if requested not in ("auto", *TRANSPORTS):
        raise SyncRouteError(
            f"sync.transport: unknown transport {requested!r}; expected auto or one of {TRANSPORTS}"
        )
    if not learner_gpus:
        raise SyncRouteError("weight sync needs at least one learner rank")
    if not worker_gpus or any(not workers for workers in worker_gpus):
        raise SyncRouteError("weight sync needs at least one worker in every engine")
    if requested == "cuda_ipc" and device != "cuda":
        raise SyncRouteError("sync.transport 'cuda_ipc' needs device 'cuda'")
    workers = [(e, w) for e, gpus in enumerate(worker_gpus) for w in range(len(gpus))]
    gpu = {(e, w): worker_gpus[e][w] for e, w in workers}

    if device != "cuda" or requested in ("object_store", "broadcast"):
        transport = "object_store" if requested == "auto" else requested
        if transport == "broadcast" and device == "cuda":
            _check_one_nccl_rank_per_gpu(learner_gpus[0], [(ew, gpu[ew]) for ew in workers])
        return _single_channel(transport, workers, worker_gpus)

    local_rank: dict[str, int] = {}
    for rank, uuid in enumerate(learner_gpus):
        if uuid is not None:
            local_rank.setdefault(uuid, rank)  # the lowest rank on a GPU serves it
    ipc: dict[int, Channel] = {}
    broadcast = Channel("broadcast", 0)
    for e, w in workers:
        rank = local_rank.get(gpu[e, w]) if gpu[e, w] is not None else None
        if rank is not None:
            ipc.setdefault(rank, Channel("cuda_ipc", rank)).receivers.append((e, w))
        elif requested == "cuda_ipc":
            raise SyncRouteError(
                f"sync.transport 'cuda_ipc': engine {e} worker {w} shares its GPU with no learner rank; "
                "colocate rollout and learner with as many learner ranks as engine GPUs, or use 'auto'"
            )
        else:
            broadcast.receivers.append((e, w))
    if broadcast.receivers:
        _check_one_nccl_rank_per_gpu(learner_gpus[0], [((e, w), gpu[e, w]) for e, w in broadcast.receivers])
    channels = [ipc[r] for r in sorted(ipc)] + ([broadcast] if broadcast.receivers else [])
    return channels, _routes(channels, worker_gpus)


def _single_channel(
    transport: str, workers: list[tuple[int, int]], worker_gpus: list[list[str | None]]
) -> tuple[list[Channel], list[list[Route]]]:
    channels = [Channel(transport, 0, list(workers))]
    return channels, _routes(channels, worker_gpus)


def _routes(channels: list[Channel], worker_gpus: list[list[str | None]]) -> list[list[Route]]:
    routes: list[list[Route | None]] = [[None] * len(gpus) for gpus in worker_gpus]
    for c, channel in enumerate(channels):
        for i, (e, w) in enumerate(channel.receivers):
            routes[e][w] = Route(c, i + 1)
    return routes  # type: ignore[return-value]


def _check_one_nccl_rank_per_gpu(
    sender_gpu: str | None, receivers: list[tuple[tuple[int, int], str | None]]
) -> None:
    """NCCL refuses two ranks of one communicator on the same device ("invalid usage")."""
    seen: dict[str, str] = {} if sender_gpu is None else {sender_gpu: "learner rank 0"}
    for (e, w), uuid in receivers:
        if uuid is None:
            continue
        who = f"engine {e} worker {w}"
        if uuid in seen:
            raise SyncRouteError(
                f"sync.transport 'broadcast': {who} and {seen[uuid]} share one GPU, and NCCL cannot have two "
                "ranks on one device; use sync.transport=auto (CUDA IPC from the learner rank on that GPU)"
            )
        seen[uuid] = who


def colocated_layout(num_gpus: int, learner_ranks: int, engines: int, tensor_parallel: int):
    """GPU ids as the colocated placement lays them out: engine e's worker w on GPU e*TP + w, learner
    rank r on GPU r (ranks beyond the GPUs share from GPU 0 again). For `rlhf plan` and tests."""
    if engines * tensor_parallel > num_gpus:
        raise SyncRouteError(
            f"{engines} engine(s) x tensor_parallel {tensor_parallel} need {engines * tensor_parallel} GPUs, "
            f"only {num_gpus} given"
        )
    learner_gpus = [f"gpu{r % num_gpus}" for r in range(learner_ranks)]
    worker_gpus = [[f"gpu{e * tensor_parallel + w}" for w in range(tensor_parallel)] for e in range(engines)]
    return learner_gpus, worker_gpus
