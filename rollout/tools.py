"""Tools a policy may call inside an episode: parsing calls, running them, formatting results.

Calls are read from the assistant's text in the chat template's own tool-call format when the
template has one (detected by rendering a probe call), else as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. Built-in tools: `python` (a sandboxed
subprocess, rollout/sandbox.py) and `calculator` (exact arithmetic over `ast`, no eval); user tools are
plain functions named by dotted path. Whatever a tool does (raise, hang, return junk), the model gets
an `error: ...` text as the tool's output and the run goes on.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from rlhf.rollout.sandbox import run_python

MAX_OUTPUT_CHARS = 2000
_PROBE_NAME = "probe_tool_name"


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, str]  # argument name -> type name, shown to the model
    fn: Callable[..., Any]
    example: dict[str, Any] | None = None  # arguments of the example call shown to the model


@dataclass
class ToolCall:
    name: str | None
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # the call could not be parsed


class ToolError(ValueError):
    """A tool name that does not resolve (a configuration error, raised before any episode runs)."""


# ----------------------------------------------------------------------------------------------
# Built-in tools

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def calculator(expression: str) -> str:
    """Exact arithmetic, e.g. 12 * (345 - 6) / 7"""
    if not isinstance(expression, str) or len(expression) > 500:
        raise ValueError("expression must be a string of at most 500 characters")
    tree = ast.parse(expression.replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")

    def visit(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = visit(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = visit(node.left), visit(node.right)
            if isinstance(node.op, ast.Pow):
                if right.denominator != 1 or abs(right) > 1000 or (left and abs(left) > 10**100):
                    raise ValueError("powers need an integer exponent of at most 1000 and a smaller base")
                return left ** int(right)
            if right == 0 and isinstance(node.op, ast.Div | ast.FloorDiv | ast.Mod):
                raise ValueError("division by zero")
            return Fraction(_BINARY[type(node.op)](left, right))
        raise ValueError(f"unsupported syntax: {type(node).__name__} (numbers and + - * / // % ** only)")

    value = visit(tree.body)
    if value.denominator == 1:
        return str(value.numerator)
    decimal = float(value)
    return repr(decimal) if math.isfinite(decimal) else str(value)


def _python_tool(timeout_s: float, memory_mb: int) -> Callable[..., str]:
    def python(code: str) -> str:
        """Run Python code in a sandbox and return what it prints (a trailing expression's value is printed)."""
        result = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb)
        if result.timed_out:
            return f"error: the code ran longer than {timeout_s:g}s and was stopped"
        if result.returncode != 0:
            last = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
            return (result.stdout + "\n" if result.stdout else "") + f"error: {last[0]}"
        return result.stdout if result.stdout.strip() else "(no output)"

    return python


def load_tool(path: str) -> Tool:
    """A user tool "pkg.module:function": its name, docstring and signature are shown to the model."""
    from rlhf.reward.rules import RewardError, load_reward_function

    try:
        fn = load_reward_function(path)
    except RewardError as exc:
        raise ToolError(str(exc).replace("reward function", "tool")) from None
    return _tool_of(getattr(fn, "__name__", path.rpartition(":")[2]), fn)


def _tool_of(name: str, fn: Callable[..., Any]) -> Tool:
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    params = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            annotation = (
                p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
            )
            params[p.name] = annotation or "any"
    return Tool(name, doc[0] if doc else "", params, fn)


# ----------------------------------------------------------------------------------------------
# Call formats


def detect_tool_call_format(tokenizer: Any) -> tuple[str, str] | None:
    """(opening, closing) text around the JSON of a call in the chat template's own format, or None
    when the template renders no tool calls. An empty opening means bare JSON objects."""
    user = [{"role": "user", "content": "x"}]
    call = {"type": "function", "function": {"name": _PROBE_NAME, "arguments": {"a": 1}}}
    mark = "probe-content"
    try:
        plain = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": mark}], tokenize=False, add_generation_prompt=False
        )
        with_call = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": mark, "tool_calls": [call]}],
            tokenize=False,
            add_generation_prompt=False,
        )
    except Exception:  # templates that reject tool_calls have no format of their own
        return None
    at = with_call.find(_PROBE_NAME)
    if at < 0:
        return None
    if mark in with_call[:at]:  # the call follows the content: measure from the content's end
        common = with_call.index(mark) + len(mark)
    else:  # the template drops the content of a calling turn: measure from the renders' common prefix
        common = 0
        while common < min(len(plain), len(with_call)) and plain[common] == with_call[common]:
            common += 1
    plain_end = plain.index(mark) + len(mark) if mark in plain else common
    start = with_call.rfind("{", common, at)
    if start < 0:
        return None
    try:
        _, length = json.JSONDecoder().raw_decode(with_call[start:])
    except json.JSONDecodeError:
        return None
    opening = with_call[common:start].strip()
    # the closing marker is what follows the JSON up to the end-of-turn text the plain render has too
    tail = with_call[start + length :]
    turn_end = plain[plain_end:].strip()
    closing = tail.strip()
    if turn_end and closing.endswith(turn_end):
        closing = closing[: -len(turn_end)].strip()
    return opening, closing


