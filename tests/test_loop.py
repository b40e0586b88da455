"""The whole loop on Ray with a tiny model: metrics, checkpoint, resume at the right step and data position."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlhf.config.loader import load_config
from rlhf.loop.driver import train
from rlhf.production.checkpoint import latest_checkpoint, load_driver_state
from rlhf.production.metrics import read_metrics
from rlhf.testing import rewind_run, step_record

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
        tiny_model_dir,
        tmp_path,
        **{
            "checkpoint.every": "1",
            "logging.run_name": "loop",
            "logging.trackers": "[tensorboard,mlflow]",
        },
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
    # The first step also audits before its push: engine and learner loaded the same model.
    assert rows[1]["sync/audit_initial_logprob_diff"] < 1e-3
    assert "sync/audit_initial_logprob_diff" not in rows[2]
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
    check_trackers(run_dir, tmp_path / "mlruns")
    check_lineage(run_dir, tmp_path)


def check_trackers(run_dir: Path, store: Path) -> None:
    """TensorBoard and MLflow hold the same figures as metrics.jsonl, the resumed step in the same
    TensorBoard directory and MLflow run as the first two."""
    from test_trackers import mlflow_history, tensorboard_scalars

    rows = read_metrics(run_dir / "metrics.jsonl")
    expected = [(r["step"], pytest.approx(r["reward/mean"])) for r in rows if "reward/mean" in r]
    assert [s for s, _ in expected] == [1, 2, 3]
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert scalars["reward/mean"] == expected
    assert [s for s, _ in scalars["eval/reward_mean"]] == [0, 2, 3]
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    assert mlflow_history(store, run_id, "reward/mean") == expected


def check_lineage(run_dir: Path, tmp_path: Path) -> None:
    """Every checkpoint carries a manifest (also in its HF export); `rlhf lineage` walks the chain
    (step 3 of the resumed run -> step 2 it resumed from -> base model) and --verify catches tampering."""
    from rlhf.cli.main import main

    ckpt = latest_checkpoint(run_dir)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert (ckpt / "policy" / "hf" / "manifest.json").read_text() == (ckpt / "manifest.json").read_text()
    assert manifest["step"] == 3 and manifest["parent"] == str(run_dir / "checkpoints" / "step_000002")
    assert (
        len(manifest["config_hash"]) == 64
        and "git_commit" in manifest["code"]
        or "package_version" in manifest["code"]
    )
    assert {"torch", "ray", "deepspeed", "transformers"} <= set(manifest["versions"])
    assert len(manifest["base_model"]["content_hash"]) == 64
    assert manifest["data"]["source"] == "builtin:arithmetic" and manifest["data"]["fingerprint"]
    assert manifest["data"]["state"]["position"] == load_driver_state(ckpt)["data"]["position"]
    assert manifest["reward_sources"][0]["name"] == "task" and manifest["seeds"]["seed"] == 0
    assert "train/loss" in manifest["metrics"]
    assert main(["lineage", str(ckpt), "--verify"]) == 0
    # tampering with what a checkpoint says produced it is caught
    copy = tmp_path / "tampered"
    shutil.copytree(ckpt, copy)
    changed = {**manifest, "config": manifest["config"].replace("steps: 3", "steps: 30"), "parent": None}
    (copy / "manifest.json").write_text(json.dumps(changed))
    assert main(["lineage", str(copy), "--verify"]) == 1
    assert main(["lineage", str(tmp_path / "nowhere")]) == 2


def test_lora_resume_reproduces_the_next_step(tiny_model_dir, tmp_path):
    """Stop after step 1, resume: step 2 sees the same prompts, the same samples (the CPU engine's
    sampling is seeded by the prompts, rollout.reproducible_sampling) and gives the same loss.
    With LoRA (and a KL term: the reference is the policy with its adapters off) the checkpoint
    holds the adapter in PEFT's format and the manifest names it. (Full fine-tuning: the same
    reproduction, through a storage URI and a fresh Ray job, is tests/test_cluster.py's.)"""
    overrides = tiny_overrides(
        tiny_model_dir,
        tmp_path,
        **{"checkpoint.every": "1", "logging.run_name": "whole", "data.num_eval": "0"},
    )
    overrides += [
        "trainer.lora.rank=8",
        "trainer.lora.sync=adapter",
        "trainer.lr=1e-3",
        "algorithm.kl_coef=0.05",
    ]
    original = train(load_config(REPO / "configs/quickstart.yaml", overrides))
    step1 = original / "checkpoints/step_000001"
    assert (step1 / "policy/adapter/adapter_model.safetensors").is_file()
    adapter = json.loads((step1 / "manifest.json").read_text())["adapter"]
    assert adapter["rank"] == 8 and adapter["path"] == "policy/adapter" and len(adapter["content_hash"]) == 64

    # The same run as if it had died after its step-1 checkpoint.
    stopped = tmp_path / "stopped"
    shutil.copytree(original, stopped)
    rewind_run(str(stopped), 1)
    train(load_config(REPO / "configs/quickstart.yaml", [*overrides, f"resume={stopped}"]))

    samples_a, metrics_a = step_record(original, 2)
    samples_b, metrics_b = step_record(stopped, 2)
    assert samples_a and samples_b == samples_a  # same prompts, same responses
    assert metrics_b["reward/mean"] == metrics_a["reward/mean"]
    assert metrics_b["train/loss"] == pytest.approx(metrics_a["train/loss"], rel=1e-5, abs=1e-7)
    assert metrics_b["train/grad_norm"] == pytest.approx(metrics_a["train/grad_norm"], rel=1e-5)
