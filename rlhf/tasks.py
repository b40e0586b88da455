"""Verifiable tasks: prompt generators with exact checkers, the reward signal of RL-from-verifiers.

Each task generates `{"prompt": user message, "answer": label}` dicts deterministically from a seed
and scores a model response with `check(response, answer) -> 1.0 | 0.0`. Expressions are evaluated
with a whitelist over Python's `ast`, never with `eval`.
"""

from __future__ import annotations

import ast
import json
import random
import re
from fractions import Fraction
from typing import Any

# Unicode look-alikes models like to emit.
_NORMALISE = str.maketrans({"−": "-", "–": "-", "×": "*", "·": "*", "÷": "/"})
# A number: optional sign (not the minus of "12-7"), 1,234-style thousands or plain digits, decimals.
_NUMBER = re.compile(r"(?:(?<![\d)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_ANSWER_MARKER = re.compile(r"answer\s*(?::|is\b:?)", flags=re.IGNORECASE)
_MAX_EXPRESSION_CHARS = 200


class Task:
    """A verifiable task. Subclasses set `name` and implement `generate` and `check`."""

    name: str = ""
    # Regex that a well-formatted response contains (the `format` reward rule uses it by default).
    format_pattern: str = r"\S"

    def generate(self, n: int, seed: int, **args: Any) -> list[dict]:
        raise NotImplementedError

    def check(self, response: str, answer: Any) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def format_reward(response: str, pattern: str = r"<answer>.*?</answer>") -> float:
    """1.0 when `pattern` (a regex, `.` matching newlines) occurs in the response, else 0.0."""
    return 1.0 if re.search(pattern, response, flags=re.DOTALL) else 0.0


def _parse_number(text: str) -> Fraction | None:
    text = text.strip().translate(_NORMALISE).replace(",", "").replace(" ", "").rstrip(".")
    text = text.removeprefix("$").removesuffix("$")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...}, with nested braces (e.g. \boxed{\frac{1}{2}}) balanced; None
    when there is none or its braces never close."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def extract_number(response: str) -> Fraction | None:
    r"""The model's numeric answer: inside the last \boxed{}, else after the last "Answer:", else the
    last number in the text. Handles 1,234 / -5 / 19.0 / unicode minus."""
    text = response.translate(_NORMALISE)
    boxed = last_boxed(text)
    if boxed is not None:
        parsed = _parse_number(boxed)
        return parsed if parsed is not None else _last_number(boxed)
    marker = list(_ANSWER_MARKER.finditer(text))
    if marker:
        found = _NUMBER.search(text, marker[-1].end())
        if found:
            return _parse_number(found.group())
    return _last_number(text)


def _last_number(text: str) -> Fraction | None:
    numbers = _NUMBER.findall(text)
    return _parse_number(numbers[-1]) if numbers else None


def safe_eval(expression: str) -> tuple[Fraction, list[int]]:
    """Evaluate + - * / ( ) over integer literals exactly; returns (value, literals used).

    Anything else (names, calls, attributes, powers, floats, unary signs) raises ValueError, so a
    response can never run code or build huge numbers.
    """
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ValueError("expression too long")
    tree = ast.parse(expression.translate(_NORMALISE), mode="eval")
    literals: list[int] = []
    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

    def visit(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            left, right = visit(node.left), visit(node.right)
            op = ops[type(node.op)]
            if op == "+":
                return left + right
            if op == "-":
                return left - right
            if op == "*":
                return left * right
            if right == 0:
                raise ValueError("division by zero")
            return left / right
        raise ValueError(f"disallowed syntax: {type(node).__name__}")

    return visit(tree.body), literals


def _as_fraction(answer: Any) -> Fraction | None:
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int | Fraction):
        return Fraction(answer)
    if isinstance(answer, float):
        return Fraction(answer).limit_denominator(10**6)
    if isinstance(answer, str):
        return _parse_number(answer)
    return None


class Arithmetic(Task):
    """Integer arithmetic with standard operator precedence, harder with `difficulty` (1..5)."""

    name = "arithmetic"
    format_pattern = r"-?\d"
    # difficulty -> (operands, max digits per operand, operators)
    LEVELS = {1: (2, 2, "+-"), 2: (2, 3, "+-*"), 3: (3, 2, "+-*"), 4: (3, 3, "+-*"), 5: (4, 3, "+-*")}

    def generate(self, n: int, seed: int, difficulty: int = 1, operators: str | None = None) -> list[dict]:
        """`operators` (e.g. "*") replaces the level's operators: multiplication only for tool tasks."""
        if difficulty not in self.LEVELS:
            raise ValueError(f"arithmetic: difficulty={difficulty!r}, expected one of {sorted(self.LEVELS)}")
        operands, digits, level_operators = self.LEVELS[difficulty]
        operators = level_operators if operators is None else operators
        if not operators or set(operators) - set("+-*"):
            raise ValueError(f"arithmetic: operators={operators!r}, expected some of '+-*'")
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            numbers = [rng.randint(0, 10 ** rng.randint(1, digits) - 1) for _ in range(operands)]
            ops = [rng.choice(operators) for _ in range(operands - 1)]
            expression = " ".join([str(numbers[0])] + [f"{op} {x}" for op, x in zip(ops, numbers[1:])])
            out.append(
                {
                    "prompt": f"Compute {expression}. Answer with just the number.",
                    "answer": self._evaluate(numbers, ops),
                    "difficulty": difficulty,
                }
            )
        return out

    @staticmethod
    def _evaluate(numbers: list[int], ops: list[str]) -> int:
        """`n0 op n1 op n2 ...` with * before + and - (fast path of safe_eval for generation)."""
        terms, signs = [numbers[0]], []
        for op, x in zip(ops, numbers[1:]):
            if op == "*":
                terms[-1] *= x
            else:
                terms.append(x)
                signs.append(op)
        return terms[0] + sum(t if sign == "+" else -t for sign, t in zip(signs, terms[1:]))

    def check(self, response: str, answer: Any) -> float:
        expected, got = _as_fraction(answer), extract_number(response)
        if expected is None:
            raise ValueError(f"arithmetic: answer {answer!r} is not a number")
        return 1.0 if got is not None and got == expected else 0.0


