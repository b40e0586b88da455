"""Throughput of the `code_tests` reward: HumanEval canonical solutions scored per second.

    python experiments/bench/bench_code_reward.py --samples 512 --workers 0 8 16

Each sample is one sandboxed program (the problem's prompt + canonical body, then its tests); the
164 problems repeat to make `--samples`. Prints, per pool size, programs per second, the sandbox
mode and how many passed (all should). workers 0 = the CPUs this process may use.
"""

from __future__ import annotations

import argparse
import os
import time

from rlhf.reward.code_tests import CodeTestsReward, available_cpus
from rlhf.reward.sandbox import isolation

from rlhf.data.humaneval import load_problems
from rlhf.tasks import get_task
from rlhf.types import Prompt, Sample


def samples(n: int) -> list[Sample]:
    rows, problems = get_task("humaneval").rows(), load_problems()
    out = []
    for i in range(n):
        row, problem = rows[i % len(rows)], problems[i % len(rows)]
        prompt = Prompt(index=i, text=row["prompt"], token_ids=[1], label=row["answer"], metadata={})
        out.append(Sample(i, prompt, [1], problem["canonical_solution"], None, "stop"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--timeout-s", type=float, default=10.0)
    args = parser.parse_args()
    batch = samples(args.samples)
    print(f"nproc={os.cpu_count()} usable_cpus={available_cpus()} sandbox={isolation()} samples={len(batch)}")
    for workers in args.workers:
        reward = CodeTestsReward.from_args({"workers": workers, "timeout_s": args.timeout_s})
        start = time.perf_counter()
        scores, errors = reward.score(batch)
        seconds = time.perf_counter() - start
        reward.shutdown()
        print(
            f"workers={reward.workers:3d}  {len(batch) / seconds:7.1f} programs/s  {seconds:6.1f} s  "
            f"passed={int(sum(scores))}/{len(batch)} errors={errors}"
        )


if __name__ == "__main__":
    main()
