"""Registries of the algorithm pieces a config names: advantage estimators, loss aggregations,
off-policy corrections and KL estimators.

Each `algorithm.*` name resolves through one registry, so a new piece is one decorated function, in
any module imported before the run starts (the config's validation and the driver look names up here):

    from rlhf.algorithms.registry import register_advantage

    @register_advantage("mean_baseline")
    def mean_baseline(inputs, cfg):
        \"\"\"r_i - mean_batch r: the batch mean as the baseline.\"\"\"
        adv = inputs.rewards.float() - inputs.rewards.float().mean()
        return adv[:, None] * inputs.mask.float(), None

The first line of the function's docstring is the description shown in docs/algorithms.md
(`python -m rlhf.algorithms.registry` rewrites the tables there). Keyword arguments of the decorator
are attributes the rest of the framework reads, e.g. `needs_critic=True` (see each registry below).
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The `algorithm` section of a run config (rlhf.config.schema.AlgorithmConfig), named here but not
# imported: rlhf.config validates `algorithm.*` names against these registries, so the import goes
# from the config to the algorithms only.
AlgorithmConfig = Any


class UnknownNameError(KeyError, ValueError):
    """A name no registry entry has; the message lists the registered names. Both a KeyError (a failed
    lookup) and a ValueError (a bad config value), so either `except` catches it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    """One registered piece: its name, function, one-line description and attributes."""

    name: str
    fn: Callable[..., Any]
    description: str
    attrs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def first_line(fn: Callable[..., Any]) -> str:
    """The first paragraph of `fn`'s docstring as one line ('' without a docstring)."""
    doc = inspect.getdoc(fn) or ""
    paragraph = doc.split("\n\n", 1)[0]
    return " ".join(paragraph.split())


