"""The user reward function of the own-data example: 1 if the last number in the response is the
answer, else 0. Signature: fn(prompt, response, label, **args) -> float (docs/rewards.md)."""

import re


def last_number_matches(prompt: str, response: str, label, **args) -> float:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", response.replace(",", ""))
    return float(bool(numbers) and float(numbers[-1]) == float(label))
