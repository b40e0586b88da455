"""The run's curve: smoothed train reward over the raw one, held-out points labelled with the
evaluation temperature actually used, entropy on its own panel."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from rlhf.production.metrics import plot_rewards, reward_figure, smooth, step_line  # noqa: E402


def test_smooth_is_a_trailing_mean():
    assert smooth([0.0, 1.0, 0.0, 1.0], window=2) == [0.0, 0.5, 0.5, 0.5]
    assert smooth([3.0, 6.0, 9.0], window=5) == [3.0, 4.5, 6.0]
    assert smooth([]) == []


def rows() -> list[dict]:
    out = [{"step": 0, "eval/reward_mean": 0.1}]
    for step in range(1, 11):
        row = {"step": step, "reward/mean": (step % 2) * 0.5, "train/entropy": 1.0 - step / 20}
        if step % 5 == 0:
            row["eval/reward_mean"] = 0.1 + step / 50
        out.append(row)
    return out


@pytest.mark.parametrize(("temperature", "label"), [(0.8, "sampled at T=0.8"), (0.0, "greedy")])
def test_figure_names_the_eval_temperature_and_has_an_entropy_panel(temperature, label):
    fig = reward_figure(rows(), eval_temperature=temperature)
    reward_ax, entropy_ax = fig.axes
    labels = [line.get_label() for line in reward_ax.get_lines()]
    assert labels == ["train reward (per step)", "train reward (5-step mean)", f"held-out reward, {label}"]
    held_out = reward_ax.get_lines()[2]
    assert list(held_out.get_xdata()) == [0, 5, 10]  # every evaluation, not only before and after
    assert list(reward_ax.get_lines()[1].get_ydata()) == pytest.approx(
        smooth([r["reward/mean"] for r in rows()[1:]])
    )
    assert entropy_ax.get_ylabel() == "entropy" and len(entropy_ax.get_lines()[0].get_xdata()) == 10
    plt.close(fig)


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    out = plot_rewards(path, tmp_path / "curve.png", eval_temperature=0.8)
    assert out.stat().st_size > 10_000
    assert plot_rewards(tmp_path / "missing.jsonl", tmp_path / "none.png") is None


def test_step_line_shows_staleness():
    line = step_line(3, 10, {"reward/mean": 0.5, "async/staleness_mean": 1.0, "async/staleness_max": 1.0})
    assert "stale 1.00" in line and "max 1" in line