def _parse_json_call(text: str) -> ToolCall:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return ToolCall(None, error=f"the tool call is not valid JSON ({exc.msg} at char {exc.pos})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall(None, error='a tool call must be a JSON object with a "name" string')
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some formats encode arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return ToolCall(obj["name"], error="the tool call's arguments are not valid JSON")
    if not isinstance(args, dict):
        return ToolCall(obj["name"], error='"arguments" must be a JSON object')
    return ToolCall(obj["name"], args)


class ToolBox:
    """The configured tools of an engine's episodes: describe, parse, call, format results."""

    def __init__(
        self,
        tools: list[Tool],
        call_format: tuple[str, str] | None = None,
        timeout_s: float = 5.0,
        result_role: str = "tool",
    ):
        self.tools = {t.name: t for t in tools}
        self.opening, self.closing = call_format or ("<tool_call>", "</tool_call>")
        self.timeout_s = timeout_s
        self.result_role = result_role

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any = None) -> ToolBox:
        """From rollout.environment (tools, tool_call_format, tool_timeout_s, tool_memory_mb)."""
        tools = []
        for name in cfg.tools:
            if name == "python":
                tools.append(_tool_of("python", _python_tool(cfg.tool_timeout_s, cfg.tool_memory_mb)))
                tools[-1].example = {"code": "print(2 ** 10)"}
            elif name == "calculator":
                tools.append(_tool_of("calculator", calculator))
                tools[-1].example = {"expression": "12 * 34"}
            else:
                tools.append(load_tool(name))
        call_format = None
        if cfg.tool_call_format == "auto" and tokenizer is not None:
            call_format = detect_tool_call_format(tokenizer)
        role = _result_role(tokenizer) if tokenizer is not None else "tool"
        return cls(tools, call_format, cfg.tool_timeout_s, role)

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def describe(self) -> str:
        """Tool instructions for a system prompt: each tool's signature and how to call it."""
        lines = ["Tools:"]
        for t in self.tools.values():
            args = ", ".join(f"{k}: {v}" for k, v in t.parameters.items())
            lines.append(f"- {t.name}({args}): {t.description}")
        first = next(iter(self.tools.values()))
        arguments = first.example or {k: "..." for k in first.parameters}
        example = json.dumps({"name": first.name, "arguments": arguments})
        lines.append(
            f"Call a tool with {self.opening}{example}{self.closing}, then wait for its result. "
            "Give the final answer without a tool call."
        )
        return "\n".join(lines)

    def parse(self, text: str) -> list[ToolCall]:
        """Every tool call in an assistant turn, in order (unparseable ones carry their error)."""
        return [call for _, _, call in self.find(text)]

    def find(self, text: str) -> list[tuple[int, int, ToolCall]]:
        """(start, end, call) of every tool call in `text`: the OpenAI endpoint cuts the spans out of
        the reply's content (rollout/openai_tool_calls.py), so both read calls with this one parser."""
        if not self.opening:  # bare JSON objects with a "name"
            calls, decoder, i = [], json.JSONDecoder(), 0
            while (i := text.find("{", i)) >= 0:
                try:
                    obj, end = decoder.raw_decode(text, i)
                except json.JSONDecodeError:
                    i += 1
                    continue
                if isinstance(obj, dict) and "name" in obj:
                    calls.append((i, end, _parse_json_call(json.dumps(obj))))
                i = end
            return calls
        calls = []
        pattern = re.escape(self.opening) + r"(.*?)" + (re.escape(self.closing) if self.closing else r"$")
        for match in re.finditer(pattern, text, flags=re.DOTALL):
            calls.append((match.start(), match.end(), _parse_json_call(match.group(1).strip())))
        unclosed = text.count(self.opening) - len(calls)
        if unclosed > 0:
            at = text.rfind(self.opening)
            error = f"a tool call was opened with {self.opening} but not closed"
            calls.append((at, len(text), ToolCall(None, error=error)))
        return calls

    def call(self, call: ToolCall) -> str:
        """The tool's output as text; every failure becomes an `error: ...` text, never an exception."""
        if call.error:
            return f"error: {call.error}"
        tool = self.tools.get(call.name)
        if tool is None:
            return f"error: unknown tool {call.name!r} (available: {', '.join(self.tools)})"
        try:
            inspect.signature(tool.fn).bind(**call.arguments)
        except TypeError as exc:
            return f"error: bad arguments for {call.name}: {exc}"
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = tool.fn(**call.arguments)
            except BaseException as exc:  # noqa: BLE001 - the model gets the error as the tool's output
                box["error"] = exc

        thread = threading.Thread(target=run, daemon=True, name=f"tool-{call.name}")
        thread.start()
        thread.join(self.timeout_s + (1.0 if call.name == "python" else 0.0))
        if thread.is_alive():
            return f"error: {call.name} did not return within {self.timeout_s:g}s"
        if "error" in box:
            exc = box["error"]
            return f"error: {type(exc).__name__}: {exc}"[:MAX_OUTPUT_CHARS]
        return _as_text(box.get("value"))

    def result_message(self, call: ToolCall, output: str) -> dict[str, str]:
        if self.result_role == "tool":
            return {"role": "tool", "content": output}
        return {"role": self.result_role, "content": f"<tool_response>{output}</tool_response>"}


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, bool | int | float | list | dict):
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            return "error: the tool returned a value that is not JSON"
    else:
        return f"error: the tool returned a {type(value).__name__}, expected text or JSON"
    return text if len(text) <= MAX_OUTPUT_CHARS else text[:MAX_OUTPUT_CHARS] + "...[truncated]"


def _result_role(tokenizer: Any) -> str:
    """ "tool" where the chat template renders tool messages, else "user" (with a <tool_response> tag)."""
    marker = "probe-tool-output"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "tool", "content": marker}], tokenize=False
        )
    except Exception:
        return "user"
    return "tool" if marker in text else "user"
