"""Driver side of the weight sync: one push = every learner rank sends, every engine loads.

`WeightSync.push()` plans the channels once (`rlhf.sync.routes`), starts the senders and receivers
together and waits for both. `push(wait=False)` (the asynchronous loop) returns as soon as the
learners have staged a copy of their weights: the learners send from a background thread while they
train on, and each engine loads the push after the generate call it is running. The next push (or
`finish()`) collects the one in flight first, so at most one push is outstanding. The wire format and
the transports live in `rlhf.sync.wire`, the two ends in `rlhf.sync.learner_side` and
`rlhf.sync.engine_side`; see docs/weight_sync.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from rlhf.sync.routes import Channel, Route, plan_routes
from rlhf.sync.wire import SyncPayload, SyncSpec, make_spec

logger = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """A push whose results are not collected yet."""

    start: float
    learner_refs: list[Any]  # send_weights (synchronous) or finish_send (background) per rank
    learner_who: list[tuple[str, int]]
    engine_refs: list[Any]
    engine_who: list[tuple[str, int]]
    sent: list[Any] | None = None  # object_store: the learners' payloads, known at submission
    background: bool = False  # the learners send from a thread: ask them for `finish_send`
    learner_ranks: list[int] | None = None


class WeightSync:
    """Driver-side orchestration of one learner group -> one rollout group sync.

    `learners.actors` are the learner ranks (each has `send_weights(specs, bucket_bytes, background)`,
    `finish_send()` and, on GPU, `device_uuid()`); `rollout.engines` the engine actors (each has
    `receive_weights(routes, payload)` and, on GPU, `device_uuids()`). `rollout.dtype` (optional) is
    the engines' weight dtype. The channels come from `rlhf.sync.routes.plan_routes` on the GPUs the
    actors report.

    LoRA: where `rollout.adapter_sync` is true (the engines were built to serve LoRA adapters,
    `rlhf.rollout.lora.adapter_sync`; `adapter` overrides it) every push carries only the policy's
    adapter: the learners are asked for `send_weights(..., adapter_only=True)` and the specs carry the
    adapter config of learner rank 0 (`adapter_config()`). Otherwise the learners send full weights
    (merged with their adapters, for a LoRA run), as without LoRA.
    """

    def __init__(self, cfg, learners, rollout, device: str, adapter: bool | None = None):
        self.cfg = cfg
        self.learners = learners
        self.rollout = rollout
        self.device = device
        self.adapter = bool(getattr(rollout, "adapter_sync", False)) if adapter is None else adapter
        self.adapter_config: dict | None = None
        self.channels: list[Channel] = []
        self.specs: list[SyncSpec] = []
        self.routes: list[list[Route]] = []
        self._store: dist.TCPStore | None = None
        self._pushes = 0
        self._setups = 0
        self._inflight: _InFlight | None = None
        # One push at a time: an asynchronous run pushes from the learner side while a restarted
        # engine may be resynced from the rollout side.
        self._lock = threading.RLock()

    def _gpus(self) -> tuple[list[str | None], list[list[str | None]]]:
        from rlhf.actor_group import ActorGroup

        learners, engines = list(self.learners.actors), list(self.rollout.engines)
        if self.device != "cuda":
            workers = int(getattr(self.rollout, "workers_per_engine", 1))
            return [None] * len(learners), [[None] * workers for _ in engines]
        return ActorGroup(learners, "learner").call("device_uuid"), ActorGroup(engines, "rollout").call(
            "device_uuids"
        )

    def setup(self) -> list[SyncSpec]:
        import ray

        learner_gpus, worker_gpus = self._gpus()
        if self.adapter and self.adapter_config is None:
            self.adapter_config = ray.get(self.learners.actors[0].adapter_config.remote())
            if not self.adapter_config:
                raise RuntimeError(
                    "weight sync: adapter pushes need a LoRA policy, but learner rank 0 has no adapter "
                    "(adapter_config() returned None)"
                )
        self.channels, self.routes = plan_routes(self.cfg.transport, self.device, learner_gpus, worker_gpus)
        host = port = None
        if any(ch.transport != "object_store" for ch in self.channels):
            host = ray.util.get_node_ip_address()
            self._store = dist.TCPStore(
                host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=600)
            )
            port = self._store.port
        self._setups += 1
        base = f"rlhf-weight-sync-{id(self):x}-{self._setups}"  # a re-setup never meets old groups
        self.specs = [
            make_spec(
                ch.transport,
                int(self.cfg.bucket_mb * 2**20),
                dtype=getattr(self.rollout, "dtype", None),
                host=host,
                port=port,
                num_engines=len(ch.receivers),
                backend="nccl" if self.device == "cuda" else "gloo",
                group=f"{base}-c{c}",
                engine_reload=self.cfg.engine_reload,
                adapter=self.adapter_config if self.adapter else None,
            )
            for c, ch in enumerate(self.channels)
        ]
        logger.info("weight sync: %s%s", "LoRA adapter only; " if self.adapter else "", self.describe())
        return self.specs

    @property
    def version(self) -> int:
        """The learner's policy version as the engines see it: pushes so far (samples carry theirs)."""
        return self._pushes

    def describe(self) -> str:
        """One line per channel: who sends to whom, over what."""
        return "; ".join(
            f"{ch.transport} learner {ch.sender} -> "
            + ", ".join(f"engine {e}" + (f"/tp{w}" if w else "") for e, w in ch.receivers)
            for ch in self.channels
        )

    def resync(self, rank: int | None = None) -> dict[str, float]:
        """After engine `rank` was replaced: plan the channels anew (the new engine process must join
        them) and push the current weights to every engine."""
        with self._lock:
            with contextlib.suppress(Exception):  # a push in flight to the dead engine fails: redone below
                self.finish()
            self.setup()
            return self._push(wait=True)

    def push(self, wait: bool = True) -> dict[str, float]:
        """Send the learner's current weights to every engine; returns timing/bytes metrics.

        `wait=False` returns once the learners have staged their weights (see the module docstring);
        the figures of that push come with the next push or `finish()`.

        An engine found dead is replaced (`rollout.restart`) and every engine gets the weights again
        over freshly planned channels. (With the collective transports a learner rank may first wait
        out `timeout_s` for the dead receiver; mid-generation deaths are caught earlier, in
        `RolloutGroup.generate`.)"""
        from rlhf.actor_group import GroupCallError

        with self._lock:
            try:
                metrics = self.finish()
                metrics.update(self._push(wait))
                return metrics
            except GroupCallError as exc:
                if not (exc.role == "rollout" and exc.actor_died and hasattr(self.rollout, "restart")):
                    raise
                # replace the engine, then plan the channels anew and push to every engine once
                self._inflight = None
                self.rollout.restart(exc.rank, exc.cause, resync=False)
                self.setup()
                return self._push(wait=True)

    def finish(self) -> dict[str, float]:
        """Collect the push still in flight (if any): its figures plus `sync/wait_previous_s`, the time
        spent waiting for it here."""
        with self._lock:
            inflight, self._inflight = self._inflight, None
            if inflight is None:
                return {}
            start = time.perf_counter()
            metrics = self._collect(inflight)
            metrics["sync/wait_previous_s"] = time.perf_counter() - start
            return metrics

    def _push(self, wait: bool) -> dict[str, float]:
        from rlhf.actor_group import ActorGroup, gather

        if not self.specs:
            self.setup()
        specs = [replace(spec, version=self._pushes) for spec in self.specs]
        self._pushes += 1
        learners = ActorGroup(self.learners.actors, "learner")
        engines = ActorGroup(self.rollout.engines, "rollout")
        per_rank = [
            ([specs[c] for c, ch in enumerate(self.channels) if ch.sender == rank],)
            for rank in range(len(learners))
        ]
        routes = [([(specs[r.channel], r.rank) for r in workers],) for workers in self.routes]
        bucket_bytes = specs[0].bucket_bytes  # every rank cuts the same buckets (ZeRO-3 gathers them)
        timeout = specs[0].timeout_s
        # adapter pushes: every rank (senders or not: ZeRO-3 gathers) iterates the adapter's tensors only
        what = {"adapter_only": True} if self.adapter else {}
        start = time.perf_counter()
        if specs[0].transport == "object_store":  # the engines need the refs first
            senders, ranks = learners.submit("send_weights", bucket_bytes, per_rank=per_rank, **what)
            sent = gather(senders, learners.who(ranks), "send_weights", timeout)
            receivers, engine_ranks = engines.submit("receive_weights", sent[0][0], per_rank=routes)
            inflight = _InFlight(start, [], [], receivers, engines.who(engine_ranks), sent=sent)
        else:  # both sides join the same collectives: start them together
            background = not wait
            senders, ranks = learners.submit(
                "send_weights", bucket_bytes, per_rank=per_rank, background=background, **what
            )
            receivers, engine_ranks = engines.submit("receive_weights", None, per_rank=routes)
            inflight = _InFlight(
                start, senders, learners.who(ranks), receivers, engines.who(engine_ranks), learner_ranks=ranks
            )
            if background:  # staged: the learners send from a thread, collected with finish_send
                gather(senders, learners.who(ranks), "send_weights", timeout)
                inflight.learner_refs, inflight.background = [], True
        if wait:
            return self._collect(inflight)
        self._inflight = inflight
        return {"sync/time_s": time.perf_counter() - start, "sync/background": 1.0}

    def _collect(self, inflight: _InFlight) -> dict[str, float]:
        from rlhf.actor_group import ActorGroup, gather

        timeout = self.specs[0].timeout_s if self.specs else None
        learner_refs, learner_who = inflight.learner_refs, inflight.learner_who
        if inflight.background:
            learners = ActorGroup(self.learners.actors, "learner")
            learner_refs, ranks = learners.submit("finish_send", ranks=inflight.learner_ranks)
            learner_who = learners.who(ranks)
        results = gather(
            learner_refs + inflight.engine_refs, learner_who + inflight.engine_who, "weight sync", timeout
        )
        sent = inflight.sent if inflight.sent is not None else results[: len(learner_refs)]
        loaded = results[len(learner_refs) :]
        elapsed = time.perf_counter() - inflight.start
        for index, stats in enumerate(loaded):
            if isinstance(stats, dict) and stats.get("params_loaded", 0) < stats.get("params_total", 0):
                logger.warning(
                    "weight sync: engine %d updated %d of its %d parameters (names vLLM does not know?)",
                    index,
                    stats["params_loaded"],
                    stats["params_total"],
                )
        payloads = [p for rank in sent for p in (rank or [])]
        num_bytes = payloads[0].num_bytes if payloads else 0
        return {
            **_sync_phases(payloads, loaded),
            "sync/time_s" if not inflight.background else "sync/background_total_s": elapsed,
            "sync/bytes": float(num_bytes),
            "sync/gbps": num_bytes * 8 / 1e9 / max(elapsed, 1e-9),
            "sync/buckets": float(payloads[0].num_buckets if payloads else 0),
            "sync/channels": float(len(self.channels)),
            "sync/adapter": float(self.adapter),
        }

    def shutdown(self) -> None:
        self._store = None


