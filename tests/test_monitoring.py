"""Ray metrics of a run: the Grafana dashboard queries exactly the exported names (unit), and the
figures a driver records come back through Ray's own Prometheus export (a real local Ray)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rlhf.production.monitoring import (
    ALL_FIGURES,
    RunMonitor,
    engine_actor_options,
    exported_series,
    prometheus_names,
)
from rlhf.production.monitoring import series_value as value

DASHBOARD = Path(__file__).resolve().parents[1] / "experiments" / "monitoring" / "grafana_dashboard.json"


def dashboard_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return {name for expr in exprs for name in re.findall(r"\bray_rlhf_[a-z_]+", expr)}


def test_dashboard_queries_exactly_the_exported_metrics():
    used = dashboard_names()
    exported = {n for f in ALL_FIGURES for n in prometheus_names(f)}
    assert used - exported == set(), (
        "the dashboard queries metrics rlhf/production/monitoring.py does not export"
    )
    # every figure is on the dashboard (a histogram through any of its series)
    missing = [f.name for f in ALL_FIGURES if not used & set(prometheus_names(f))]
    assert missing == [], f"figures without a panel: {missing}"
    assert len({f.name for f in ALL_FIGURES}) == len(ALL_FIGURES)


def test_engine_options_carry_the_run_and_role_without_losing_env():
    given = [{"num_cpus": 1, "runtime_env": {"env_vars": {"A": "1"}}}, {}]
    out = engine_actor_options(given, "run-x", "evaluation")
    assert out[0]["runtime_env"]["env_vars"] == {
        "A": "1",
        "RLHF_METRICS_RUN": "run-x",
        "RLHF_METRICS_ROLE": "evaluation",
    }
    assert out[1]["runtime_env"]["env_vars"]["RLHF_METRICS_ROLE"] == "evaluation"
    assert given[0]["runtime_env"]["env_vars"] == {"A": "1"}  # the caller's dicts are untouched


@pytest.fixture
def ray_with_fast_metrics():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, _system_config={"metrics_report_interval_ms": 500})
    yield
    ray.shutdown()


@pytest.mark.slow
def test_driver_figures_are_exported_through_ray(ray_with_fast_metrics):
    monitor = RunMonitor("mon-test")
    step = {
        "time/step_s": 3.0,
        "time/generate_s": 2.0,
        "time/train_s": 0.5,
        "perf/tokens_per_s": 100.0,
        "perf/generated_tokens": 300,
        "reward/mean": 0.25,
        "train/kl": 0.01,
        "sync/time_s": 0.1,
        "fault/engine_restarts": 1.0,
        "async/staleness_mean": 0.5,
    }
    monitor.record_step(1, step)
    monitor.record_step(2, {**step, "reward/mean": 0.5})
    monitor.record_eval(2, "arith", {"reward_mean": 0.75, "solved_frac": 0.5, "pass@2": 0.8})
    exported_series(r"ray_rlhf_eval_pass_at_k")  # the last one recorded: the rest come with it
    series = exported_series(r"ray_rlhf_")
    run = {"run": "mon-test"}
    assert value(series, "ray_rlhf_step", **run) == 2
    assert value(series, "ray_rlhf_reward_mean", **run) == 0.5
    assert value(series, "ray_rlhf_phase_seconds", phase="generate", **run) == 2.0
    assert value(series, "ray_rlhf_generated_tokens_total", **run) == 600
    assert value(series, "ray_rlhf_step_seconds_count", **run) == 2
    assert value(series, "ray_rlhf_engine_restarts", **run) == 1
    assert value(series, "ray_rlhf_async_staleness_mean", **run) == 0.5
    assert value(series, "ray_rlhf_eval_reward_mean", set="arith", **run) == 0.75
    assert value(series, "ray_rlhf_eval_pass_at_k", set="arith", k="2", **run) == 0.8
    assert value(series, "ray_rlhf_eval_step", set="arith", **run) == 2
