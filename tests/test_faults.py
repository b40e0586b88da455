"""Self-healing: a rollout engine killed mid-step is restarted, reloaded and its prompts re-sent; a
learner rank killed mid-run restarts the learners from the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray

from rlhf.actor_group import RunStopped
from rlhf.config.loader import load_config
from rlhf.loop.driver import Trainer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

PROMPTS, N, TOKENS = 4, 4, 160


def run_overrides(model_dir: str, out, **extra: str) -> list[str]:
    """A tiny run whose generation lasts long enough to be hit (ignore_eos: a known token count)."""
    base = {
        "model.path": model_dir,
        "data.num_eval": "0",
        "rollout.prompts_per_step": str(PROMPTS),
        "rollout.sampling.n": str(N),
        "rollout.sampling.max_new_tokens": str(TOKENS),
        "rollout.sampling.ignore_eos": "true",
        "rollout.max_model_len": "256",
        "rollout.gpu_memory_utilization": "0.02",
        "trainer.micro_batch_tokens": "1024",
        "logging.wandb_mode": "disabled",
        "logging.plot": "false",
        "logging.output_dir": str(out),
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


def test_engine_and_reward_model_killed_mid_step_are_restarted(tiny_model_dir, rm_path, tmp_path):
    """A real run with two engines and a reward-model actor: an engine killed while step 2 generates
    and the reward model killed while step 3 generates are each restarted, and every step completes
    on the expected samples; then a crash loop and a dead learner rank stop the run in one line."""
    sources = f"[{{kind: rule, name: task}}, {{kind: model, path: {rm_path}}}]"
    overrides = run_overrides(
        tiny_model_dir, tmp_path, **{"placement.rollout.replicas": "2", "reward.sources": sources}
    )
    cfg = load_config(REPO / "configs/quickstart.yaml", overrides)
    trainer = Trainer(cfg)
    trainer.roles = trainer.start_roles()
    try:
        rollout = trainer.roles.rollout
        first = trainer.step_once()
        trainer.step += 1
        assert first["fault/engine_restarts"] == 0

        victim = rollout.engines[1]
        killer = threading.Timer(0.2, lambda: ray.kill(victim, no_restart=True))
        killer.start()  # lands while the next step generates (or, on a slow day, while it trains)
        metrics = trainer.step_once()
        trainer.step += 1
        killer.join()
        assert metrics["fault/engine_restarts"] == 1 and rollout.engines[1] != victim
        # every prompt's group is whole: nothing lost to the dead engine
        assert metrics["train/num_tokens"] == PROMPTS * N * TOKENS
        assert metrics["perf/generated_tokens"] == PROMPTS * N * TOKENS
        # the restarted engine runs the learner's current weights (the audit scores on every engine)
        assert metrics["sync/audit_worst_engine_diff"] < 1e-3

        assert metrics["fault/reward_restarts"] == 0

        # The reward model dies while step 3 generates: the next scoring restarts it.
        reward_actor = trainer.roles.reward.sources[1].actors[0]
        killer = threading.Timer(0.2, lambda: ray.kill(reward_actor, no_restart=True))
        killer.start()
        again = trainer.step_once()
        trainer.step += 1
        killer.join()
        assert again["fault/engine_restarts"] == 1 and again["sync/audit_worst_engine_diff"] < 1e-3
        assert again["fault/reward_restarts"] == 1
        assert again["reward/errors"] == 0 and again["train/num_tokens"] == PROMPTS * N * TOKENS

        # A crash loop stops the run with one message naming the engine and its last error.
        rollout.cfg.rollout.max_restarts = 1
        with pytest.raises(RuntimeError, match=r"rollout engine 1 died 2 times .* last error: out of memory"):
            rollout.restart(1, RuntimeError("out of memory"))

        # Past trainer.max_restarts a dead learner rank stops the run: one line names it and the
        # command that resumes from the last checkpoint.
        trainer.step += 1
        trainer.cfg.trainer.max_restarts = 0
        ray.kill(trainer.roles.policy.actors[0], no_restart=True)
        with pytest.raises(RunStopped) as stopped:
            trainer.run_step()
        message = str(stopped.value)
        assert "\n" not in message
        assert message.startswith("policy rank 0 died during ") and "in step 5" in message
        assert f"resume={trainer.run_dir}" in message and "step 0 (no checkpoint yet)" in message
    finally:
        trainer.shutdown()


def test_learner_rank_killed_mid_run_restarts_from_the_checkpoint(tiny_model_dir, tmp_path):
    """`kill -9` of the policy rank's process during step 2, after the step-1 checkpoint: the learners
    restart from that checkpoint inside the job, steps 2 and 3 run from there, and the run ends with
    every planned step trained on its whole batch."""
    steps = 3
    overrides = run_overrides(
        tiny_model_dir,
        tmp_path,
        **{"steps": str(steps), "checkpoint.every": "1", "logging.run_name": "chaos"},
    )
    trainer = Trainer(load_config(REPO / "configs/quickstart.yaml", overrides))
    metrics_file = trainer.run_dir / "metrics.jsonl"
    killed: list[int] = []

    def logged_steps() -> set[int]:
        if not metrics_file.exists():
            return set()
        return {json.loads(line)["step"] for line in metrics_file.read_text().splitlines() if line.strip()}

    def kill_during_step_2() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if 1 in logged_steps() and (trainer.run_dir / "checkpoints/step_000001").is_dir():
                policy = trainer.roles.policy.actors[0]
                pid = ray.get(policy.__ray_call__.remote(lambda self: os.getpid()))
                time.sleep(0.3)  # step 2 is generating: the learner's next call finds it dead
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_during_step_2, daemon=True)
    killer.start()
    run_dir = trainer.run()
    killer.join(timeout=5)
    assert killed, "the learner was never killed"

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    trained = {r["step"]: r for r in rows if "train/num_tokens" in r}  # a redone step: its last row
    assert sorted(trained) == list(range(1, steps + 1))
    assert all(r["train/num_tokens"] == PROMPTS * N * TOKENS for r in trained.values())
    assert trained[steps]["fault/learner_restarts"] == 1 and trained[1]["fault/learner_restarts"] == 0
    assert (run_dir / f"checkpoints/step_{steps:06d}").is_dir()
