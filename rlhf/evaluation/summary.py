"""The lines a run ends with: held-out reward before -> after, steps, wall time, where the run directory
and the curve are, and a hint when the run did not learn (read back from `metrics.jsonl`)."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.evaluation.sets import HEADLINE

FLAT = 0.02  # a held-out change smaller than this counts as no change
NO_SIGNAL = 0.5  # more than this share of groups with one reward for every sample: little to learn from


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: the rest still counts
            continue
    return rows


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def closing_lines(rows: list[dict], run_dir: Path, curve: Path | None, wall_s: float) -> list[str]:
    """One summary line, then a hint line where the curve is flat; `rows` as in metrics.jsonl."""
    evals = sorted((r["step"], r[HEADLINE]) for r in rows if HEADLINE in r)
    trained = [r for r in rows if "reward/mean" in r]
    steps = max((r["step"] for r in trained), default=0)
    parts = [f"{steps} steps in {wall_s / 60:.1f} min"]
    if len(evals) >= 2:
        parts.insert(
            0,
            f"held-out reward {evals[0][1]:.3f} (step {evals[0][0]}) → {evals[-1][1]:.3f} (step {evals[-1][0]})",
        )
    elif evals:
        parts.insert(0, f"held-out reward {evals[0][1]:.3f} at step {evals[0][0]}")
    rewards = [r["reward/mean"] for r in trained]
    if len(rewards) >= 2:
        k = max(1, min(5, len(rewards) // 2))
        parts.append(
            f"train reward {_mean(rewards[:k]):.3f} (first {k}) → {_mean(rewards[-k:]):.3f} (last {k})"
        )
    parts.append(f"run directory {run_dir}")
    if curve is not None:
        parts.append(f"curve {curve}")
    lines = ["done: " + "; ".join(parts)]
    hint = flat_hint(
        evals,
        rewards,
        [r["reward/zero_std_groups_frac"] for r in trained if "reward/zero_std_groups_frac" in r],
    )
    if hint:
        lines.append("hint: " + hint)
    return lines


def flat_hint(evals: list[tuple[int, float]], rewards: list[float], zero_std: list[float]) -> str | None:
    """Why a run that did not move may not have learned, from what it logged; None when it moved."""
    moved_held_out = len(evals) >= 2 and abs(evals[-1][1] - evals[0][1]) >= FLAT
    k = max(1, min(5, len(rewards) // 2))
    moved_train = len(rewards) >= 2 and abs(_mean(rewards[-k:]) - _mean(rewards[:k])) >= FLAT
    if moved_held_out or (len(evals) < 2 and moved_train) or not rewards:
        return None
    no_signal = _mean(zero_std)
    mean_reward = _mean(rewards)
    if no_signal is not None and no_signal > NO_SIGNAL:
        if mean_reward <= 0.05:
            why = (
                "almost no sample is rewarded: pick an easier task, a longer response budget, or more samples"
            )
        elif mean_reward >= 0.95:
            why = "almost every sample is already right: pick a harder task"
        else:
            why = "raise rollout.sampling.n or the temperature, or pick a task the model solves sometimes"
        return (
            f"the curve is flat; in {no_signal:.0%} of the groups every sample got the same reward, so their "
            f"advantages are zero and they teach nothing: {why}"
        )
    return (
        "the curve is flat although most groups had rewards to compare: try a higher trainer.lr or more "
        "steps, and check reward/mean and train/grad_norm in metrics.jsonl"
    )
