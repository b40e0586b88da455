"""The environment interface of multi-turn episodes, and how a configured environment is found.

One `Environment` instance lives for exactly one episode, so it may keep any per-episode state in
`self`. The episode runner (rollout/episodes.py) calls, in order:

    messages = env.reset(prompt)              # the first chat messages (None: the data prompt as is)
    for each assistant turn (at most rollout.environment.max_turns):
        new_messages, reward, done, info = env.step(assistant_text)
    final = env.final_reward()                # once, however the episode ended
    env.close()

The episode's environment reward is sum(turn rewards) + final reward; it reaches `Sample.reward`
through the `env` reward rule (reward.sources: [{kind: rule, name: env}]), weighted and added to any
other configured source like every reward source (docs/agents.md).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from rlhf.types import Prompt

Message = dict[str, Any]  # {"role": ..., "content": ...} as chat templates take them

# Built-in environments by name -> "module:Class" (imported only when used).
BUILTIN_ENVIRONMENTS = {
    "guess_number": "rlhf.rollout.environments.guess_number:GuessNumberEnv",
    "calculator": "rlhf.rollout.environments.calculator:CalculatorEnv",
    "tools": "rlhf.rollout.environments.tool_env:ToolEnvironment",
}


class EnvError(RuntimeError):
    """A bad environment name, arguments or step result (the message names which)."""


@dataclass
class StepResult:
    """What one env step returns: the messages to append, this turn's reward, the end flag, extras."""

    messages: list[Message] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: Any) -> StepResult:
        """Accept a StepResult or a `(messages, reward, done, info)` tuple; junk is an error that
        says what was wrong (a buggy environment must not corrupt a trajectory silently)."""
        if isinstance(value, StepResult):
            result = value
        elif isinstance(value, tuple) and len(value) == 4:
            result = cls(list(value[0] or []), value[1], value[2], dict(value[3] or {}))
        else:
            raise EnvError(f"step() returned {type(value).__name__}; expected (messages, reward, done, info)")
        result.messages = check_messages(result.messages, "step()")
        if isinstance(result.reward, bool) or not isinstance(result.reward, int | float):
            raise EnvError(f"step() reward must be a number, got {result.reward!r}")
        if not math.isfinite(result.reward):
            raise EnvError(f"step() reward must be finite, got {result.reward!r}")
        result.reward = float(result.reward)
        result.done = bool(result.done)
        return result


def check_messages(messages: Any, where: str) -> list[Message]:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise EnvError(f"{where} must return chat messages [{{role, content}}, ...], got {messages!r:.200}")
    return messages


class Environment:
    """Base class of multi-turn environments; subclass it and override `step` (and usually `reset`).

    `tools` is set by the runner before `reset` when rollout.environment.tools is configured (a
    `rlhf.rollout.tools.ToolBox`); any environment may use it, `ToolEnvironment` is built on it.
    """

    tools: Any = None

    def reset(self, prompt: Prompt) -> list[Message] | None:
        """The first messages of the episode, rendered with the chat template (and a generation
        prompt) into the episode's prompt tokens. None keeps the data pipeline's prompt."""
        return None

    def step(self, assistant_text: str) -> tuple[list[Message], float, bool, dict] | StepResult:
        """React to one assistant turn: (new messages, reward of this turn, done, info)."""
        raise NotImplementedError

    def final_reward(self) -> float:
        """Reward for the episode as a whole, asked once at its end (done, max_turns or budget)."""
        return 0.0

    def close(self) -> None:
        """Release what the episode held (files, processes)."""


def resolve_environment_class(name: str) -> type:
    """A built-in name or "pkg.module:Class" / "pkg.module.Class" -> the class (clear error otherwise)."""
    from rlhf.user_code import DottedPathError, import_object, split_path

    path = BUILTIN_ENVIRONMENTS.get(name, name)
    try:
        split_path(path, allow_dots=True)
    except DottedPathError:
        known = ", ".join(sorted(BUILTIN_ENVIRONMENTS))
        raise EnvError(
            f"unknown environment {name!r}: use a built-in ({known}) or 'pkg.module:Class'"
        ) from None
    try:
        target = import_object(path, allow_dots=True)
    except DottedPathError as exc:
        raise EnvError(str(exc)) from exc
    if not (isinstance(target, type) and issubclass(target, Environment)):
        raise EnvError(f"{path!r} is not a subclass of rlhf.rollout.environments.Environment")
    return target


def check_environment_args(cls: type, args: dict[str, Any]) -> None:
    """The configured args must fit the class's constructor (checked by `rlhf validate`, no instance)."""
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as exc:
        raise EnvError(f"{cls.__name__}: {exc}") from None
    check = getattr(cls, "check_args", None)
    if check is not None:
        check(args)


def make_environment(cls: type, args: dict[str, Any], tools: Any = None) -> Environment:
    env = cls(**args)
    env.tools = tools
    return env
