"""Where every number a user sees goes: `metrics.jsonl`, the trackers (W&B, TensorBoard, MLflow), the
console line and the reward plot."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf.production.trackers import TrackerGroup, default_log, open_trackers
from rlhf.types import Sample

# The per-step console line: (metric key, label, format).
STEP_LINE = [
    ("reward/mean", "reward", "{:.3f}"),
    ("reward/std", "±", "{:.3f}"),
    ("reward/accuracy", "acc", "{:.2f}"),
    ("train/kl", "kl", "{:.4f}"),
    ("train/entropy", "ent", "{:.3f}"),
    ("response/length_mean", "len", "{:.0f}"),
    ("train/clip_frac", "clip", "{:.3f}"),
    ("train/grad_norm", "gnorm", "{:.3f}"),
    ("sync/audit_logprob_diff", "audit", "{:.1e}"),
    ("async/staleness_mean", "stale", "{:.2f}"),
    ("async/staleness_max", "max", "{:.0f}"),
    ("async/dropped_stale_samples", "dropped", "{:.0f}"),
    ("time/generate_s", "gen", "{:.1f}s"),
    ("time/reward_s", "rew", "{:.1f}s"),
    ("time/train_s", "train", "{:.1f}s"),
    ("time/sync_s", "sync", "{:.2f}s"),
    ("perf/tokens_per_s", "tok/s", "{:.0f}"),
]


_PHASE: dict[str, object] = {"name": None, "since": 0.0}  # the phase in progress (stall warnings)


def current_phase() -> tuple[str | None, float]:
    """The name of the phase a step is in now (None between phases) and since when (perf_counter)."""
    return _PHASE["name"], float(_PHASE["since"])


class Timer:
    """Accumulates wall-clock seconds per phase of one step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        _PHASE.update(name=name, since=start)
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            _PHASE.update(name=None, since=time.perf_counter())

    def as_metrics(self) -> dict[str, float]:
        return {f"time/{k}_s": v for k, v in self.seconds.items()}


class MetricsLogger:
    """`metrics.jsonl` (always: the closing summary and the plot read it) and the trackers of
    `logging.trackers` (rlhf/production/trackers.py), each step with the same figures."""

    def __init__(
        self,
        run_dir: Path,
        run_name: str,
        logging_cfg,
        config: dict[str, Any],
        log: Callable[[str], None] = default_log,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.trackers = TrackerGroup(open_trackers(logging_cfg, self.run_dir, run_name, log), log)
        self.trackers.log_config(config)
        self.wandb = self.trackers.get("wandb")
        self.artifacts = None
        if self.wandb is not None:
            from rlhf.production.artifacts import ArtifactLog

            self.artifacts = ArtifactLog(self.wandb.run)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        self.trackers.log(clean, step)

    def log_dataset(self, data_cfg) -> None:
        """The training data as a W&B artifact (rlhf/production/artifacts.py); nothing without W&B."""
        if self.artifacts is not None:
            self.artifacts.log_dataset(data_cfg)

    def log_checkpoint(self, checkpoint_dir: Path, parent: str | None) -> None:
        """A saved checkpoint as a W&B artifact version, linked to the dataset and its parent."""
        if self.artifacts is not None:
            self.artifacts.log_checkpoint(checkpoint_dir, parent)

    def log_image(self, key: str, path: Path | None) -> None:
        """The same figure in W&B (offline runs keep it in their local files)."""
        if self.wandb is not None and path is not None:
            self.wandb.log_image(key, path)

    def close(self) -> None:
        self.trackers.finish()


def step_line(step: int, total: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key, label, fmt in STEP_LINE:
        if key in metrics:
            parts.append(f"{label} {fmt.format(metrics[key])}")
    return " | ".join(parts)


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing mean over the last `window` values (the first ones average what there is)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_rewards(metrics_path: Path, out_png: Path, eval_temperature: float | None = None) -> Path | None:
    """The run's curve as a PNG (see `reward_figure`); None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = reward_figure(read_metrics(metrics_path), eval_temperature)
    if fig is None:
        return None
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def reward_figure(rows: list[dict[str, float]], eval_temperature: float | None = None):
    """Train reward (raw, and a 5-step trailing mean) with the held-out reward at every evaluation,
    its legend naming the evaluation temperature; entropy on a second panel."""
    train = [(r["step"], r["reward/mean"]) for r in rows if "reward/mean" in r]
    evals = sorted((r["step"], r["eval/reward_mean"]) for r in rows if "eval/reward_mean" in r)
    entropy = [(r["step"], r["train/entropy"]) for r in rows if "train/entropy" in r]
    if not train and not evals:
        return None
    import matplotlib.pyplot as plt

    fig, (ax, ax_ent) = plt.subplots(
        2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    if train:
        steps, values = zip(*train)
        ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1, label="train reward (per step)")
        ax.plot(
            steps, smooth(list(values)), color="tab:blue", linewidth=2, label="train reward (5-step mean)"
        )
    if evals:
        if eval_temperature is None:
            how = ""
        elif eval_temperature == 0:
            how = ", greedy"
        else:
            how = f", sampled at T={eval_temperature:g}"
        ax.plot(*zip(*evals), "o-", color="tab:orange", linewidth=2, label=f"held-out reward{how}")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if entropy:
        ax_ent.plot(*zip(*entropy), color="tab:green", linewidth=1.5)
    ax_ent.set_ylabel("entropy")
    ax_ent.set_xlabel("step")
    ax_ent.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def sample_metrics(samples: list) -> dict[str, float]:
    """Reward, length and (multi-turn) episode figures of one step's samples."""
    import numpy as np
    import torch

    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float32)
    out = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std(unbiased=False)),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/truncated_frac": float(np.mean([s.truncated for s in samples])),
    }
    by_group: dict[int, set[float]] = {}
    for s in samples:
        by_group.setdefault(s.group, set()).add(float(s.reward))
    # groups whose samples all got one reward: zero GRPO advantages, nothing to learn from them
    out["reward/zero_std_groups_frac"] = float(np.mean([len(r) == 1 for r in by_group.values()]))
    if all("task" in s.reward_parts for s in samples):
        out["reward/accuracy"] = float(np.mean([s.reward_parts["task"] for s in samples]))
    if any(s.episode is not None for s in samples):
        out.update(episode_metrics(samples))
    return out


