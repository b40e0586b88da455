"""Arithmetic with big numbers, easy with the `calculator` tool: a tool task for a small model.

Prompts come from the arithmetic data task (e.g. data.source: builtin:arithmetic with difficulty 4:
three operands of up to three digits). The model may call the calculator as often as it likes
within the episode's turns; its first turn without a tool call is its answer, rewarded
`correct_reward` when it is the prompt's label (the task's own checker), else 0. Turns with a tool
call that runs without error earn `call_reward` each (a shaping reward: a small model must first
discover the tool before the answers get right; set it to 0 to reward answers only).
"""

from __future__ import annotations

from rlhf.rollout.environments.tool_env import ToolEnvironment

from rlhf.tasks import get_task


class CalculatorEnv(ToolEnvironment):
    required_tools = ("calculator",)

    def __init__(
        self,
        system_prompt: str | None = None,
        max_calls_per_turn: int = 2,
        correct_reward: float = 1.0,
        call_reward: float = 0.0,
        examples: list[dict[str, str]] | None = None,
    ):
        super().__init__(system_prompt, max_calls_per_turn, examples)
        self.correct_reward = float(correct_reward)
        self.call_reward = float(call_reward)
        self.correct = False  # the final answer was right (info["success"]: task success without shaping)

    def step(self, assistant_text: str):
        calls, errors = self.calls, self.errors
        result = super().step(assistant_text)
        if (self.calls - calls) > (self.errors - errors):  # at least one call of this turn worked
            result.reward += self.call_reward
        result.info["success"] = self.correct
        return result

    def answer_reward(self, text: str) -> float:
        self.correct = get_task("arithmetic").check(text, self.prompt.label) == 1.0
        return self.correct_reward * float(self.correct)
