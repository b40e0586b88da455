"""An environment that runs the tools the assistant calls and answers with their outputs.

Each assistant turn is parsed for tool calls (rollout/tools.py). With calls, they run (at most
`max_calls_per_turn`) and their outputs come back as tool messages; the episode goes on. A turn
without a call is the final answer: the episode ends with `answer_reward(text)` (0 here; subclasses
such as the calculator environment check the answer). `examples` (chat messages) go between the
system message and the prompt: a worked demonstration of a call, which small models need to call at all.
"""

from __future__ import annotations

from typing import Any

from rlhf.environment import Environment, StepResult
from rlhf.types import Prompt


class ToolEnvironment(Environment):
    needs_tools = True  # config validation: rollout.environment.tools must not be empty
    required_tools: tuple[str, ...] = ()

    def __init__(
        self,
        system_prompt: str | None = None,
        max_calls_per_turn: int = 4,
        examples: list[dict[str, str]] | None = None,
    ):
        self.system_prompt = system_prompt
        self.examples = [dict(m) for m in examples or []]
        self.max_calls_per_turn = int(max_calls_per_turn)
        self.prompt: Prompt | None = None
        self.calls = 0
        self.errors = 0

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> None:
        """`examples` must be chat messages (checked by `rlhf validate`)."""
        from rlhf.environment import check_messages

        check_messages(list(args.get("examples") or []), "args.examples")

    def reset(self, prompt: Prompt) -> list[dict[str, Any]]:
        """A system message with the tool instructions, then the data prompt's own messages."""
        if self.tools is None:
            raise ValueError(f"{type(self).__name__} needs tools: set rollout.environment.tools")
        self.prompt = prompt
        raw = prompt.metadata.get("raw_prompt", prompt.text)
        messages = (
            [dict(m) for m in raw] if isinstance(raw, list) else [{"role": "user", "content": str(raw)}]
        )
        system = self.tools.describe()
        if self.system_prompt:
            system = f"{self.system_prompt}\n\n{system}"
        if messages and messages[0]["role"] == "system":
            system = f"{messages.pop(0)['content']}\n\n{system}"
        return [{"role": "system", "content": system}, *self.examples, *messages]

    def step(self, assistant_text: str) -> StepResult:
        calls = self.tools.parse(assistant_text)
        if not calls:
            return StepResult([], self.answer_reward(assistant_text), True, self._info(answered=True))
        messages = []
        for i, call in enumerate(calls):
            if i < self.max_calls_per_turn:
                output = self.tools.call(call)
            else:
                output = f"error: at most {self.max_calls_per_turn} tool calls per turn"
            self.calls += 1
            self.errors += output.startswith("error:")
            messages.append(self.tools.result_message(call, output))
        return StepResult(messages, 0.0, False, self._info(answered=False))

    def answer_reward(self, text: str) -> float:
        """Reward of the final answer (a turn without tool calls)."""
        return 0.0

    def _info(self, answered: bool) -> dict[str, Any]:
        return {"answered": answered, "tool_calls": self.calls, "tool_errors": self.errors}
