r"""Dataset layouts with a known prompt column and a label inside a worked solution (`data.format`).

GSM8K rows are `{question, answer}` where the answer is a worked solution ending in `#### 72`; MATH
rows are `{problem, solution}` where the final answer is the solution's last `\boxed{...}`. The label
is extracted once, when the file is loaded, so the reward compares against the bare answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from rlhf.tasks import last_boxed

# "#### 1,234" at the end of a GSM8K solution: the number after the last ####.
_GSM8K_NUMBER = re.compile(r"-?\$?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def after_hashes(text: str) -> str | None:
    """The text after the last `####` up to the end of its line, stripped; None without `####`."""
    at = text.rfind("####")
    if at < 0:
        return None
    return text[at + 4 :].split("\n", 1)[0].strip()


def gsm8k_label(solution: object) -> str | None:
    """The number after the last `####` of a GSM8K solution, commas and `$` removed ("1,234" -> "1234");
    None when there is no `####` followed by a number."""
    if not isinstance(solution, str):
        return None
    tail = after_hashes(solution)
    if not tail or not _GSM8K_NUMBER.fullmatch(tail.rstrip(".")):
        return None
    return tail.rstrip(".").replace(",", "").replace("$", "").replace(" ", "")


def math_label(solution: object) -> str | None:
    r"""The content of the last `\boxed{...}` of a MATH solution (nested braces kept), stripped; None
    when there is none, it never closes, or it is empty."""
    if not isinstance(solution, str):
        return None
    boxed = last_boxed(solution)
    return (boxed.strip() or None) if boxed is not None else None


@dataclass(frozen=True)
class Layout:
    """Where a format keeps its prompt and its solution, and how the label comes out of the solution."""

    input_key: str
    solution_key: str
    label_of: Callable[[object], str | None]
    missing: str  # what a row whose label cannot be extracted lacks (for the skip warning)


LAYOUTS = {
    "gsm8k": Layout("question", "answer", gsm8k_label, "no '#### <number>' in 'answer'"),
    "math": Layout("problem", "solution", math_label, "no \\boxed{...} in 'solution'"),
}
FORMATS = ("columns", "auto", *LAYOUTS)


def resolve_format(fmt: str, columns: list[str]) -> str:
    """`auto` -> the layout whose columns the data has (`gsm8k` first, then `math`), else `columns`."""
    if fmt != "auto":
        return fmt
    for name, layout in LAYOUTS.items():
        if layout.input_key in columns and layout.solution_key in columns:
            return name
    return "columns"


def layout_problem(fmt: str, source: str, columns: list[str]) -> str | None:
    """The one-line error when the data lacks a column its (resolved) format reads, else None."""
    layout = LAYOUTS.get(fmt)
    if layout is None:
        return None
    missing = [key for key in (layout.input_key, layout.solution_key) if key not in columns]
    if not missing:
        return None
    shown = ", ".join(columns) or "none"
    return (
        f"data.format {fmt!r} reads columns {layout.input_key!r} and {layout.solution_key!r}, but "
        f"{source} has no {' or '.join(repr(m) for m in missing)} (columns: {shown})"
    )
