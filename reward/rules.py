"""Rule rewards: plain Python functions run inline in the driver (they are cheap).

Every rule, built-in or user-written, has one signature:

    fn(prompt: str, response: str, label, **args) -> float

`prompt` is the prompt text as the policy saw it (after the chat template), `response` the sampled
text, `label` the dataset's answer column (`Prompt.label`), and `args` the source's `args` from the
config. Also home of `RewardError` and the checks every reward source shares.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rlhf.types import Sample

log = logging.getLogger(__name__)

RewardFn = Callable[..., float]


# What a sample that cannot be scored gets, by reward.on_error ("raise" stops the step): "drop" marks
# it NaN, and the driver leaves its whole group out of training (`drop_unscored_groups`).
UNSCORED = {"zero": "scored 0", "drop": "its group is dropped"}


class RewardError(RuntimeError):
    """A reward source failed or returned something that is not a finite number."""


class NoAnswer(ValueError):
    """The response holds no answer a rule can read (none at all, malformed, past the time limit): the
    policy's fault, not the reward's. It scores 0 and is counted in `reward/errors`, whatever
    `reward.on_error` says (a run must not stop, nor drop the group, because the model wrote garbage)."""


def describe_sample(sample: Sample) -> str:
    """Enough to find the sample again: its group, its prompt's dataset index, the response start."""
    return (
        f"sample (group {sample.group}, prompt {sample.prompt.index}, response {sample.response_text[:80]!r})"
    )


def check_reward(value: Any) -> float:
    """A finite float, or ValueError: a NaN reward would silently poison the advantages."""
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isfinite(value):
            return value
        raise ValueError(f"returned {value}, expected a finite number")
    raise ValueError(f"returned {value!r} of type {type(value).__name__}, expected a float")


def score_each(
    source: str, samples: Sequence[Sample], value_of: Callable[[int, Sample], Any], on_error: str
) -> tuple[list[float], int]:
    """Check `value_of(i, sample)` for every sample under the `on_error` policy: (scores, errors).

    `source` names the config entry in messages, e.g. "reward.sources[0] (my_pkg.rewards:score)".
    """
    scores, errors, no_answers = [], 0, 0
    for i, sample in enumerate(samples):
        try:
            scores.append(check_reward(value_of(i, sample)))
        except NoAnswer as exc:
            if no_answers == 0:
                log.info("%s: %s scored 0: %s", source, describe_sample(sample), exc)
            scores.append(0.0)
            no_answers += 1
        except Exception as exc:
            message = f"{source} failed on {describe_sample(sample)}: {type(exc).__name__}: {exc}"
            if on_error not in ("zero", "drop"):
                raise RewardError(message) from exc
            if errors == 0:
                log.warning("%s (%s; reward.on_error=%s)", message, UNSCORED[on_error], on_error)
            scores.append(0.0 if on_error == "zero" else math.nan)
            errors += 1
    return scores, errors + no_answers