class Registry:
    """name -> Entry, in registration order.

    `key` is the config key the names go in (for messages), `noun` what one entry is ("estimator")."""

    def __init__(self, key: str, noun: str, title: str):
        self.key, self.noun, self.title = key, noun, title
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str, *, description: str | None = None, replace: bool = False, **attrs: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register the function under `name` (returned unchanged). A name already taken is
        an error unless `replace=True`."""

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name, fn, description=description, replace=replace, **attrs)
            return fn

        return decorator

    def add(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        description: str | None = None,
        replace: bool = False,
        **attrs: Any,
    ) -> Entry:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.key}: a registered name must be a non-empty string, got {name!r}")
        if name in self._entries and not replace:
            raise ValueError(f"{self.key}: {self.noun} {name!r} is already registered")
        entry = Entry(name, fn, first_line(fn) if description is None else description, dict(attrs))
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> Entry:
        """Remove `name` and return its entry."""
        self.get(name)
        return self._entries.pop(name)

    @contextmanager
    def registered(self, name: str, fn: Callable[..., Any], **attrs: Any) -> Iterator[Entry]:
        """Register `fn` as `name` for the duration of a `with` block (tests, experiments); the name
        must be free, and is free again afterwards."""
        entry = self.add(name, fn, **attrs)
        try:
            yield entry
        finally:
            if self._entries.get(name) is entry:
                del self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries.values())

    def unknown(self, name: Any) -> str:
        """The one-line problem of an unknown name: `unknown <noun> 'x'; registered: a, b, c`."""
        return f"unknown {self.noun} {name!r}; registered: {', '.join(self._entries)}"

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(f"{self.key}: {self.unknown(name)}") from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


# Advantage estimators: fn(inputs: AdvantageInputs, cfg) -> (advantages [B, T], returns [B, T] or None)
# (rlhf.algorithms.advantages). Attributes: needs_critic (the loop asks the critic for `values` first),
# group_relative (compares the samples of a prompt: needs rollout.sampling.n >= 2), kl_per_token (takes
# the KL-in-reward penalty per token in `inputs.token_kl`; otherwise it is subtracted from the rewards).
ADVANTAGE_ESTIMATORS = Registry("algorithm.advantage", "estimator", "Advantage estimators")
# Loss aggregations: fn(values [B, T], mask [B, T] float, *, num_tokens, num_sequences, constant) -> scalar
# (rlhf.algorithms.losses.aggregate).
LOSS_AGGREGATIONS = Registry("algorithm.loss_agg", "loss aggregation", "Loss aggregations")
# Off-policy corrections: fn(old_logprobs, rollout_logprobs, cfg) -> per-token weight [B, T] or None (no
# correction) (rlhf.algorithms.losses.policy_loss). `auto` is not an entry: it picks one of these.
OFF_POLICY_CORRECTIONS = Registry("algorithm.off_policy_correction", "correction", "Off-policy corrections")
# KL estimators: fn(log_ratio [B, T], clamped) -> per-token KL estimate [B, T] (rlhf.algorithms.kl).
KL_ESTIMATORS = Registry("algorithm.kl_estimator", "KL estimator", "KL estimators")

register_advantage = ADVANTAGE_ESTIMATORS.register
register_loss_aggregation = LOSS_AGGREGATIONS.register
register_correction = OFF_POLICY_CORRECTIONS.register
register_kl_estimator = KL_ESTIMATORS.register

REGISTRIES = (ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, OFF_POLICY_CORRECTIONS, KL_ESTIMATORS)


def _load_builtins() -> None:
    """Import the modules whose decorators fill the registries (importing any `rlhf.algorithms`
    module does it too, through the package's __init__)."""
    import rlhf.algorithms  # noqa: F401


# -------------------------------------------------------------------------------------------------- docs
BEGIN = "<!-- registry tables: generated by python -m rlhf.algorithms.registry -->"
END = "<!-- end registry tables -->"
DOC = Path(__file__).resolve().parents[2] / "docs" / "algorithms.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _advantage_needs(entry: Entry) -> str:
    needs = []
    if entry.attrs.get("needs_critic"):
        needs.append("a critic (`trainer.critic.enabled`)")
    if entry.attrs.get("group_relative"):
        needs.append("`rollout.sampling.n >= 2`")
    return ", ".join(needs)


def registry_tables() -> str:
    """The markdown tables of every registry's names and descriptions (the block of docs/algorithms.md)."""
    _load_builtins()
    parts = []
    for registry in REGISTRIES:
        advantage = registry is ADVANTAGE_ESTIMATORS
        head = f"**{registry.title}** (`{registry.key}`)\n\n"
        if advantage:
            rows = ["| name | description | needs |", "| --- | --- | --- |"]
            rows += [
                f"| `{e.name}` | {_cell(e.description)} | {_advantage_needs(e)} |" for e in registry.entries()
            ]
        else:
            rows = ["| name | description |", "| --- | --- |"]
            rows += [f"| `{e.name}` | {_cell(e.description)} |" for e in registry.entries()]
        if registry is OFF_POLICY_CORRECTIONS:
            rows.append(
                "| `auto` | (the default) `tis` when `tis_cap` is set, `decoupled_ppo` when "
                "`rollout.max_staleness >= 1`, `tis` (cap 2 unless `tis_cap` is set) with FP8 engines "
                "(`rollout.quantization: fp8`, docs/fp8.md), else `none`. |"
            )
        parts.append(head + "\n".join(rows))
    return "\n\n".join(parts) + "\n"


def doc_block(text: str) -> str:
    """The generated part of docs/algorithms.md's text (between the markers, without them)."""
    match = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), text, re.S)
    if match is None:
        raise ValueError(f"{DOC.name}: markers {BEGIN!r} ... {END!r} not found")
    return match.group(1)


def write_doc(path: Path = DOC) -> bool:
    """Rewrite the generated block of `path`; True if it changed."""
    text = path.read_text()
    old = doc_block(text)
    new = registry_tables()
    if old == new:
        return False
    start = text.index(BEGIN) + len(BEGIN) + 1
    path.write_text(text[:start] + new + text[start + len(old) :])
    return True


def main() -> int:
    # Run as a script this file is `__main__`, a second copy: use the package's registries.
    from rlhf.algorithms import registry

    changed = registry.write_doc()
    print(f"{registry.DOC}: {'rewritten' if changed else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
