"""The closing lines of a run (rlhf/evaluation/summary.py) and the per-step share of groups without signal,
against hand-built metrics."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.evaluation.summary import closing_lines, read_metrics
from rlhf.production.metrics import sample_metrics
from rlhf.types import Prompt, Sample


def rows(evals: dict[int, float], rewards: list[float], zero_std: float | None = None) -> list[dict]:
    out = [{"step": s, "eval/reward_mean": r} for s, r in evals.items()]
    for i, r in enumerate(rewards, start=1):
        row = {"step": i, "reward/mean": r}
        if zero_std is not None:
            row["reward/zero_std_groups_frac"] = zero_std
        out.append(row)
    return out


def test_a_run_that_learned_gets_one_line_and_no_hint():
    lines = closing_lines(
        rows({0: 0.141, 10: 0.25, 20: 0.289}, [0.1] * 5 + [0.2] * 10 + [0.4] * 5),
        Path("runs/q"),
        Path("runs/q/reward_curve.png"),
        600.0,
    )
    assert lines == [
        "done: held-out reward 0.141 (step 0) → 0.289 (step 20); 20 steps in 10.0 min; "
        "train reward 0.100 (first 5) → 0.400 (last 5); run directory runs/q; curve runs/q/reward_curve.png"
    ]


def test_flat_run_without_signal_names_the_cause():
    # every sample of most groups got reward 0: nothing to learn from them
    lines = closing_lines(
        rows({0: 0.10, 4: 0.105}, [0.02, 0.03, 0.02, 0.01], zero_std=0.9), Path("r"), None, 90
    )
    assert lines[0] == (
        "done: held-out reward 0.100 (step 0) → 0.105 (step 4); 4 steps in 1.5 min; "
        "train reward 0.025 (first 2) → 0.015 (last 2); run directory r"
    )
    assert lines[1].startswith(
        "hint: the curve is flat; in 90% of the groups every sample got the same reward"
    )
    assert lines[1].endswith("pick an easier task, a longer response budget, or more samples")
    easy = closing_lines(rows({0: 0.97, 4: 0.97}, [0.99] * 4, zero_std=0.8), Path("r"), None, 60)
    assert easy[1].endswith("almost every sample is already right: pick a harder task")
    middling = closing_lines(rows({0: 0.5, 4: 0.5}, [0.5] * 4, zero_std=0.6), Path("r"), None, 60)
    assert middling[1].endswith(
        "raise rollout.sampling.n or the temperature, or pick a task the model solves sometimes"
    )


def test_flat_run_with_signal_suggests_the_learning_rate():
    lines = closing_lines(rows({0: 0.3, 8: 0.3}, [0.3] * 8, zero_std=0.2), Path("r"), None, 60)
    assert lines[1].startswith(
        "hint: the curve is flat although most groups had rewards to compare: try a higher trainer.lr"
    )


def test_without_held_out_the_train_reward_decides(tmp_path):
    moved = closing_lines(rows({}, [0.1, 0.1, 0.5, 0.5]), Path("r"), None, 30)
    assert moved == [
        "done: 4 steps in 0.5 min; train reward 0.100 (first 2) → 0.500 (last 2); run directory r"
    ]
    # a line cut by a crash is skipped, the rest is read
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "reward/mean": 0.2}) + "\n" + '{"step": 2, "rew')
    assert read_metrics(path) == [{"step": 1, "reward/mean": 0.2}]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_zero_std_groups_frac_counts_groups_with_one_reward():
    p = Prompt(0, "q", [1, 2])
    rewards = {0: [1.0, 1.0], 1: [0.0, 1.0], 2: [0.0, 0.0], 3: [0.5, 0.25]}
    samples = [
        Sample(
            group=g,
            prompt=p,
            response_ids=[3],
            response_text="x",
            logprobs=None,
            finish_reason="stop",
            reward=r,
        )
        for g, rs in rewards.items()
        for r in rs
    ]
    assert sample_metrics(samples)["reward/zero_std_groups_frac"] == 0.5  # groups 0 and 2 of 4
