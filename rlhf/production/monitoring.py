"""Live figures of a run through Ray's metrics API, for Prometheus and Grafana.

Everything here is recorded with `ray.util.metrics` (Gauge, Counter, Histogram): Ray's metrics agent
on every node exports them in the Prometheus format, so one scrape config covers the driver and every
engine on every node, with no extra server to run (experiments/monitoring/ has the Grafana
dashboard). The driver records per-step figures (`RunMonitor`); each rollout/evaluation engine records
its vLLM queue and KV-cache use (`EngineMonitor`). Recording is a few in-memory updates per step (and
one poll a second per engine), so it is always on; a failure to record never stops a run.

Prometheus names: Ray prefixes every metric with `ray_`; a counter gets `_total`, a histogram
`_bucket`/`_sum`/`_count` (see `prometheus_names`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# Environment variables that tag an engine's figures (set in its actor options by the driver).
RUN_ENV, ROLE_ENV = "RLHF_METRICS_RUN", "RLHF_METRICS_ROLE"
STEP_SECONDS_BOUNDARIES = [1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600]


@dataclass(frozen=True)
class Figure:
    """One exported metric: its Ray name, kind, help text, tags, and the per-step metrics key it mirrors."""

    name: str
    kind: str  # gauge | counter | histogram
    help: str
    key: str | None = None
    tags: tuple[str, ...] = ("run",)


STEP_FIGURES = (
    Figure("rlhf_step", "gauge", "the last finished training step"),
    Figure("rlhf_step_seconds", "histogram", "wall-clock seconds of each step", "time/step_s"),
    Figure("rlhf_phase_seconds", "gauge", "seconds of the last step in each phase", tags=("run", "phase")),
    Figure(
        "rlhf_tokens_per_second", "gauge", "generated tokens per second of step time", "perf/tokens_per_s"
    ),
    Figure(
        "rlhf_generate_tokens_per_second",
        "gauge",
        "generated tokens per second of generation time",
        "perf/generate_tokens_per_s",
    ),
    Figure(
        "rlhf_generated_tokens", "counter", "response tokens generated for training", "perf/generated_tokens"
    ),
    Figure("rlhf_reward_mean", "gauge", "mean reward of the step's samples", "reward/mean"),
    Figure("rlhf_reward_accuracy", "gauge", "task checker accuracy of the step's samples", "reward/accuracy"),
    Figure("rlhf_kl", "gauge", "KL of the policy to the reference (train/kl)", "train/kl"),
    Figure("rlhf_kl_to_ref", "gauge", "summed per-sequence KL to the reference", "reward/kl_to_ref"),
    Figure("rlhf_entropy", "gauge", "mean token entropy of the policy", "train/entropy"),
    Figure("rlhf_grad_norm", "gauge", "gradient norm before clipping", "train/grad_norm"),
    Figure("rlhf_sync_seconds", "gauge", "seconds of the last weight sync", "sync/time_s"),
    Figure(
        "rlhf_sync_audit_logprob_diff",
        "gauge",
        "mean absolute engine-learner logprob difference after the sync",
        "sync/audit_logprob_diff",
    ),
    Figure("rlhf_engine_restarts", "gauge", "rollout engines restarted so far", "fault/engine_restarts"),
    Figure("rlhf_learner_restarts", "gauge", "learner roles restarted so far", "fault/learner_restarts"),
    Figure(
        "rlhf_reward_restarts", "gauge", "reward-model replicas restarted so far", "fault/reward_restarts"
    ),
    Figure("rlhf_reward_errors", "gauge", "samples the reward sources failed on", "reward/errors"),
    Figure(
        "rlhf_async_staleness_mean", "gauge", "mean policy versions behind (async)", "async/staleness_mean"
    ),
    Figure(
        "rlhf_async_buffer_size",
        "gauge",
        "scored batches waiting for the learner (async)",
        "async/buffer_size",
    ),
)
EVAL_FIGURES = (
    Figure(
        "rlhf_eval_reward_mean", "gauge", "mean reward of an evaluation set", "reward_mean", ("run", "set")
    ),
    Figure(
        "rlhf_eval_solved_frac",
        "gauge",
        "fraction of samples that solve their prompt",
        "solved_frac",
        ("run", "set"),
    ),
    Figure("rlhf_eval_pass_at_k", "gauge", "pass@k of an evaluation set", tags=("run", "set", "k")),
    Figure(
        "rlhf_eval_step",
        "gauge",
        "the step whose weights the set's last evaluation used",
        tags=("run", "set"),
    ),
)
ENGINE_FIGURES = (
    Figure(
        "rlhf_engine_requests_running",
        "gauge",
        "requests vLLM is decoding",
        "running",
        ("run", "role", "engine"),
    ),
    Figure(
        "rlhf_engine_requests_waiting",
        "gauge",
        "requests queued in vLLM",
        "waiting",
        ("run", "role", "engine"),
    ),
    Figure(
        "rlhf_engine_kv_cache_usage",
        "gauge",
        "fraction of the KV cache in use (0..1)",
        "kv_cache_usage",
        ("run", "role", "engine"),
    ),
)
ALL_FIGURES = STEP_FIGURES + EVAL_FIGURES + ENGINE_FIGURES


def prometheus_names(figure: Figure) -> list[str]:
    """The series names Prometheus sees for a figure (what a Grafana query names)."""
    base = f"ray_{figure.name}"
    if figure.kind == "counter":
        return [f"{base}_total"]
    if figure.kind == "histogram":
        return [f"{base}_bucket", f"{base}_sum", f"{base}_count"]
    return [base]


def _make(figure: Figure):
    from ray.util import metrics

    if figure.kind == "gauge":
        return metrics.Gauge(figure.name, description=figure.help, tag_keys=figure.tags)
    if figure.kind == "counter":
        return metrics.Counter(figure.name, description=figure.help, tag_keys=figure.tags)
    return metrics.Histogram(
        figure.name, description=figure.help, boundaries=STEP_SECONDS_BOUNDARIES, tag_keys=figure.tags
    )


def _record(metric, kind: str, value: float, tags: dict[str, str] | None = None) -> None:
    if kind == "gauge":
        metric.set(value, tags=tags)
    elif kind == "counter":
        if value > 0:
            metric.inc(value, tags=tags)
    else:
        metric.observe(value, tags=tags)


class _Recorder:
    """Ray metric objects for some figures, every one tagged with `defaults`; warns once, never raises."""

    def __init__(self, figures: tuple[Figure, ...], defaults: dict[str, str]):
        self.figures = {f.name: f for f in figures}
        self.metrics = {}
        self.warned = False
        self._guard(self._create, defaults)

    def _create(self, defaults: dict[str, str]) -> None:
        for figure in self.figures.values():
            metric = _make(figure)
            metric.set_default_tags(defaults)
            self.metrics[figure.name] = metric

    def record(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        if name in self.metrics:
            self._guard(_record, self.metrics[name], self.figures[name].kind, float(value), tags)

    def _guard(self, fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # monitoring must not stop a run
            if not self.warned:
                logger.warning("monitoring: Ray metrics not recorded: %s: %s", type(exc).__name__, exc)
                self.warned = True


class RunMonitor:
    """The driver's figures: one `record_step` per training step, one `record_eval` per evaluated set."""

    def __init__(self, run_name: str):
        self.recorder = _Recorder(STEP_FIGURES + EVAL_FIGURES, {"run": run_name})

    def record_step(self, step: int, metrics: dict[str, float]) -> None:
        self.recorder.record("rlhf_step", step)
        for figure in STEP_FIGURES:
            if figure.key is not None and metrics.get(figure.key) is not None:
                self.recorder.record(figure.name, metrics[figure.key])
        for key, value in metrics.items():
            if key.startswith("time/") and key.endswith("_s") and key != "time/step_s":
                self.recorder.record("rlhf_phase_seconds", value, {"phase": key[len("time/") : -2]})

    def record_eval(self, step: int, set_name: str, summary: dict[str, float]) -> None:
        """`summary`: one set's figures without the eval/<set>/ prefix (rlhf.evaluation.sets.summarize)."""
        tags = {"set": set_name}
        self.recorder.record("rlhf_eval_step", step, tags)
        for figure in EVAL_FIGURES:
            if figure.key is not None and figure.key in summary:
                self.recorder.record(figure.name, summary[figure.key], tags)
        for key, value in summary.items():
            if key.startswith("pass@"):
                self.recorder.record("rlhf_eval_pass_at_k", value, {**tags, "k": key[len("pass@") :]})


