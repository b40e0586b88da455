"""Rule `code_tests`: run the response's Python code against the row's tests in the code sandbox.

The code is the response's last fenced Python block (```python, ```py or an untagged ``` fence),
else the whole response. The label holds the tests: a string of Python test code (asserts, or
`test_*` functions), or a dict {"test": ..., "prompt": ..., "entry_point": ...} for completion-style
problems such as HumanEval: the response continues `prompt` unless it defines `entry_point` itself.

Each program runs in its own confined child process (rlhf/reward/sandbox.py); a pool of `workers`
threads keeps that many children running, so a batch takes about
`per-sample time x batch / workers` and never more than `timeout_s x ceil(batch / workers)`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from rlhf.reward.rules import RewardError, RuleReward, score_each
from rlhf.reward.sandbox import ERROR_CLASSES, Limits, Outcome, isolation, run

from rlhf.types import Sample

ARGS = ("timeout_s", "memory_mb", "file_size_mb", "workers", "partial_credit")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str:
    """The last fenced Python (or untagged) block; a block left open by a cut-off response runs to
    the end; no fence: the whole response."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def program(response: str, label: Any) -> tuple[str, str]:
    """(code, tests) of one sample. ValueError names what is wrong with the label."""
    if isinstance(label, str):
        if not label.strip():
            raise ValueError("code_tests: the label (the tests) is empty")
        return extract_code(response), label
    if isinstance(label, dict) and isinstance(label.get("test"), str):
        code = extract_code(response)
        prefix, entry = label.get("prompt") or "", label.get("entry_point")
        if entry and re.search(rf"^(async\s+)?def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
            return prefix + "\n" + code, label["test"]  # a whole function: it replaces the prompt's stub
        return prefix + code, label["test"]  # a continuation of the prompt (the function body)
    raise ValueError(
        "code_tests: the label must be Python test code (a string) or a dict with a 'test' string, "
        f"got {type(label).__name__}"
    )


def _number(args: dict, key: str, default: float, minimum: float, kind=float):
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise RewardError(f"rule 'code_tests': args.{key} must be a number >= {minimum}, got {value!r}")
    return kind(value)


class CodeTestsReward(RuleReward):
    """Scores samples by running their code; `last_results` holds the outcomes of the last batch."""

    def __init__(self, limits: Limits, workers: int, partial_credit: bool, name: str = "code_tests"):
        super().__init__(name, self._score_one)
        self.limits, self.workers, self.partial_credit = limits, workers, partial_credit
        self._pool: ThreadPoolExecutor | None = None
        self.last_results: list[Outcome | None] = []

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> CodeTestsReward:
        """args: timeout_s (5), memory_mb (1024), file_size_mb (16), workers (0: the CPUs this
        process may use), partial_credit (false: 1 only when every test passes)."""
        args = dict(args or {})
        unknown = sorted(set(args) - set(ARGS))
        if unknown:
            raise RewardError(f"rule 'code_tests': unknown args {unknown} (known: {', '.join(ARGS)})")
        partial = args.get("partial_credit", False)
        if not isinstance(partial, bool):
            raise RewardError(
                f"rule 'code_tests': args.partial_credit must be true or false, got {partial!r}"
            )
        limits = Limits(
            timeout_s=_number(args, "timeout_s", 5.0, 0.1),
            memory_mb=_number(args, "memory_mb", 1024, 64, int),
            file_size_mb=_number(args, "file_size_mb", 16, 1, int),
        )
        workers = _number(args, "workers", 0, 0, int) or available_cpus()
        isolation()  # decide the sandbox mode now (a trial run), not in the first step
        return cls(limits, workers, partial)

    def reward_of(self, outcome: Outcome) -> float:
        if self.partial_credit:
            return outcome.passed / outcome.total
        return float(outcome.ok)

    def _score_one(self, prompt: str, response: str, label: Any) -> float:
        code, tests = program(response, label)
        return self.reward_of(run(code, tests, self.limits))

    # Batches: every sample is submitted to the pool first, then collected in order.
    def submit(self, samples: list[Sample]) -> list[Future]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="code-tests")
        return [self._pool.submit(self._run_sample, s) for s in samples]

    def _run_sample(self, sample: Sample) -> Outcome:
        code, tests = program(sample.response_text, sample.prompt.label)
        return run(code, tests, self.limits)  # tests that do not parse: ValueError, the sample's error

    def collect(self, pending: list[Future], samples: list[Sample], source: str, on_error: str):
        """(scores, errors) as `RuleReward.score`; a sample whose label is unusable is an error."""
        outcomes: list[Outcome | None] = [None] * len(samples)

        def value(i: int, _sample: Sample) -> float:
            outcomes[i] = pending[i].result()
            return self.reward_of(outcomes[i])

        try:
            return score_each(source, samples, value, on_error)
        finally:
            self.last_results = outcomes

    def score(self, samples, source: str | None = None, on_error: str = "raise"):
        return self.collect(self.submit(list(samples)), list(samples), source or self.name, on_error)

    def stats(self) -> dict[str, float]:
        """Counts of each error class in the last batch, and its mean fraction of tests passed."""
        done = [o for o in self.last_results if o is not None]
        counts = Counter(o.status for o in done)
        out = {status: float(counts.get(status, 0)) for status in ERROR_CLASSES}
        if done:
            out["tests_passed_frac"] = sum(o.passed / o.total for o in done) / len(done)
            out["seconds_max"] = max(o.seconds for o in done)
        return out

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what Ray or the container gives it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
