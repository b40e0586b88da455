"""What a vLLM engine is doing right now: requests decoding, requests queued, KV-cache use.

vLLM has no stable public call for this. An in-process engine (the CPU build, multiprocessing off)
exposes its scheduler; a multiprocess engine reports the same figures through `LLM.get_metrics()`
when its stats logging is on. Each lookup is guarded, so a vLLM version without them gives {}.
"""

from __future__ import annotations

import contextlib
from typing import Any

# vLLM's Prometheus gauges (names of recent versions, then older ones) -> our keys.
_VLLM_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
}


def _scheduler(llm: Any) -> Any:
    engine = getattr(llm, "llm_engine", None)
    client = getattr(engine, "engine_core", None)  # InprocClient when in process
    core = getattr(client, "engine_core", None)  # EngineCore
    return getattr(core, "scheduler", None)


def read_engine_stats(llm: Any) -> dict[str, float]:
    """{"running", "waiting", "kv_cache_usage"} where this vLLM exposes them (any may be missing)."""
    if llm is None:
        return {}
    out: dict[str, float] = {}
    scheduler = _scheduler(llm)
    if scheduler is not None:
        with contextlib.suppress(Exception):
            out["running"] = float(len(scheduler.running))
        with contextlib.suppress(Exception):
            out["waiting"] = float(len(scheduler.waiting))
        with contextlib.suppress(Exception):
            out["kv_cache_usage"] = float(scheduler.kv_cache_manager.usage)
        return out
    try:
        snapshot = llm.get_metrics()
    except Exception:  # stats logging off, or a vLLM without get_metrics
        return {}
    for metric in snapshot:
        key = _VLLM_GAUGES.get(getattr(metric, "name", ""))
        if key is not None and isinstance(getattr(metric, "value", None), int | float):
            out.setdefault(key, float(metric.value))
    return out
