"""Guess a secret number with "higher"/"lower" feedback: a multi-turn task a 135M model can learn.

Prompts come from the `guess_number` data task (data.source: builtin:guess_number), whose label is the
secret. Each assistant turn is one guess (the last integer it writes); the environment answers
"Higher." / "Lower." until the guess is right. Rewards: `win_reward` on the turn that finds it, minus
`turn_cost` for every other turn, so finding it in fewer turns is worth more.
"""

from __future__ import annotations

from typing import Any

from rlhf.environment import Environment, StepResult, check_messages
from rlhf.tasks import extract_number
from rlhf.types import Prompt


class GuessNumberEnv(Environment):
    def __init__(
        self,
        win_reward: float = 1.0,
        turn_cost: float = 0.1,
        system_prompt: str | None = None,
        examples: list[dict[str, str]] | None = None,
    ):
        self.win_reward = float(win_reward)
        self.turn_cost = float(turn_cost)
        self.system_prompt = system_prompt
        self.examples = [dict(m) for m in examples or []]
        self.secret: int | None = None
        self.guesses: list[int | None] = []

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> None:
        check_messages(list(args.get("examples") or []), "args.examples")

    def reset(self, prompt: Prompt) -> list[dict[str, str]] | None:
        """The data prompt is the first message; its label is the secret. With `system_prompt` or
        `examples` (a demonstration game as chat messages), the episode starts with those, then the
        prompt's question (data.system_prompt is then not used)."""
        try:
            self.secret = int(prompt.label)
        except (TypeError, ValueError):
            raise ValueError(
                f"guess_number: prompt {prompt.index} has label {prompt.label!r}, expected the secret integer "
                "(use data.source: builtin:guess_number)"
            ) from None
        if not (self.system_prompt or self.examples):
            return None
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        question = {"role": "user", "content": str(prompt.metadata.get("raw_prompt", prompt.text))}
        return [*system, *self.examples, question]

    def step(self, assistant_text: str) -> StepResult:
        got = extract_number(assistant_text)
        guess = int(got) if got is not None and got.denominator == 1 else None
        self.guesses.append(guess)
        if guess is None:
            reply = "Please answer with one whole number."
        elif guess == self.secret:
            info = {"found": True, "success": True, "guesses": len(self.guesses)}
            return StepResult([], self.win_reward, True, info)
        else:
            reply = "Higher." if self.secret > guess else "Lower."
        return StepResult([{"role": "user", "content": reply}], -self.turn_cost, False, {"success": False})
