"""A group of `RolloutEngine` Ray actors; prompts go to engines by whole groups, balanced by tokens,
and the samples come back in prompt order."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import ray
from rlhf.rollout.engine import GenerateRequest, RolloutEngine, resolve_dtype
from rlhf.rollout.lora import adapter_sync, lora_target_modules

from rlhf.actor_group import ActorGroup, GroupCallError, balance
from rlhf.algorithms.old_logprobs import engines_return_logprobs
from rlhf.config.schema import RunConfig, SamplingConfig
from rlhf.types import Prompt, Sample

logger = logging.getLogger(__name__)


def is_colocated(cfg: RunConfig, device: str) -> bool:
    """Rollout shares its GPUs with another role (then engines sleep and use less memory)."""
    return device == "cuda" and any("rollout" in group and len(group) > 1 for group in cfg.placement.colocate)


def _engine_options(cfg: RunConfig, device: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Ray actor options for one engine; on CPU pins the in-process vLLM engine and thread counts."""
    opts = copy.deepcopy(options) if options else {}
    if device == "cpu":
        opts.setdefault("num_cpus", 1)
        # Roles take turns on a CPU machine (generate, then train): each may use every core while it works.
        threads = os.environ.get("RLHF_CPU_THREADS") or str(
            max(math.ceil(opts["num_cpus"]), os.cpu_count() or 1)
        )
        env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
        }
    else:
        opts.setdefault("num_gpus", cfg.placement.rollout.gpus or cfg.rollout.tensor_parallel)
        env = {}
    runtime_env = dict(opts.get("runtime_env") or {})
    runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
    opts["runtime_env"] = runtime_env
    return opts