def sample_rows(samples: list, step: int) -> list[dict[str, Any]]:
    """samples.jsonl rows: what the policy wrote, its reward and the policy version(s) behind it."""
    return [
        {
            "step": step,
            "group": s.group,
            "prompt": s.prompt.text,
            "response": s.response_text,
            "label": str(s.prompt.label),
            "reward": s.reward,
            "parts": s.reward_parts,
            "finish_reason": s.finish_reason,
            "index": s.prompt.index,
            "epoch": s.prompt.metadata.get("epoch", 0),
            "policy_version": s.policy_version,
            "versions": sorted(set(s.token_versions)) if s.token_versions else [s.policy_version],
        }
        for s in samples
    ]


def episode_metrics(samples: list[Sample]) -> dict[str, float]:
    """`episode/*` figures of a step's multi-turn samples (logged with reward/* and response/*)."""
    episodes = [s.episode for s in samples if s.episode is not None]
    policy = [sum(s.response_mask) for s in samples if s.response_mask is not None]
    out = {
        "episode/turns_mean": sum(e["turns"] for e in episodes) / len(episodes),
        "episode/env_reward_mean": sum(e["reward"] for e in episodes) / len(episodes),
        "episode/done_frac": sum(s.finish_reason == "stop" for s in samples) / len(samples),
        "episode/env_errors": float(sum(bool(e.get("error")) for e in episodes)),
        "episode/policy_tokens_mean": sum(policy) / max(1, len(policy)),
    }
    infos = [e.get("info") or {} for e in episodes]
    if any("success" in i for i in infos):  # the task itself, without shaping rewards
        out["episode/success_frac"] = sum(bool(i.get("success")) for i in infos) / len(infos)
    if any("tool_calls" in i for i in infos):  # tool environments
        out["episode/tool_call_frac"] = sum(i.get("tool_calls", 0) > 0 for i in infos) / len(infos)
        out["episode/tool_calls_mean"] = sum(i.get("tool_calls", 0) for i in infos) / len(infos)
        out["episode/tool_errors_mean"] = sum(i.get("tool_errors", 0) for i in infos) / len(infos)
    return out
