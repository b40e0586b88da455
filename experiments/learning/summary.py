"""Per-seed figures into the comparison's headline numbers, and the mean train-reward plot.

Pure functions over the run records that compare_trl.py keeps (no Ray, vLLM or TRL), so the
arithmetic behind `ours_greedy_after_mean` and friends is unit-tested on hand-computed values.
A run record: {"label": "ours" | "trl" | "ours:<variant>", "seed": int, "status": "ok" | ...,
"train_reward": [reward at step 1, 2, ...] (None where a step was not logged),
"greedy": {"<step>": accuracy}}.
"""

from __future__ import annotations

import math
from typing import Any


def spread(values: list[float]) -> dict[str, float | int | None]:
    """Mean, sample std (n - 1; 0 for one value), min and max; all None when there is no value."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"n": len(values), "mean": mean, "std": math.sqrt(var), "min": min(values), "max": max(values)}


def mean_curve(curves: list[list[float | None]]) -> list[float | None]:
    """Step-wise mean over seeds; a step where no seed logged a value is None."""
    length = max((len(c) for c in curves), default=0)
    out: list[float | None] = []
    for i in range(length):
        at = [c[i] for c in curves if i < len(c) and c[i] is not None]
        out.append(sum(at) / len(at) if at else None)
    return out


def curve_mean(curve: list[float | None], last: int | None = None) -> float | None:
    """Mean of a train-reward curve (of its last `last` steps), skipping missing steps."""
    part = curve[-last:] if last else curve
    values = [v for v in part if v is not None]
    return sum(values) / len(values) if values else None


def aggregate(runs: list[dict], steps: int, mid_step: int | None, base: float | None) -> dict[str, Any]:
    """Headline figures per label: greedy accuracy after `steps` (and at `mid_step`) per seed with its
    spread, the mean train-reward curve, and each seed's curve mean. Failed runs count nowhere."""
    labels = sorted({r["label"] for r in runs}, key=lambda x: (x != "ours", x != "trl", x))
    out: dict[str, Any] = {"base_greedy": base, "steps": steps, "mid_step": mid_step, "by_label": {}}
    for label in labels:
        ok = sorted(
            (r for r in runs if r["label"] == label and r.get("status") == "ok"), key=lambda r: r["seed"]
        )
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in ok]}
        for name, step in (("after", steps), ("mid", mid_step)):
            if step is None:
                continue
            per_seed = {str(r["seed"]): r.get("greedy", {}).get(str(step)) for r in ok}
            entry[f"greedy_{name}_per_seed"] = per_seed
            entry[f"greedy_{name}"] = spread(list(per_seed.values()))
        curves = [r.get("train_reward", []) for r in ok]
        entry["train_reward_curve_mean"] = mean_curve(curves)
        entry["train_reward_mean_per_seed"] = {
            str(r["seed"]): curve_mean(r.get("train_reward", [])) for r in ok
        }
        entry["train_reward_mean"] = spread(list(entry["train_reward_mean_per_seed"].values()))
        entry["train_reward_last5_mean"] = spread([curve_mean(c, last=5) for c in curves])
        out["by_label"][label] = entry
        key = label.replace(":", "_")
        out[f"{key}_greedy_after_mean"] = entry["greedy_after"]["mean"]
        if mid_step is not None:
            out[f"{key}_greedy_step{mid_step}_mean"] = entry["greedy_mid"]["mean"]
        out[f"{key}_train_reward_mean"] = entry["train_reward_mean"]["mean"]
    return out


def plot(aggregated: dict[str, Any], path: str, title: str) -> None:
    """Mean train-reward curve per label (with each seed faint), greedy accuracies in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, entry) in enumerate(aggregated["by_label"].items()):
        curve = entry["train_reward_curve_mean"]
        xs = [s + 1 for s, v in enumerate(curve) if v is not None]
        ys = [v for v in curve if v is not None]
        after = entry.get("greedy_after", {}).get("mean")
        text = f"{label} (n={len(entry['seeds'])}, greedy after {after:.3f})" if after is not None else label
        ax.plot(xs, ys, color=f"C{i}", label=text, linewidth=2)
    base = aggregated.get("base_greedy")
    if base is not None:
        ax.axhline(base, color="grey", linestyle=":", label=f"base model greedy held-out {base:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("train reward (mean over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