def _sync_phases(payloads: list[SyncPayload], loaded: list) -> dict[str, float]:
    """Where a push's time went: the slowest learner rank's gather/pack/send and the slowest engine's
    wait/load/total seconds (`sync/learner_*_s`, `sync/engine_*_s`)."""
    out: dict[str, float] = {}
    for payload in payloads:
        for key, seconds in payload.timings.items():
            out[f"sync/learner_{key}_s"] = max(out.get(f"sync/learner_{key}_s", 0.0), seconds)
    for stats in loaded:
        for key in ("wait_s", "load_s", "total_s"):
            if isinstance(stats, dict) and key in stats:
                out[f"sync/engine_{key}"] = max(out.get(f"sync/engine_{key}", 0.0), float(stats[key]))
        if isinstance(stats, dict) and "params_without_loader" in stats:  # why auto chose layerwise
            out["sync/engine_params_without_loader"] = float(stats["params_without_loader"])
        if isinstance(stats, dict) and "reload_direct" in stats:  # 1 only if every engine wrote directly
            out["sync/engine_direct"] = min(out.get("sync/engine_direct", 1.0), float(stats["reload_direct"]))
        if isinstance(stats, dict) and "in_place" in stats:  # LoRA: 1 only if every engine swapped in place
            out["sync/engine_in_place"] = min(out.get("sync/engine_in_place", 1.0), float(stats["in_place"]))
        if isinstance(stats, dict) and "buckets_replayed" in stats:  # replay: the fewest of any worker
            replayed = float(stats["buckets_replayed"])
            out["sync/engine_buckets_replayed"] = min(
                out.get("sync/engine_buckets_replayed", replayed), replayed
            )
    return out
