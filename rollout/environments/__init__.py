"""Multi-turn environments: the interface, the built-ins and the loader (docs/agents.md)."""

from rlhf.environment import (
    BUILTIN_ENVIRONMENTS,
    EnvError,
    Environment,
    StepResult,
    check_environment_args,
    make_environment,
    resolve_environment_class,
)

__all__ = [
    "BUILTIN_ENVIRONMENTS",
    "EnvError",
    "Environment",
    "StepResult",
    "check_environment_args",
    "make_environment",
    "resolve_environment_class",
]
