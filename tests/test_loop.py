"""The whole loop on Ray with a tiny model: metrics, checkpoint, resume at the right step and data position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.checkpoint import latest_checkpoint, load_driver_state
from rlhf.config_loader import load_config
from rlhf.driver import train
from rlhf.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny_overrides(model_dir: str, out_dir: Path, **extra: str) -> list[str]:
    base = {
        "model.path": model_dir,
        "data.num_eval": "4",
        "rollout.prompts_per_step": "2",
        "rollout.sampling.n": "2",
        "rollout.sampling.max_new_tokens": "8",
        "rollout.max_model_len": "256",
        "trainer.micro_batch_tokens": "256",
        "logging.wandb_mode": "disabled",
        "logging.output_dir": str(out_dir),
        "steps": "2",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_loop_writes_metrics_checkpoints_and_resumes(tiny_model_dir, tmp_path):
    overrides = tiny_overrides(
        tiny_model_dir, tmp_path, **{"checkpoint.every": "1", "logging.run_name": "loop"}
    )
    run_dir = train(load_config(REPO / "configs/quickstart.yaml", overrides))

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in (
            "reward/mean",
            "reward/accuracy",
            "train/grad_norm",
            "time/generate_s",
            "time/train_s",
            "time/sync_s",
            "perf/tokens_per_s",
            "sync/audit_logprob_diff",
            "response/length_mean",
        ):
            assert key in r, key
        # fp32 on CPU: the engine must see exactly the learner's weights after every sync.
        assert r["sync/audit_logprob_diff"] < 1e-3
    assert "eval/reward_mean" in rows[0] and "eval/reward_mean" in rows[-1]
    assert (run_dir / "reward_curve.png").stat().st_size > 0
    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == "step_000002" and (ckpt / "policy").is_dir()
    state = load_driver_state(ckpt)
    assert state["step"] == 2
    position_after_2 = state["data"]["position"]

    # Resume the same run for one more step: it starts at step 3, not 1, with the next prompts.
    resumed = train(
        load_config(REPO / "configs/quickstart.yaml", [*overrides, "steps=3", f"resume={run_dir}"])
    )
    assert resumed == run_dir
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    state = load_driver_state(latest_checkpoint(run_dir))
    assert state["step"] == 3
    assert state["data"]["position"] == position_after_2 + 2
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["dir"] == "step_000003"
