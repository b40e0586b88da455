"""Asynchronous RL on the CPU (`configs/async.yaml`: one step off, decoupled PPO; two engines): real Ray, vLLM and DeepSpeed.

The run trains on every prompt at most once per epoch and loses none (a prompt is trained, or still
pending in the checkpoint's prompt state to be regenerated), never trains on a sample more than k
versions old, and resumes from its checkpoint with the pending prompts served first.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rlhf.config.loader import ConfigError, load_config
from rlhf.loop.driver import train
from rlhf.production.checkpoint import latest_checkpoint, load_driver_state
from rlhf.production.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
NUM_PROMPTS = 8


def overrides(model_dir: str, out: Path, **extra: str) -> list[str]:
    base = {
        "model.path": model_dir,
        "data.num_train": str(NUM_PROMPTS),
        "data.num_eval": "0",
        "rollout.prompts_per_step": "2",
        "rollout.sampling.n": "2",
        "rollout.sampling.max_new_tokens": "6",
        "rollout.max_model_len": "256",
        "rollout.gpu_memory_utilization": "0.02",
        "rollout.max_staleness": "1",
        "placement.rollout.replicas": "2",
        "trainer.micro_batch_tokens": "256",
        "logging.wandb_mode": "disabled",
        "logging.plot": "false",
        "logging.samples_per_step": "100",
        "logging.output_dir": str(out),
        "logging.run_name": "async",
        "checkpoint.every": "2",
        "sync.audit_every": "1",
        "steps": "4",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def trained_prompts(run_dir: Path) -> list[tuple[int, int, int]]:
    """(step, index, epoch) of every prompt trained on (one row per group in samples.jsonl)."""
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return sorted({(r["step"], r["index"], r["epoch"]) for r in rows})


@pytest.mark.slow
def test_async_run_trains_each_prompt_once_within_staleness_and_resumes(tiny_model_dir, tmp_path):
    run_dir = train(load_config(REPO / "configs/async.yaml", overrides(tiny_model_dir, tmp_path)))

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["async/staleness_max"] <= 1  # never a sample more than k versions old
        assert 0 <= r["async/staleness_mean"] <= r["async/staleness_max"]
        for key in ("async/dropped_stale_samples", "async/buffer_size", "async/learner_idle_frac"):
            assert key in r, key
        assert 0 <= r["async/engine_idle_frac"] <= 1
        assert r["sync/audit_worst_engine_diff"] < 1e-3  # the pushes land in both engines
        assert r["train/optimizer_steps"] == 1
    # The engines ran ahead of the learner: some batch was generated before the latest push; and with
    # at most k batches outstanding none went stale.
    assert max(r["async/staleness_max"] for r in rows) == 1
    assert sum(r["async/dropped_stale_samples"] for r in rows) == 0

    trained = trained_prompts(run_dir)
    assert len(trained) == 4 * 2  # every step trains its prompts_per_step groups
    keys = Counter((index, epoch) for _, index, epoch in trained)
    assert max(keys.values()) == 1, "a prompt was trained twice in one epoch"
    state = load_driver_state(latest_checkpoint(run_dir))
    assert state["step"] == 4
    pending = [tuple(p) for p in state["data"]["requeued"]]
    # Nothing lost: every prompt handed out is trained or pending (regenerated on resume), never both;
    # once the stream has moved into epoch 1, every epoch-0 prompt is accounted for.
    assert not set(keys) & set(pending)
    handed_out = set(keys) | set(pending)
    if any(epoch >= 1 for _, epoch in handed_out):
        assert {i for i, e in handed_out if e == 0} == set(range(NUM_PROMPTS))

    # Resume for two more steps: the pending prompts are regenerated and trained first.
    resumed = train(
        load_config(
            REPO / "configs/async.yaml",
            [*overrides(tiny_model_dir, tmp_path), "steps=6", f"resume={run_dir}"],
        )
    )
    assert resumed == run_dir
    after = trained_prompts(run_dir)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    step5 = {(index, epoch) for step, index, epoch in after if step == 5}
    if len(pending) >= 2:
        assert step5 == set(pending[:2])
    later = Counter((index, epoch) for step, index, epoch in after if step > 4)
    assert max(later.values()) == 1 and not set(later) & set(keys)


def test_async_config_errors(tmp_path):
    recipe = REPO / "configs/quickstart.yaml"
    with pytest.raises(ConfigError, match="rollout.max_staleness"):
        load_config(recipe, ["rollout.max_staleness=-1"])
    with pytest.raises(ConfigError, match="different GPUs"):
        load_config(
            recipe,
            ["rollout.max_staleness=1", "placement.device=cuda", "placement.colocate=[[rollout,learner]]"],
        )
    with pytest.raises(ConfigError, match="recompute_old_logprobs"):
        load_config(recipe, ["rollout.max_staleness=1", "algorithm.recompute_old_logprobs=false"])
    with pytest.raises(ConfigError, match="tis needs"):
        load_config(recipe, ["algorithm.off_policy_correction=tis"])
    with pytest.raises(ConfigError, match="rollout.partial_rollouts: needs rollout.max_staleness"):
        load_config(recipe, ["rollout.partial_rollouts=true"])
    with pytest.raises(ConfigError, match="rollout.partial_chunk_tokens"):
        load_config(
            recipe,
            ["rollout.max_staleness=1", "rollout.partial_rollouts=true", "rollout.partial_chunk_tokens=0"],
        )
    cfg = load_config(recipe, ["rollout.max_staleness=2"])
    assert cfg.rollout.max_staleness == 2


@pytest.mark.slow
def test_async_background_push_and_partial_rollouts(tiny_model_dir, tmp_path):
    """With a collective transport (gloo broadcast here, NCCL on GPUs) the learner stages its weights
    and sends them from a thread while it trains on; every push still lands in both engines. With
    partial rollouts the engines generate in 2-token chunks (pushes land between chunks)."""
    extra = {
        "sync.transport": "broadcast",
        "rollout.partial_rollouts": "true",
        "rollout.partial_chunk_tokens": "2",
        "steps": "3",
        "checkpoint.every": "0",
        "logging.run_name": "bcast",
    }
    run_dir = train(
        load_config(REPO / "configs/quickstart.yaml", overrides(tiny_model_dir, tmp_path, **extra))
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["sync/background"] == 1.0
        assert r["async/staleness_max"] <= 1
        assert 0 <= r["async/resumed_frac"] <= 1
        # the audit's engine pass queues behind the push in each engine: it sees the new weights
        assert r["sync/audit_worst_engine_diff"] < 1e-3
    # from the second step on, the previous push is collected (its figures come with the next one)
    for r in rows[1:]:
        assert r["sync/wait_previous_s"] >= 0 and r["sync/bytes"] > 0
    dumped = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    for row in dumped:  # the versions that sampled each response, oldest first; never more than k behind
        assert row["versions"][0] == row["policy_version"] and max(row["versions"]) < row["step"]
        assert row["step"] - 1 - row["policy_version"] <= 1
