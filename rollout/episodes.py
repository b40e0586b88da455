"""Multi-turn episodes on one engine: the policy and an environment take turns, many episodes at once.

Turn k of every live episode is one batched engine call; then every episode's environment step runs
concurrently (one thread each) under `step_timeout_s`, so a slow environment holds the engine for at
most that long and a hung one ends only its own episode. The trajectory is kept as token ids: the
policy's tokens exactly as sampled (mask 1, engine logprob), the environment's messages as the chat
template's delta tokens (mask 0, logprob 0); see rollout/chat_tokens.py.

An episode ends when the environment says done ("stop"), after `max_turns` assistant turns
("max_turns"), when its token budget is spent ("length"), or when its environment fails or times out
("env_error", recorded in `Sample.episode["error"]`, scored through reward.on_error).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rlhf.rollout.chat_tokens import ChatTokens

from rlhf.config.schema import EnvironmentConfig
from rlhf.environment import Environment, StepResult, check_messages, make_environment
from rlhf.types import Prompt, Sample

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """One engine completion of one turn."""

    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str


# (token ids of each live episode, max new tokens of each) -> one completion each, in order
GenerateFn = Callable[[list[list[int]], list[int]], list[Completion]]


@dataclass
class _Episode:
    env: Environment
    prompt: Prompt
    group: int
    ids: list[int] = field(default_factory=list)  # everything after the prompt
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    final_reward: float = 0.0
    finish: str | None = None  # set when the episode ends
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    last: list[int] = field(default_factory=list)  # the last turn's sampled ids
    turns: int = 0  # assistant turns generated

    def end(self, reason: str, error: str | None = None) -> None:
        self.finish = reason
        self.error = error


def call_all(calls: list[Callable[[], Any]], timeout_s: float) -> list[tuple[bool, Any]]:
    """Run every call in its own daemon thread; (True, value) or (False, error message) each, in order.
    A call still running after `timeout_s` is abandoned (a Python thread cannot be killed)."""
    results: list[tuple[bool, Any] | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = (True, calls[i]())
        except Exception as exc:  # an environment's bug ends its own episode, not the batch
            results[i] = (False, f"{type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=run, args=(i,), daemon=True, name=f"env-{i}") for i in range(len(calls))
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [
        r if r is not None else (False, f"no result within rollout.environment.step_timeout_s={timeout_s:g}s")
        for r in results
    ]


class EpisodeRunner:
    """Runs `n` episodes per prompt of one environment class through an engine's generate function."""

    def __init__(
        self, cfg: EnvironmentConfig, env_cls: type, tokenizer: Any, context_len: int, toolbox: Any = None
    ):
        self.cfg = cfg
        self.env_cls = env_cls
        self.chat = ChatTokens(tokenizer)
        self.context_len = context_len
        self.toolbox = toolbox

    def run(
        self,
        prompts: list[Prompt],
        groups: list[int],
        n: int,
        generate: GenerateFn,
        max_new_tokens: int,
        logprobs: bool = False,
        version: int = 0,
    ) -> list[Sample]:
        """n episodes per prompt, prompt-major (like RolloutEngine.generate); `Sample.group` = groups[i]."""
        cfg = self.cfg
        episodes = [
            _Episode(make_environment(self.env_cls, cfg.args, self.toolbox), p, g)
            for p, g in zip(prompts, groups)
            for _ in range(n)
        ]
        self._reset(episodes)
        for turn in range(cfg.max_turns):
            live = [e for e in episodes if e.finish is None]
            if not live:
                break
            budgets = [min(max_new_tokens, self._room(e)) for e in live]
            completions = generate([e.prompt.token_ids + e.ids for e in live], budgets)
            for e, c in zip(live, completions):
                self._add(e, c.token_ids, 1, c.text, c.logprobs)
                e.last = list(c.token_ids)
                e.turns += 1
            calls = [lambda e=e, c=c: e.env.step(c.text) for e, c in zip(live, completions)]
            steps = call_all(calls, cfg.step_timeout_s)
            for e, (ok, value) in zip(live, steps):
                self._after_step(e, ok, value, last_turn=turn == cfg.max_turns - 1)
        self._finish(episodes)
        return [self._sample(e, version, logprobs) for e in episodes]

    # ------------------------------------------------------------------------------------------
    def _room(self, e: _Episode) -> int:
        """Tokens the episode may still add: its budget, and the engine's context less one position
        (scoring a sequence, as the sync audit does, asks the engine for one more token)."""
        used = len(e.prompt.token_ids) + len(e.ids)
        return min(self.cfg.max_tokens - len(e.ids), self.context_len - 1 - used)

    def _reset(self, episodes: list[_Episode]) -> None:
        calls = [lambda e=e: e.env.reset(e.prompt) for e in episodes]
        results = call_all(calls, self.cfg.step_timeout_s)
        for e, (ok, value) in zip(episodes, results):
            if not ok:
                e.end("env_error", f"reset: {value}")
                continue
            if value is None:
                continue
            try:
                messages = check_messages(value, "reset()")
                text, ids = self.chat.prompt(messages)
            except Exception as exc:
                e.end("env_error", f"reset: {type(exc).__name__}: {exc}")
                continue
            e.prompt = dataclasses.replace(e.prompt, text=text, token_ids=ids)
            if self._room(e) < 1:  # like an over-long data prompt: no episode (and no error)
                log.warning(
                    "episode of prompt %d: its first prompt (%d tokens) fills the context",
                    e.prompt.index,
                    len(ids),
                )
                e.end("length")

    def _after_step(self, e: _Episode, ok: bool, value: Any, last_turn: bool) -> None:
        if not ok:
            e.end("env_error", f"step {len(e.turn_rewards) + 1}: {value}")
            return
        try:
            result = StepResult.of(value)
        except Exception as exc:
            e.end("env_error", f"step {len(e.turn_rewards) + 1}: {exc}")
            return
        e.turn_rewards.append(result.reward)
        e.info.update(result.info)
        if result.done:
            e.end("stop")
            return
        if last_turn:
            e.end("max_turns")
            return
        try:
            close = self.chat.close_turn(e.last)
            text, delta = self.chat.delta(result.messages)
        except Exception as exc:
            e.end("env_error", f"step {len(e.turn_rewards)}: {type(exc).__name__}: {exc}")
            return
        appended = close + delta  # no messages: just the next generation prompt (another turn)
        if self._room(e) - len(appended) < 1:  # no room left for another assistant token
            e.end("length")
            return
        closing_text = self.chat.tokenizer.decode(close, skip_special_tokens=False)
        self._add(e, appended, 0, closing_text + text, None)

    def _add(self, e: _Episode, ids: list[int], mask: int, text: str, logprobs: list[float] | None) -> None:
        e.ids += ids
        e.mask += [mask] * len(ids)
        e.logprobs += logprobs[: len(ids)] if logprobs is not None else [0.0] * len(ids)
        e.text.append(text)

    def _finish(self, episodes: list[_Episode]) -> None:
        """Final rewards (every episode, however it ended), then the environments are closed."""
        for e in episodes:
            if e.finish is None:  # only reachable when max_turns turns all ran without an end
                e.end("max_turns")
        asked = [e for e in episodes if e.error is None]
        results = call_all([lambda e=e: e.env.final_reward() for e in asked], self.cfg.step_timeout_s)
        for e, (ok, value) in zip(asked, results):
            if not ok:
                e.end("env_error", f"final_reward: {value}")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                e.end("env_error", f"final_reward() returned {value!r}, expected a number")
            else:
                e.final_reward = float(value)
        call_all([e.env.close for e in episodes], self.cfg.step_timeout_s)

    def _sample(self, e: _Episode, version: int, logprobs: bool) -> Sample:
        reward = sum(e.turn_rewards) + e.final_reward
        return Sample(
            group=e.group,
            prompt=e.prompt,
            response_ids=e.ids,
            response_text="".join(e.text),
            logprobs=e.logprobs if logprobs else None,
            finish_reason=e.finish or "max_turns",
            policy_version=version,
            response_mask=e.mask,
            episode={
                "reward": reward,
                "turn_rewards": list(e.turn_rewards),
                "final_reward": e.final_reward,
                "turns": e.turns,
                "error": e.error,
                "info": e.info,
            },
        )