class Countdown(Task):
    """Reach `target` from `numbers` (each at most once) with + - * /; answer = {numbers, target}."""

    name = "countdown"
    format_pattern = r"<answer>.*?</answer>"

    def generate(
        self, n: int, seed: int, num_numbers: int = 4, max_number: int = 50, max_target: int = 1000
    ) -> list[dict]:
        if num_numbers < 2:
            raise ValueError(f"countdown: num_numbers={num_numbers} must be >= 2")
        rng = random.Random(seed)
        out = []
        while len(out) < n:
            numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
            target = self._random_result(numbers, rng)
            if target is None or not 1 <= target <= max_target:
                continue
            rng.shuffle(numbers)
            listed = ", ".join(map(str, numbers))
            prompt = (
                f"Using the numbers [{listed}], write an arithmetic expression that equals {target}. "
                "You may use +, -, *, / and parentheses, and each number at most once. "
                "Show your reasoning, then give the expression inside <answer> </answer> tags, "
                "for example <answer>(1 + 2) * 3</answer>."
            )
            out.append({"prompt": prompt, "answer": {"numbers": numbers, "target": target}})
        return out

    @staticmethod
    def _random_result(numbers: list[int], rng: random.Random) -> int | None:
        """Combine all numbers in random order with random ops, keeping every step a positive integer."""
        values = list(numbers)
        rng.shuffle(values)
        while len(values) > 1:
            a, b = values.pop(), values.pop()
            candidates = [a + b, a * b]
            if a != b:
                candidates.append(abs(a - b))
            if b and a % b == 0:
                candidates.append(a // b)
            if a and b % a == 0:
                candidates.append(b // a)
            values.insert(rng.randrange(len(values) + 1), rng.choice(candidates))
        return values[0] if values[0] > 0 else None

    def extract_expression(self, response: str) -> str | None:
        """The last <answer>...</answer>, else the last non-empty line; drops a trailing `= target`."""
        tagged = re.findall(r"<answer>(.*?)</answer>", response, flags=re.DOTALL)
        if tagged:
            text = tagged[-1]
        else:
            lines = [line for line in response.strip().splitlines() if line.strip()]
            if not lines:
                return None
            text = lines[-1]
        text = text.strip().strip("$`").split("=")[0].strip()
        return text or None

    def check(self, response: str, answer: Any) -> float:
        if isinstance(answer, str):  # labels stored as JSON text in a file dataset
            answer = json.loads(answer)
        try:
            numbers, target = list(answer["numbers"]), answer["target"]
        except (TypeError, KeyError) as e:
            raise ValueError(
                f"countdown: answer must be {{'numbers': [...], 'target': n}}, got {answer!r}"
            ) from e
        expression = self.extract_expression(response)
        if expression is None:
            return 0.0
        try:
            value, used = safe_eval(expression)
        except (ValueError, SyntaxError, RecursionError):
            return 0.0
        available = list(numbers)
        for literal in used:
            if literal not in available:
                return 0.0  # a number not given, or given fewer times than used
            available.remove(literal)
        return 1.0 if value == Fraction(target) else 0.0


class GuessNumber(Task):
    """Find a secret integer in 1..max_number; the multi-turn `guess_number` environment answers each
    guess with "higher" or "lower" (rollout/environments/guess_number.py). answer = the secret."""

    name = "guess_number"
    format_pattern = r"\d"

    def generate(self, n: int, seed: int, max_number: int = 20) -> list[dict]:
        if max_number < 2:
            raise ValueError(f"guess_number: max_number={max_number} must be >= 2")
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            # The game number keeps prompts distinct, so held-out games can be told apart from training ones.
            prompt = (
                f"Game {rng.randint(0, 10**6 - 1):06d}. I am thinking of an integer between 1 and {max_number}. "
                "Guess it: reply with one number. I will tell you if my number is higher or lower."
            )
            out.append({"prompt": prompt, "answer": rng.randint(1, max_number), "max_number": max_number})
        return out

    def check(self, response: str, answer: Any) -> float:
        """1.0 when the last number written is the secret."""
        got = extract_number(response)
        return 1.0 if got is not None and got == _as_fraction(answer) else 0.0


TASKS: dict[str, Task] = {task.name: task for task in (Arithmetic(), Countdown(), GuessNumber())}
# Built-in data sets defined elsewhere, imported when first asked for: name -> "module:class".
LAZY_TASKS = {
    "humaneval": "rlhf.data.humaneval:HumanEval",
    "code_functions": "rlhf.data.code_functions:CodeFunctions",
}


def register_task(task: Task) -> Task:
    """Add a user task to the registry (so `builtin:<name>` and reward rules can find it)."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS and name in LAZY_TASKS:
        from rlhf.user_code import import_object

        register_task(import_object(LAZY_TASKS[name])())
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted({*TASKS, *LAZY_TASKS}))}")
    return TASKS[name]
