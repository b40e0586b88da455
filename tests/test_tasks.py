"""Task generators and checkers against hand-written responses."""

from __future__ import annotations

import pytest

from rlhf.tasks import TASKS, Task, extract_number, format_reward, get_task, safe_eval

arithmetic, countdown = get_task("arithmetic"), get_task("countdown")


def test_registry():
    assert set(TASKS) >= {"arithmetic", "countdown"}
    assert isinstance(arithmetic, Task) and arithmetic.name == "arithmetic"
    with pytest.raises(KeyError, match="known tasks: arithmetic, code_functions, countdown"):
        get_task("algebra")


# ------------------------------------------------------------------------------ arithmetic
def test_arithmetic_prompt_and_answer():
    rows = arithmetic.generate(200, seed=0, difficulty=1)
    assert len(rows) == 200
    for row in rows:
        assert row["prompt"].startswith("Compute ") and row["prompt"].endswith("Answer with just the number.")
        expression = row["prompt"].removeprefix("Compute ").removesuffix(". Answer with just the number.")
        a, op, b = expression.split()
        assert op in "+-" and 0 <= int(a) <= 99 and 0 <= int(b) <= 99
        assert row["answer"] == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_arithmetic_deterministic_and_seeded():
    assert arithmetic.generate(50, seed=1) == arithmetic.generate(50, seed=1)
    assert arithmetic.generate(50, seed=1) != arithmetic.generate(50, seed=2)


@pytest.mark.parametrize(
    "difficulty, operands, operators, max_value",
    [(1, 2, "+-", 99), (2, 2, "+-*", 999), (3, 3, "+-*", 99), (5, 4, "+-*", 999)],
)
def test_arithmetic_difficulty(difficulty, operands, operators, max_value):
    rows = arithmetic.generate(300, seed=0, difficulty=difficulty)
    seen_ops = set()
    for row in rows:
        tokens = row["prompt"].removeprefix("Compute ").removesuffix(". Answer with just the number.").split()
        numbers, ops = tokens[::2], tokens[1::2]
        assert len(numbers) == operands and all(0 <= int(n) <= max_value for n in numbers)
        seen_ops.update(ops)
    assert seen_ops == set(operators)


def test_arithmetic_precedence():
    # "2 + 3 * 4" is 14, not 20: the generator's answer follows standard precedence.
    value, literals = safe_eval("2 + 3 * 4")
    assert value == 14 and literals == [2, 3, 4]
    for row in arithmetic.generate(100, seed=5, difficulty=5):
        expression = row["prompt"].removeprefix("Compute ").removesuffix(". Answer with just the number.")
        assert row["answer"] == int(safe_eval(expression)[0])


def test_arithmetic_bad_difficulty():
    with pytest.raises(ValueError, match="difficulty=7"):
        arithmetic.generate(1, seed=0, difficulty=7)


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("19", 19, 1.0),
        ("12 + 7 = 19.", 19, 1.0),
        ("12 + 7 = 18", 19, 0.0),
        ("The answer is 19. That was easy", 19, 1.0),
        ("Answer: 1,234", 1234, 1.0),
        ("Answer: 1234.0", 1234, 1.0),
        ("19.5", 19, 0.0),
        ("First 5 - 12 = -7, so the result is -7", -7, 1.0),
        ("The result is −7", -7, 1.0),  # unicode minus
        ("12-7", 5, 0.0),  # the "-" of 12-7 is an operator, not the sign of 7
        ("12-7", 7, 1.0),
        (r"I think \boxed{42} but maybe 41", 42, 1.0),  # \boxed wins over the last number
        (r"\boxed{0}, not 3", 0, 1.0),
        ("Answer: 19, since 12 + 7 = 19 and not 20", 19, 1.0),  # after "Answer:" wins over the last number
        ("I don't know", 19, 0.0),
        ("", 19, 0.0),
        ("19", "19", 1.0),  # labels from files may be strings
    ],
)
def test_arithmetic_check(response, answer, expected):
    assert arithmetic.check(response, answer) == expected


def test_extract_number_nested_boxed():
    assert extract_number(r"so \boxed{\text{ 12 }} done") == 12
    assert extract_number("3, 4 and 5") == 5


