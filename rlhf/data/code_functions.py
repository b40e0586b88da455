"""Generated Python-function problems with unit tests, as the built-in task `builtin:code_functions`.

Small functions a 135M-parameter model writes correctly some of the time (add a constant, reverse a
string, the largest item of a list, ...), each with assert-based tests that the `code_tests` reward
runs in the code sandbox. Each prompt shows one example call. Held-out problems come from other
seeds: the same kinds of function with other names, constants, examples and tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from rlhf.tasks import Task

# kind -> (function name stem, parameters, description with {k}, reference implementation of (args, k),
# random test input of rng)
Kind = tuple[str, str, str, Callable[..., Any], Callable[[random.Random], tuple]]


def _ints(rng: random.Random) -> tuple:
    return (rng.randint(-20, 50),)


def _words(rng: random.Random) -> tuple:
    return ("".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6))),)


def _lists(rng: random.Random) -> tuple:
    return ([rng.randint(-9, 30) for _ in range(rng.randint(1, 5))],)


KINDS: dict[str, Kind] = {
    "add": ("add", "x", "returns x plus {k}", lambda x, k: x + k, _ints),
    "times": ("times", "x", "returns x multiplied by {k}", lambda x, k: x * k, _ints),
    "minus": ("minus", "x", "returns x minus {k}", lambda x, k: x - k, _ints),
    "square": ("square", "x", "returns x squared", lambda x, k: x * x, _ints),
    "is_even": ("is_even", "n", "returns True if n is even, else False", lambda n, k: n % 2 == 0, _ints),
    "reverse": ("reverse", "s", "returns the string s reversed", lambda s, k: s[::-1], _words),
    "shout": ("shout", "s", "returns the string s in upper case", lambda s, k: s.upper(), _words),
    "length": (
        "length",
        "s",
        "returns the number of characters in the string s",
        lambda s, k: len(s),
        _words,
    ),
    "total": ("total", "items", "returns the sum of the list items", lambda xs, k: sum(xs), _lists),
    "largest": (
        "largest",
        "items",
        "returns the largest number in the list items",
        lambda xs, k: max(xs),
        _lists,
    ),
    "first": ("first", "items", "returns the first element of the list items", lambda xs, k: xs[0], _lists),
    "last": ("last", "items", "returns the last element of the list items", lambda xs, k: xs[-1], _lists),
    "count_vowels": (
        "count_vowels",
        "s",
        "returns how many vowels (a, e, i, o, u) the string s has",
        lambda s, k: sum(c in "aeiou" for c in s),
        _words,
    ),
    "sum_even": (
        "sum_even",
        "items",
        "returns the sum of the even numbers in the list items",
        lambda xs, k: sum(x for x in xs if x % 2 == 0),
        _lists,
    ),
    "count_above": (
        "count_above",
        "items",
        "returns how many numbers in the list items are greater than {k}",
        lambda xs, k: sum(x > k for x in xs),
        _lists,
    ),
    "drop_negatives": (
        "drop_negatives",
        "items",
        "returns the list items without its negative numbers, in order",
        lambda xs, k: [x for x in xs if x >= 0],
        _lists,
    ),
    "every_other": (
        "every_other",
        "items",
        "returns every other element of the list items, starting with the first",
        lambda xs, k: xs[::2],
        _lists,
    ),
    "repeat": ("repeat", "s", "returns the string s repeated {k} times", lambda s, k: s * k, _words),
    "clamp": (
        "clamp",
        "x",
        "returns x limited to the range 0 to {k} (0 if x is below 0, {k} if x is above {k})",
        lambda x, k: min(max(x, 0), k),
        _ints,
    ),
    "digit_sum": (
        "digit_sum",
        "n",
        "returns the sum of the decimal digits of the non-negative integer n",
        lambda n, k: sum(map(int, str(n))),
        lambda rng: (rng.randint(0, 99999),),
    ),
    "is_palindrome": (
        "is_palindrome",
        "s",
        "returns True if the string s reads the same backwards, else False",
        lambda s, k: s == s[::-1],
        lambda rng: (rng.choice(["abba", "level", "abc", "noon", "ab", "racecar", "hello", "x"]),),
    ),
    "fizz": (
        "fizz",
        "n",
        "returns 'Fizz' if n is divisible by {k}, else n as a string",
        lambda n, k: "Fizz" if n % k == 0 else str(n),
        _ints,
    ),
}
SUFFIXES = ("", "_value", "_it", "_fn", "_of", "_result")


class CodeFunctions(Task):
    name = "code_functions"
    format_pattern = r"\bdef\b"
    reward_rule = "code_tests"  # the `task` rule of this task runs the tests (rlhf/reward/code_tests.py)

    def generate(self, n: int, seed: int, kinds: list[str] | None = None, tests: int = 3) -> list[dict]:
        """`n` problems; `kinds` restricts the kinds of function (default: all of KINDS), `tests` is
        the number of asserts per problem."""
        kinds = list(KINDS) if kinds is None else list(kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if not kinds or unknown:
            raise ValueError(f"code_functions: kinds={unknown or kinds!r}; known kinds: {', '.join(KINDS)}")
        if not isinstance(tests, int) or tests < 1:
            raise ValueError(f"code_functions: tests must be an integer >= 1, got {tests!r}")
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            kind = rng.choice(kinds)
            stem, params, description, reference, sample = KINDS[kind]
            k = rng.randint(2, 9)
            name = f"{stem}_{k}" if "{k}" in description else stem + rng.choice(SUFFIXES)
            asserts = []
            for _ in range(tests):
                args = sample(rng)
                call = f"{name}({', '.join(repr(a) for a in args)})"
                asserts.append(f"assert {call} == {reference(*args, k)!r}, {call!r}")
            example = sample(rng)  # in the prompt, besides the tests: it also tells the problems apart
            call = f"{name}({', '.join(repr(a) for a in example)})"
            out.append(
                {
                    "prompt": f"Write a Python function `{name}({params})` that {description.format(k=k)}. "
                    f"For example, `{call}` returns `{reference(*example, k)!r}`.",
                    "answer": "\n".join(asserts) + "\n",
                    "kind": kind,
                }
            )
        return out

    def check(self, response: str, answer: Any) -> float:
        raise ValueError("builtin:code_functions is scored by the `code_tests` reward rule (it runs code)")
