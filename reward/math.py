r"""Rule `math`: the response's final answer checked against the label with HF's `math-verify`.

A regex compares text; math-verify compares values: `1/2`, `0.5` and `\frac{1}{2}` are one answer,
so are `3.0` and `3`, `\{1,2\}` and `\{2,1\}`, `5 \text{ cm}` and `5`, `1,000` and `1000`. The
answer is taken from the response in this order: the last `\boxed{...}` (nested braces balanced), the
text after the last `#### `, the text after the last "The answer is" / "Answer:", else the last
number. A response with no readable answer scores 0 and is counted in `reward/errors` (`NoAnswer`); a
label that is not math is an error under `reward.on_error` (the data is wrong, not the policy).

math-verify's own time limits use `signal.alarm`, which raises off the main thread, and the rule runs
in a worker thread under `reward.timeout_s` (see `RuleReward.__call__`): its signal limits are turned
off and ours applies instead; a call past it scores 0 and is counted, like a response with no answer.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from rlhf.reward.rules import NoAnswer, RewardError, RuleReward

from rlhf.data.formats import after_hashes
from rlhf.tasks import last_boxed

MAX_ANSWER_CHARS = 1000  # a longer "answer" is garbage, and sympy could spend minutes on it
_ANSWER_MARKER = re.compile(r"answer\s*(?:is\b\s*:?|:)", flags=re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
# "1\,000", "1 000": digit groups that math-verify would read as a product.
# (math-verify reads "1,000" as 1000 itself.)
_GROUPED = re.compile(r"-?\d{1,3}(?:(?:\\,|\\ |\\!|\{,\}|\s)\d{3})+(?:\.\d+)?")
_GROUP_SEPARATOR = re.compile(r"\\,|\\ |\\!|\{,\}|\s")
_MATH_DELIMITERS = re.compile(r"\\[()\[\]]")
# "18 dollars", "5 cm": a number followed by plain words, written as a unit math-verify drops.
_NUMBER_THEN_WORDS = re.compile(r"(-?[\d.,]+)\s+([A-Za-z][A-Za-z .]*)")


def extract_answer(response: str) -> tuple[str, bool]:
    r"""(answer, is_latex) of a response; NoAnswer when it has none, or its last \boxed{ never closes."""
    if "\\boxed{" in response:
        boxed = last_boxed(response)
        if boxed is None:
            raise NoAnswer("the last \\boxed{ is never closed")
        return boxed, True
    tail = after_hashes(response)
    if tail:
        return tail, False
    markers = list(_ANSWER_MARKER.finditer(response))
    if markers:
        phrase = response[markers[-1].end() :].strip().split("\n", 1)[0].strip()
        if phrase:
            return phrase, False
    numbers = _NUMBER.findall(response)
    if numbers:
        return numbers[-1], False
    raise NoAnswer("no \\boxed{}, '####', 'The answer is' or number in the response")


def as_latex(answer: str, is_latex: bool) -> str:
    """The answer as math-verify's LaTeX input: no `$` delimiters, markdown or trailing period, plain
    words after a number as `\\text{...}` (a unit), digit-group separators removed."""
    text = _UNESCAPED_DOLLAR.sub("", answer).strip()
    if not is_latex:
        text = _MATH_DELIMITERS.sub("", text.replace("**", "")).strip().rstrip(".").strip()
        words = _NUMBER_THEN_WORDS.fullmatch(text)
        if words:
            text = f"{words.group(1)} \\text{{ {words.group(2).strip()}}}"
    grouped = _GROUPED.match(text)
    if grouped and (grouped.end() == len(text) or not text[grouped.end()].isdigit()):
        text = _GROUP_SEPARATOR.sub("", grouped.group()) + text[grouped.end() :]
    return text


def _parse(latex: str) -> list:
    from math_verify import parse

    return parse(f"\\boxed{{{latex}}}", parsing_timeout=None)  # no signals: see the module docstring


@functools.lru_cache(maxsize=4096)
def _parse_label(label: str) -> list:
    """Labels repeat once per sample of a group: parse each once."""
    parsed = _parse(as_latex(label, True))
    if not parsed:
        raise ValueError(f"the label {label!r} does not parse as math")
    return parsed


def verify_answer(response: str, label: Any) -> float:
    """1.0 when the response's final answer equals the label (math-verify), else 0.0.

    Raises NoAnswer for a response without a readable answer, ValueError for an unusable label."""
    from math_verify import verify

    _quiet_timeout_warning()
    if label is None or isinstance(label, bool) or not str(label).strip():
        raise ValueError(f"rule 'math' needs a label (the expected answer), got {label!r}")
    gold = _parse_label(str(label).strip())
    answer, is_latex = extract_answer(response)
    if len(answer) > MAX_ANSWER_CHARS:
        raise NoAnswer(f"the answer is {len(answer)} characters long (more than {MAX_ANSWER_CHARS})")
    latex = as_latex(answer, is_latex)
    if not latex:
        raise NoAnswer("the answer is empty")
    predicted = _parse(latex)
    if not predicted:
        raise NoAnswer(f"the answer {answer[:80]!r} does not parse as math")
    return 1.0 if verify(gold, predicted, timeout_seconds=None) else 0.0


def math_reward(prompt: str, response: str, label: Any) -> float:
    """The rule's function (the signature every rule has)."""
    return verify_answer(response, label)


class MathRule(RuleReward):
    """A call past `reward.timeout_s` is the response's doing (sympy on a pathological answer): it
    scores 0 and is counted, instead of following `reward.on_error`."""

    def __call__(self, sample) -> float:
        try:
            return super().__call__(sample)
        except TimeoutError as exc:
            raise NoAnswer(str(exc)) from exc


def math_rule(args: dict[str, Any], timeout_s: float | None) -> MathRule:
    """The `math` rule as a reward source or an eval set's checker configures it."""
    if args:
        raise RewardError(f"rule 'math' takes no args, got {sorted(args)}")
    try:
        import math_verify  # noqa: F401
    except ImportError as exc:
        raise RewardError(
            f"rule 'math' needs the math-verify package (pip install math-verify): {exc}"
        ) from exc
    verify_answer("\\boxed{1}", "1")  # imports sympy's parsers now, not inside the first timed call
    return MathRule("math", math_reward, timeout_s=timeout_s)


@functools.cache
def _quiet_timeout_warning() -> None:
    """math-verify warns once that its timeouts are off and the caller must bound the time; we do."""
    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
