"""User code named by a dotted path ("pkg.module:attr", "pkg.module:Class.method").

Reward functions, environments, tools and agent functions are all loaded the same way; each caller
wraps `DottedPathError` in its own error type and adds what kind of object it wanted, so every bad
path gets one line naming the module and attribute.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any


class DottedPathError(ValueError):
    """The path is malformed, its module does not import, or it has no such attribute."""


def split_path(path: str, allow_dots: bool = False) -> tuple[str, str]:
    """("pkg.module", "attr") of "pkg.module:attr"; with `allow_dots` also of "pkg.module.attr"."""
    if ":" in path or not allow_dots:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise DottedPathError(f"{path!r} is not a 'pkg.module:name' path")
    return module_name, attr


def import_object(path: str, allow_dots: bool = False) -> Any:
    """The object at `path`; a broken user module is reported in one line, never as a traceback."""
    module_name, attr = split_path(path, allow_dots)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise DottedPathError(f"cannot import module {module_name!r} ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - a broken user module: say which, in one line
        raise DottedPathError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise DottedPathError(f"module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    return target


# Agent functions (rollout.agent.function): loaded and checked here so that `rlhf validate` needs no
# rollout engine.
class AgentError(ValueError):
    """A bad agent function path or arguments (the message says which)."""


def load_agent_function(path: str) -> Callable[..., Any]:
    """ "pkg.module:function" -> the callable (one clear error line otherwise)."""
    try:
        target = import_object(path)
    except DottedPathError as exc:
        raise AgentError(str(exc)) from exc
    if not callable(target):
        raise AgentError(f"{path!r} is not callable")
    return target


def check_agent_args(fn: Callable[..., Any], args: dict[str, Any]) -> None:
    """The function must accept (prompt, base_url, **args)."""
    try:
        inspect.signature(fn).bind(None, "http://x/v1", **args)
    except TypeError as exc:
        raise AgentError(f"{getattr(fn, '__name__', fn)}(prompt, base_url, **args): {exc}") from None