def engine_actor_options(options: list[dict[str, Any]], run_name: str, role: str) -> list[dict[str, Any]]:
    """Copies of engine actor options whose env tags the engine's figures with the run and role."""
    out = []
    for opts in options:
        opts = dict(opts)
        runtime_env = dict(opts.get("runtime_env") or {})
        runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), RUN_ENV: run_name, ROLE_ENV: role}
        opts["runtime_env"] = runtime_env
        out.append(opts)
    return out


def exported_series(pattern: str = r"ray_rlhf_", timeout_s: float = 30.0) -> dict[str, float]:
    """Series whose line matches `pattern` in the Prometheus export of this node's Ray metrics agent,
    {"name{labels}": value}, waiting up to `timeout_s` for the first (a check without Prometheus)."""
    import re
    import time
    import urllib.request

    import ray

    node = next(
        n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == ray.util.get_node_ip_address()
    )
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline = time.monotonic() + timeout_s
    while True:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        lines = [line for line in text.splitlines() if not line.startswith("#") and re.match(pattern, line)]
        if lines or time.monotonic() > deadline:
            return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
        time.sleep(0.5)


def series_value(series: dict[str, float], name: str, **labels: str) -> float:
    """The value of the series `name` with these labels (the last one when several workers export it)."""
    hits = [
        v
        for k, v in series.items()
        if k.split("{")[0] == name and all(f'{key}="{val}"' in k for key, val in labels.items())
    ]
    if not hits:
        raise KeyError(f"{name} {labels} is not exported")
    return hits[-1]


class EngineMonitor:
    """Inside an engine actor: polls `read_stats()` (running/waiting requests, KV-cache use) every
    `interval_s` on a daemon thread and records the values, so they move while `generate` runs."""

    def __init__(
        self, read_stats: Callable[[], dict[str, float]], engine_index: int, interval_s: float = 1.0
    ):
        self.read_stats, self.interval_s = read_stats, interval_s
        defaults = {
            "run": os.environ.get(RUN_ENV, ""),
            "role": os.environ.get(ROLE_ENV, "rollout"),
            "engine": str(engine_index),
        }
        self.recorder = _Recorder(ENGINE_FIGURES, defaults)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rlhf-engine-monitor", daemon=True)

    def start(self) -> EngineMonitor:
        self._thread.start()
        return self

    def poll(self) -> dict[str, float]:
        stats = self.read_stats()
        for figure in ENGINE_FIGURES:
            if figure.key in stats:
                self.recorder.record(figure.name, stats[figure.key])
        return stats

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as exc:  # a vLLM internal that moved: stop polling, keep generating
                logger.warning("engine monitor stopped: %s: %s", type(exc).__name__, exc)
                return

    def stop(self) -> None:
        self._stop.set()
