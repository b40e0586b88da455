"""Run the quickstart for several seeds and record greedy held-out accuracy (mean and spread).

    python experiments/quickstart_seeds.py --seeds 0 1 2 --out experiments/results/cpu/quickstart_summary.json \
        [key=value overrides for every run, e.g. rollout.max_staleness=1]

Each seed sets the run's `seed` and `rollout.seed` (sampling); the prompt stream and the 128 held-out
prompts stay the same for every seed, so the seeds differ only in what the policy samples. The
held-out set is scored greedily (`rollout.eval_temperature=0`) at every `eval_every` step. Runs go one
after the other (each uses every core); the summary is rewritten after each run. With `--reuse`, a seed
whose run directory already holds a finished run of this script (same runs-dir) is read, not rerun:
seeds can be run one at a time (e.g. between other jobs on shared cores) and summarised together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def eval_curve(run_dir: Path) -> dict[int, float]:
    """step -> held-out reward (eval/reward_mean) from the run's metrics.jsonl."""
    curve = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/reward_mean" in row:
            curve[int(row["step"])] = float(row["eval/reward_mean"])
    return curve


def summarise(runs: list[dict]) -> dict:
    """Mean and spread over the finished runs (hand-checkable: plain means, population stdev)."""
    done = [r for r in runs if r.get("greedy_after") is not None]
    if not done:
        return {}
    before = [r["greedy_before"] for r in done]
    after = [r["greedy_after"] for r in done]
    gains = [a - b for a, b in zip(after, before)]
    return {
        "seeds_done": len(done),
        "greedy_before_mean": statistics.fmean(before),
        "greedy_after_mean": statistics.fmean(after),
        "gain_mean": statistics.fmean(gains),
        "gain_min": min(gains),
        "gain_max": max(gains),
        "gain_stdev": statistics.pstdev(gains),
        "wall_min_mean": statistics.fmean(r["wall_min"] for r in done),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--out", required=True, help="summary JSON")
    ap.add_argument("--runs-dir", default="runs/quickstart_seeds")
    ap.add_argument(
        "--reuse", action="store_true", help="read finished seeds' runs instead of rerunning them"
    )
    ap.add_argument("overrides", nargs="*", help="key=value for every run")
    args = ap.parse_args()
    out = Path(args.out)
    runs: list[dict] = []
    for seed in args.seeds:
        name = f"seed{seed}"
        cmd = [
            str(REPO / ".venv/bin/rlhf"),
            "train",
            args.config,
            f"seed={seed}",
            f"rollout.seed={seed}",
            "rollout.eval_temperature=0",
            f"logging.output_dir={args.runs_dir}",
            f"logging.run_name={name}",
            "logging.wandb_mode=disabled",
            *args.overrides,
        ]
        run_dir = REPO / args.runs_dir / name
        record = run_dir / "quickstart_seeds_run.json"
        if args.reuse and record.exists() and json.loads(record.read_text())["cmd"] == cmd[1:]:
            done = json.loads(record.read_text())
            rc, wall = done["rc"], done["wall_min"]
            print(f"== seed {seed}: reusing {run_dir}", flush=True)
        else:
            print("==", " ".join(cmd), flush=True)
            start = time.perf_counter()
            rc = subprocess.run(cmd, cwd=REPO).returncode
            wall = (time.perf_counter() - start) / 60
            if run_dir.exists():
                record.write_text(json.dumps({"cmd": cmd[1:], "rc": rc, "wall_min": round(wall, 2)}))
        curve = eval_curve(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
        steps = sorted(curve)
        runs.append(
            {
                "seed": seed,
                "rc": rc,
                "wall_min": round(wall, 2),
                "greedy_curve": {str(s): curve[s] for s in steps},
                "greedy_before": curve[steps[0]] if steps and steps[0] == 0 else None,
                "greedy_after": curve[steps[-1]] if steps and steps[-1] > 0 else None,
            }
        )
        summary = {
            "command": " ".join([sys.executable, *sys.argv]),
            "config": args.config,
            "overrides": args.overrides,
            "eval": "greedy (rollout.eval_temperature=0), data.num_eval held-out prompts never trained on",
            **summarise(runs),
            "runs": runs,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))
        print(f"== seed {seed}: rc={rc} {wall:.1f} min, greedy {runs[-1]['greedy_curve']}", flush=True)


if __name__ == "__main__":
    main()