# ------------------------------------------------------------------------------- countdown
def test_countdown_generated_targets_are_reachable():
    rows = countdown.generate(100, seed=0, num_numbers=4)
    assert countdown.generate(100, seed=0, num_numbers=4) == rows
    for row in rows:
        numbers, target = row["answer"]["numbers"], row["answer"]["target"]
        assert len(numbers) == 4 and 1 <= target <= 1000
        assert f"[{', '.join(map(str, numbers))}]" in row["prompt"] and str(target) in row["prompt"]
        assert _solvable(numbers, target), row


def _solvable(numbers, target) -> bool:
    """Brute force: combine any two numbers with any op until one value is left (exact rationals)."""
    from fractions import Fraction

    def search(values):
        if any(v == target for v in values):
            return True
        for i in range(len(values)):
            for j in range(len(values)):
                if i == j:
                    continue
                a, b = values[i], values[j]
                rest = [v for k, v in enumerate(values) if k not in (i, j)]
                results = [a + b, a - b, a * b] + ([a / b] if b else [])
                if any(search(rest + [r]) for r in results):
                    return True
        return False

    return search([Fraction(n) for n in numbers])


ANSWER = {"numbers": [3, 7, 25, 50], "target": 100}


@pytest.mark.parametrize(
    "response",
    [
        "<answer>(7 - 3) * 25</answer>",  # need not use every number
        "<answer>(50 - 25) * (7 - 3)</answer>",
        "Reasoning: 7 - 3 = 4 and 4 * 25 = 100.\n<answer>(7 − 3) × 25 = 100</answer>",  # unicode ops, "= target"
        "<answer>wrong</answer> on second thought <answer>25 * (7 - 3)</answer>",  # the last tag counts
        "7 - 3 = 4, times 25.\n(7 - 3) * 25\n",  # no tags: the last line
    ],
)
def test_countdown_accepts(response):
    assert countdown.check(response, ANSWER) == 1.0


def test_countdown_exact_division():
    # 7 / 3 is not an integer, but exact rationals give 7 / 3 * 3 = 7; a number given 3 times may be used 3 times.
    assert (
        countdown.check("<answer>(7 / 3 * 3 - 3) * 25</answer>", {"numbers": [3, 3, 3, 7, 25], "target": 100})
        == 1.0
    )
    assert safe_eval("1 / 3 * 3")[0] == 1


@pytest.mark.parametrize(
    "response, why",
    [
        ("<answer>(7 - 3) * 25 + 0</answer>", "0 is not given"),
        ("<answer>(7 - 3) * 25 * 1</answer>", "1 is not given"),
        ("<answer>(7 - 3) * (25 - 3) + 12</answer>", "3 used twice"),
        ("<answer>50 + 50</answer>", "50 used twice"),
        ("<answer>(50 - 25) * 3</answer>", "wrong value (75)"),
        ("<answer>50 * 3 - 7 * 7</answer>", "7 used twice"),
        ("<answer>50 / (25 - 25)</answer>", "division by zero"),
        ("<answer>__import__('os').system('true')</answer>", "unsafe: a call"),
        ("<answer>(lambda: 100)()</answer>", "unsafe: a lambda"),
        ("<answer>3 ** 50</answer>", "powers are not allowed"),
        ("<answer>-3 + 103</answer>", "unary minus and 103 not given"),
        ("<answer>50.0 + 50</answer>", "floats are not allowed"),
        ("<answer>(7 - 3) * 25" + " + 0" * 100 + "</answer>", "too long"),
        ("<answer></answer>", "empty"),
        ("<answer>(7 - 3) * </answer>", "syntax error"),
        ("", "empty response"),
    ],
)
def test_countdown_rejects(response, why):
    assert countdown.check(response, ANSWER) == 0.0, why


def test_countdown_json_label():
    assert (
        countdown.check("<answer>(7 - 3) * 25</answer>", '{"numbers": [3, 7, 25, 50], "target": 100}') == 1.0
    )
    with pytest.raises(ValueError, match="numbers"):
        countdown.check("<answer>1</answer>", 100)


def test_safe_eval_rejects_names():
    for expression in ("x + 1", "len([1])", "().__class__", "1 if 1 else 2", "[1, 2]"):
        with pytest.raises(ValueError):
            safe_eval(expression)


def test_format_reward():
    assert format_reward("think... <answer>3 + 4</answer>") == 1.0
    assert format_reward("<answer>\n3 + 4\n</answer>") == 1.0  # spans lines
    assert format_reward("<answer>3 + 4") == 0.0
    assert format_reward("The result is 7", r"-?\d") == 1.0
    assert format_reward("no digits", r"-?\d") == 0.0
    assert format_reward("any", countdown.format_pattern) == 0.0