class RolloutGroup:
    """`placement.rollout.replicas` vLLM engines behind one `generate`/`logprobs` call."""

    def __init__(
        self,
        cfg: RunConfig,
        model_path: str,
        device: str,
        actor_options: list[dict[str, Any]] | None = None,
    ):
        replicas = cfg.placement.rollout.replicas
        if replicas < 1:
            raise ValueError(f"placement.rollout.replicas must be >= 1, got {replicas}")
        if actor_options is not None and len(actor_options) != replicas:
            raise ValueError(
                f"RolloutGroup: got {len(actor_options)} actor option dicts for {replicas} rollout replicas"
            )
        self.cfg = cfg
        self.device = device
        self.colocated = is_colocated(cfg, device)
        self.dtype = resolve_dtype(cfg.model.dtype, device)
        self.workers_per_engine = 1 if device == "cpu" else cfg.rollout.tensor_parallel
        # LoRA runs: adapter-only pushes (engines built with LoRA) or merged full weights, decided once
        # here (trainer.lora.sync); `rlhf.sync.driver_side.WeightSync` reads it.
        self.adapter_sync = adapter_sync(cfg, device, model_path)
        self.lora_rank = cfg.trainer.lora.rank if self.adapter_sync else 0
        self.lora_targets = (
            lora_target_modules(cfg.trainer.lora.target_modules, model_path, cfg.model.trust_remote_code)
            if self.adapter_sync
            else None
        )
        self._remote = ray.remote(RolloutEngine)
        self._model_path = model_path
        self._options = [
            _engine_options(cfg, device, actor_options[i] if actor_options else None) for i in range(replicas)
        ]
        self.group = ActorGroup([self._start_engine(i) for i in range(replicas)], "rollout")
        self.group.call("ready")
        # Self-healing: a dead engine is restarted in its placement bundle, given the learner's current
        # weights through `on_restart` (set by the driver), and its unfinished prompts are sent again.
        self.on_restart: Callable[[int], None] | None = None
        self.restarts = 0
        self.last_timing: dict[str, float] = {}  # the last generate's engine_vllm_s / engine_post_s
        self._restart_times: dict[int, list[float]] = {}

    def _start_engine(self, i: int):
        cfg = self.cfg
        return self._remote.options(**self._options[i]).remote(
            self._model_path,
            cfg.rollout,
            device=self.device,
            seed=cfg.rollout.seed + i,  # distinct sample streams per replica
            dtype=self.dtype,
            tensor_parallel=self.workers_per_engine,
            colocated=self.colocated,
            engine_index=i,
            trust_remote_code=cfg.model.trust_remote_code,
            sampled_logprobs=engines_return_logprobs(cfg),
            lora_rank=self.lora_rank,
            lora_targets=self.lora_targets,
        )

    def restart(self, rank: int, cause: BaseException, resync: bool = True) -> None:
        """Replace dead engine `rank` (same bundle, same seed) and, with `resync`, bring it to the
        current weights through `on_restart`.

        More than `rollout.max_restarts` restarts of one engine within `rollout.restart_window_s`
        stop the run with the engine's last error."""
        now = time.monotonic()
        window = self.cfg.rollout.restart_window_s
        recent = [t for t in self._restart_times.get(rank, []) if now - t < window] + [now]
        self._restart_times[rank] = recent
        if len(recent) > self.cfg.rollout.max_restarts:
            raise RuntimeError(
                f"rollout engine {rank} died {len(recent)} times within {window:g}s "
                f"(rollout.max_restarts={self.cfg.rollout.max_restarts}); last error: {cause}"
            ) from cause
        logger.warning("rollout engine %d died (%s); restarting it", rank, str(cause).splitlines()[0])
        start = time.perf_counter()
        with contextlib.suppress(Exception):
            ray.kill(self.group.actors[rank])
        self.group.actors[rank] = self._start_engine(rank)
        self.group.call("ready", ranks=[rank])
        if resync and self.on_restart is not None:
            self.on_restart(rank)
        self.restarts += 1
        self.last_restart_s = time.perf_counter() - start
        logger.warning("rollout engine %d restarted in %.1fs", rank, self.last_restart_s)

    @property
    def engines(self) -> list:
        return list(self.group.actors)

    def assign(self, prompts: list[Prompt], n: int, max_new_tokens: int) -> list[list[int]]:
        """Prompt indices per engine: whole prompts (all n samples of a group stay on one engine),
        longest first to the least-loaded engine, by prompt + generated-token budget."""
        costs = [n * (len(p.token_ids) + max_new_tokens) for p in prompts]
        return balance(costs, len(self.group.actors))

    def generate(
        self,
        prompts: list[Prompt],
        sampling: SamplingConfig | None = None,
        n: int | None = None,
        temperature: float | None = None,
        group_offset: int = 0,
        logprobs: bool = False,
    ) -> list[Sample]:
        """n samples per prompt, in prompt order; `Sample.group` = group_offset + index in `prompts`.

        `logprobs`: return each sampled token's engine logprob (only where the algorithm needs them)."""
        sampling = sampling or self.cfg.rollout.sampling
        count = sampling.n if n is None else n
        rows = self.assign(prompts, count, sampling.max_new_tokens)
        mode = self._mode()
        requests = {
            r: GenerateRequest(
                prompts=[prompts[i] for i in chosen],
                sampling=sampling,
                n=n,
                temperature=temperature,
                groups=[group_offset + i for i in chosen],
                logprobs=logprobs,
                mode=mode,
            )
            for r, chosen in enumerate(rows)
            if chosen
        }
        if self.cfg.rollout.partial_rollouts:  # in chunks, so pushes land mid-response (rollout/partial.py)
            chunks = self._in_chunks(requests)
        else:
            chunks = self._supervised(requests)
            if mode == "tokens":
                self.last_timing = self._engine_timing(list(requests))
        samples = [sample for chunk in chunks for sample in chunk]
        return sorted(samples, key=lambda s: s.group)  # stable: sample order within a group is kept

    def _mode(self) -> str:
        """With rollout.environment every sample is a multi-turn episode (rollout/episodes.py); with
        rollout.agent the user's agent makes chat calls to the engine (rollout/agent_runner.py).
        Partial rollouts generate plain token chunks."""
        if self.cfg.rollout.partial_rollouts:
            return "tokens"
        if self.cfg.rollout.environment.name:
            return "episodes"
        if self.cfg.rollout.agent.function:
            return "agent"
        return "tokens"

    def _engine_timing(self, ranks: list[int]) -> dict[str, float]:
        """The slowest engine's seconds in vLLM and in building samples, for the last generate."""
        try:
            timings = ray.get([self.group.actors[r].generate_timing.remote() for r in ranks], timeout=10)
        except Exception:  # diagnostics only: a dead engine is the supervisor's business
            return {}
        keys = {k for t in timings for k in t}
        return {f"engine_{k}": max(t.get(k, 0.0) for t in timings) for k in sorted(keys)}

    def _in_chunks(self, requests: dict[int, GenerateRequest]) -> list:
        """Each rank's request as partial rollouts, one driver thread per engine; a rank whose engine
        dies is restarted and its share generated again from the start. Results in rank order."""
        from concurrent.futures import ThreadPoolExecutor

        from rlhf.rollout.partial import generate_in_chunks

        def share(rank: int) -> list[Sample]:
            request = requests[rank]
            while True:

                def call(method, *a, **k):
                    return ray.get(getattr(self.group.actors[rank], method).remote(*a, **k))

                try:
                    return generate_in_chunks(
                        call,
                        request.prompts,
                        request.groups,
                        request.sampling,
                        request.n,
                        request.temperature,
                        request.logprobs,
                        self.cfg.rollout.partial_chunk_tokens,
                    )
                except ray.exceptions.RayActorError as exc:
                    self.restart(rank, exc)
                except Exception as exc:
                    raise GroupCallError("rollout", rank, "generate (partial rollouts)", exc) from exc

        with ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="rlhf-partial") as pool:
            futures = {rank: pool.submit(share, rank) for rank in requests}
            return [futures[rank].result() for rank in sorted(futures)]

    def _supervised(self, requests: dict[int, GenerateRequest]) -> list:
        """`serve(requests[r])` on each rank r; a rank whose engine dies is restarted and sent the same
        request again. Results in rank order."""
        pending = {r: self.group.actors[r].serve.remote(request) for r, request in requests.items()}
        results = {}
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=1)
            rank = next(r for r, ref in pending.items() if ref == ready[0])
            try:
                results[rank] = ray.get(ready[0])
                del pending[rank]
            except ray.exceptions.RayActorError as exc:
                self.restart(rank, exc)
                pending[rank] = self.group.actors[rank].serve.remote(requests[rank])
            except Exception as exc:
                raise GroupCallError("rollout", rank, requests[rank].method, exc) from exc
        return [results[r] for r in sorted(results)]

    def logprobs(self, seqs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Raw engine logprobs of each response token (see RolloutEngine.logprobs)."""
        return self.group.split_call("logprobs", seqs)

    def active_adapters(self) -> list[dict[str, Any] | None]:
        """Each engine's active LoRA adapter (None: the base model), see RolloutEngine.active_adapter."""
        return self.group.call("active_adapter")

    def sleep(self, level: int = 1) -> bool:
        return all(self.group.call("sleep", level))

    def wake(self, tags: list[str] | None = None) -> bool:
        return all(self.group.call("wake", tags))

    def shutdown(self) -> None:
        for engine in self.group.actors:
            # The actor may already be gone; killing it below is what matters.
            with contextlib.suppress(Exception):
                ray.get(engine.shutdown.remote(), timeout=60)
            ray.kill(engine)
        self.group.actors = []