def load_reward_function(path: str) -> RewardFn:
    """Import a user reward function from "pkg.module:fn"."""
    from rlhf.user_code import DottedPathError, import_object, split_path

    try:
        _, attr = split_path(path)
    except DottedPathError:
        raise RewardError(f"reward function {path!r}: expected 'pkg.module:function'") from None
    try:
        fn = import_object(path)  # also "pkg.mod:Class.method"
    except DottedPathError as exc:
        raise RewardError(f"reward function {path!r}: {exc}") from exc
    if not callable(fn):
        raise RewardError(f"reward function {path!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def _task_rule(task) -> RewardFn:
    def task_reward(prompt: str, response: str, label: Any) -> float:
        return task.check(response, label)

    return task_reward


def _format_rule(pattern: str | None) -> RewardFn:
    from rlhf.tasks import format_reward

    def format_ok(prompt: str, response: str, label: Any) -> float:
        return format_reward(response) if pattern is None else format_reward(response, pattern)

    return format_ok


class RuleReward:
    """One rule source: `fn(prompt, response, label, **args)` applied to every sample."""

    def __init__(
        self, name: str, fn: RewardFn, args: dict[str, Any] | None = None, timeout_s: float | None = None
    ):
        self.name = name
        self.fn = fn
        self.args = dict(args or {})
        self.timeout_s = timeout_s  # user functions only: a call that hangs is abandoned

    @classmethod
    def from_config(
        cls, name: str, args: dict[str, Any] | None = None, task=None, timeout_s: float | None = None
    ) -> RuleReward:
        """Built-in "task" / "format" / "math" / "env" / "code_tests", or a user function "pkg.module:fn"
        (user functions and "math" are called with a time limit of `timeout_s` seconds per sample)."""
        args = dict(args or {})
        if name == "task" and not args and getattr(task, "reward_rule", None):
            name = task.reward_rule  # a task scored by another rule (builtin:humaneval: code_tests)
        if name == "code_tests":
            from rlhf.reward.code_tests import CodeTestsReward

            return CodeTestsReward.from_args(args)
        if name == "task":
            if "task" in args:  # score against a named task instead of the data's
                from rlhf.tasks import get_task

                try:
                    task = get_task(args.pop("task"))
                except KeyError as exc:
                    raise RewardError(f"rule 'task': args.task: {exc.args[0]}") from exc
            if args:
                raise RewardError(f"rule 'task' takes only args.task, got {sorted(args)}")
            if task is None:
                raise RewardError(
                    "rule 'task' needs a task checker: use a built-in data source (data.source: "
                    "builtin:<task>) or set args.task to a task name (GSM8K/MATH answers: rule 'math')"
                )
            return cls(name, _task_rule(task))
        if name == "format":
            unknown = set(args) - {"pattern"}
            if unknown:
                raise RewardError(f"rule 'format' takes only args.pattern, got {sorted(unknown)}")
            # Default: what a well-formatted answer to the data task looks like (a number, an
            # <answer> tag, ...), else format_reward's own default (an <answer>...</answer> tag).
            pattern = args.get("pattern") or getattr(task, "format_pattern", None)
            try:
                re.compile(pattern or "")
            except re.error as exc:
                raise RewardError(f"rule 'format': pattern {pattern!r} is not a valid regex: {exc}") from exc
            return cls(name, _format_rule(pattern))
        if name == "math":
            from rlhf.reward.math import math_rule

            return math_rule(args, timeout_s)
        if name == "env":
            if args:
                raise RewardError(f"rule 'env' takes no args, got {sorted(args)}")
            return EpisodeReward(name, episode_reward)
        if ":" not in name:
            raise RewardError(
                f"unknown rule {name!r}: use 'task', 'format', 'math', 'env', 'code_tests' or a function path "
                "'pkg.module:function'"
            )
        return cls(name, load_reward_function(name), args, timeout_s=timeout_s)

    def __call__(self, sample: Sample) -> float:
        call = (sample.prompt.text, sample.response_text, sample.prompt.label)
        if not self.timeout_s:
            return self.fn(*call, **self.args)
        # Untrusted code: run it in a daemon thread and stop waiting after timeout_s (a Python thread
        # cannot be killed; a hung call is abandoned and the sample follows reward.on_error).
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = self.fn(*call, **self.args)
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc

        thread = threading.Thread(target=run, name=f"reward-{self.name}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            raise TimeoutError(
                f"no result within reward.timeout_s={self.timeout_s:g}s (the call is abandoned)"
            )
        if "error" in box:
            raise box["error"]
        return box["value"]

    def score(self, samples: Sequence[Sample], source: str | None = None, on_error: str = "raise"):
        """(scores, errors) over `samples`; see `score_each`."""
        return score_each(source or self.name, samples, lambda _, sample: self(sample), on_error)


def episode_reward(sample: Sample) -> float:
    """Rule `env`: a multi-turn episode's environment reward (turn rewards + final reward, see
    rlhf/environment.py). A sample whose environment failed is an error (-> reward.on_error)."""
    if sample.episode is None:
        raise ValueError(
            "rule 'env' scores multi-turn episodes: set rollout.environment.name or rollout.agent.function"
        )
    if sample.episode.get("error"):
        raise ValueError(f"the episode failed: {sample.episode['error']}")
    return sample.episode["reward"]


class EpisodeReward(RuleReward):
    """A rule that reads the sample itself (its episode record) instead of (prompt, response, label)."""

    def __call__(self, sample: Sample) -> float:
        return self.fn(sample)
