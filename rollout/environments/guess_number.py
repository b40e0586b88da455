"""Guess a secret number with "higher"/"lower" feedback: a multi-turn task a 135M model can learn.

Prompts come from the `guess_number` data task (data.source: builtin:guess_number), whose label is the
secret. Each assistant turn is one guess (the last integer it writes); the environment answers
"Higher." / "Lower." until the guess is right. Rewards: `win_reward` on the turn that finds it, minus
`turn_cost` for every other turn, so finding it in fewer turns is worth more.
"""

from __future__ import annotations

from rlhf.tasks import extract_number
from rlhf.types import Prompt
from rollout.environments.base import Environment, StepResult


class GuessNumberEnv(Environment):
    def __init__(self, win_reward: float = 1.0, turn_cost: float = 0.1):
        self.win_reward = float(win_reward)
        self.turn_cost = float(turn_cost)
        self.secret: int | None = None
        self.guesses: list[int | None] = []

    def reset(self, prompt: Prompt) -> None:
        """The data prompt is the first message; its label is the secret."""
        try:
            self.secret = int(prompt.label)
        except (TypeError, ValueError):
            raise ValueError(
                f"guess_number: prompt {prompt.index} has label {prompt.label!r}, expected the secret integer "
                "(use data.source: builtin:guess_number)"
            ) from None
        return None

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
