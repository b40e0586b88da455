"""YAML recipes -> a validated, typed `RunConfig`.

A recipe is plain YAML mirroring the dataclasses in `rlhf.config.schema`. Three conveniences on top:

* `defaults: [base.yaml, ...]` includes other files (relative to the including file), deep-merged
  in order, then the file itself on top. Dicts merge key by key; lists and scalars replace.
* Command-line overrides `key.sub=value`; the value is parsed as YAML, so `trainer.lr=1e-5`,
  `placement.colocate=[[rollout,learner]]` and `reward.sources=[{kind: rule, name: task}]` work.
  `resume=RUN_DIR` is kept verbatim (never YAML-parsed).
* Every error is one line naming the file, the dotted key, the bad value and the problem, because
  a typo should cost seconds, not a crashed cluster job ten minutes in.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf.config.schema import RunConfig

OVERRIDE = "<override>"


class ConfigError(ValueError):
    """A bad recipe or override; the message is one line: `file: key: problem (got value)`."""


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _error(file: str, key: str, problem: str, value: Any = dataclasses.MISSING) -> ConfigError:
    got = "" if value is dataclasses.MISSING else f" (got {_fmt(value)})"
    where = f"{key}: " if key else ""
    return ConfigError(f"{file}: {where}{problem}{got}")


# ----------------------------------------------------------------------------------------------
# Reading YAML: includes and overrides
# ----------------------------------------------------------------------------------------------


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> tuple[dict, dict[str, str]]:
    """Returns the merged raw dict of `path` (with its defaults) and the origin file of every key."""
    shown = _display(path)
    if path in chain:
        cycle = " -> ".join(_display(p) for p in (*chain, path))
        raise _error(_display(chain[-1]), "defaults", f"include cycle: {cycle}")
    if not path.is_file():
        where = _display(chain[-1]) if chain else shown
        raise _error(where, "defaults" if chain else "", f"config file not found: {shown}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise _error(shown, "", f"invalid YAML{line}: {problem}") from None
    if not isinstance(raw, dict):
        raise _error(shown, "", "top level must be a mapping of sections", raw)

    includes = raw.pop("defaults", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise _error(shown, "defaults", "must be a list of YAML file paths", includes)

    merged: dict = {}
    origins: dict[str, str] = {}
    for include in includes:
        sub, sub_origins = _read_yaml((path.parent / include).resolve(), (*chain, path))
        _deep_merge(merged, sub, origins, sub_origins)
    own_origins = {key: shown for key in _leaf_keys(raw)}
    _deep_merge(merged, raw, origins, own_origins)
    return merged, origins


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _leaf_keys(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict) and tree:
        keys = []
        for key, value in tree.items():
            keys += _leaf_keys(value, f"{prefix}.{key}" if prefix else str(key))
        return keys
    return [prefix] if prefix else []


def _deep_merge(base: dict, top: Mapping, origins: dict[str, str], top_origins: dict[str, str]) -> None:
    """Merges `top` into `base` in place: dicts recurse, everything else replaces."""
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value, origins, top_origins)
        else:
            base[key] = value
    origins.update(top_origins)


def _field_type(path: list[str]) -> Any:
    """The declared type at a dotted path of RunConfig (None when the path leaves the dataclasses)."""
    tp: Any = RunConfig
    for part in path:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _wants_str(tp: Any) -> bool:
    if tp is str:
        return True
    return _is_union(tp) and str in typing.get_args(tp) and len(typing.get_args(tp)) <= 2


_INDEX = re.compile(r"^([^\[\]]+)((?:\[\d+\])*)$")


def _apply_override(tree: dict, origins: dict[str, str], text: str) -> None:
    if "=" not in text:
        raise _error(OVERRIDE, "", "overrides look like key.sub=value", text)
    dotted, raw_value = text.split("=", 1)
    dotted = dotted.strip()
    if not dotted:
        raise _error(OVERRIDE, "", "empty key in override", text)
    parts: list[str | int] = []
    for piece in dotted.split("."):
        match = _INDEX.match(piece)
        if not match:
            raise _error(OVERRIDE, dotted, "malformed key", text)
        parts.append(match.group(1))
        parts += [int(i) for i in re.findall(r"\[(\d+)\]", match.group(2))]

    names = [p for p in parts if isinstance(p, str)]
    if dotted == "resume" or _wants_str(_field_type(names)) and all(isinstance(p, str) for p in parts):
        value: Any = raw_value  # strings stay strings: `run_name=2024-01-01` is not a date
        if raw_value.strip() in ("null", "~", "None"):
            value = None
    else:
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else None
        except yaml.YAMLError:
            raise _error(OVERRIDE, dotted, "value is not valid YAML", raw_value) from None

    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise _error(OVERRIDE, dotted, f"index [{part}] is out of range", text)
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise _error(OVERRIDE, dotted, f"'{part}' is not inside a section", text)
        if isinstance(nxt, int):
            if not isinstance(node.get(part), list):
                raise _error(OVERRIDE, dotted, f"index into '{part}' needs a list set in the recipe", text)
        elif not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise _error(OVERRIDE, dotted, f"index [{last}] is out of range", text)
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise _error(OVERRIDE, dotted, "not inside a section", text)
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            _deep_merge(node[last], value, {}, {})  # `section={a: 1}` updates the section like a file would
        else:
            node[last] = value
    plain = re.sub(r"\[\d+\]", "", dotted)
    origins[plain] = OVERRIDE
    if isinstance(value, dict):
        origins.update({f"{plain}.{key}": OVERRIDE for key in _leaf_keys(value)})


# ----------------------------------------------------------------------------------------------
# Building the typed tree
# ----------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, origins: dict[str, str], default_file: str):
        self.origins = origins
        self.default_file = default_file

    def file_of(self, key: str) -> str:
        return origin_of(key, self.origins, self.default_file)

    def fail(self, key: str, problem: str, value: Any = dataclasses.MISSING) -> ConfigError:
        return _error(self.file_of(key), key, problem, value)

    def build(self, tp: Any, value: Any, key: str) -> Any:
        if tp is Any or tp is object:
            return value
        if dataclasses.is_dataclass(tp):
            return self._dataclass(tp, value, key)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if _is_union(tp):
            if value is None and type(None) in args:
                return None
            options = [a for a in args if a is not type(None)]
            if value is None:
                raise self.fail(key, f"must be {_describe(tp)}", value)
            errors = []
            for option in options:
                try:
                    return self.build(option, value, key)
                except ConfigError as exc:
                    errors.append(exc)
            if len(errors) == 1:
                raise errors[0]
            raise self.fail(key, f"must be {_describe(tp)}", value)
        if origin is Literal:
            for allowed in args:
                if value == allowed and type(value) is type(allowed):
                    return value
            choices = ", ".join(repr(a) for a in args)
            raise self.fail(key, f"must be one of {choices}", value)
        if origin in (list, Sequence):
            if not isinstance(value, list | tuple):
                raise self.fail(key, f"must be a list of {_describe(args[0])}", value)
            return [self.build(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
        if origin is tuple:
            if not isinstance(value, list | tuple):
                raise self.fail(key, f"must be a list of {len(args)} values", value)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(self.build(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
            if len(value) != len(args):
                raise self.fail(key, f"must have exactly {len(args)} values", value)
            return tuple(self.build(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        if origin is dict:
            if not isinstance(value, dict):
                raise self.fail(key, "must be a mapping", value)
            key_tp, value_tp = args or (Any, Any)
            return {
                self.build(key_tp, k, key): self.build(value_tp, v, f"{key}.{k}") for k, v in value.items()
            }
        if tp is bool:
            if not isinstance(value, bool):
                raise self.fail(key, "must be true or false", value)
            return value
        if tp is int:
            if isinstance(value, bool):
                raise self.fail(key, "must be an integer, not a boolean", value)
            if isinstance(value, int):
                return value
            number = _as_number(value)
            if number is not None and math.isfinite(number) and number.is_integer():
                return int(number)
            raise self.fail(key, "must be an integer", value)
        if tp is float:
            if isinstance(value, bool):
                raise self.fail(key, "must be a number, not a boolean", value)
            number = _as_number(value)
            if number is None:
                raise self.fail(key, "must be a number", value)
            return number
        if tp is str:
            if not isinstance(value, str):
                raise self.fail(key, "must be a string (quote it in YAML)", value)
            return value
        raise self.fail(key, f"unsupported type {tp}")  # a schema bug, not a user error

    def _dataclass(self, tp: Any, value: Any, key: str) -> Any:
        if value is None:
            value = {}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = to_dict(value)
        if not isinstance(value, dict):
            raise self.fail(key, "must be a mapping (a section)", value)
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        kwargs = {}
        for name, item in value.items():
            child = f"{key}.{name}" if key else str(name)
            if name not in names:
                close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
                hint = f"; did you mean '{key + '.' if key else ''}{close[0]}'?" if close else ""
                if not close:
                    hint = f"; valid keys: {', '.join(names)}"
                raise _error(self.file_of(child), child, f"unknown key{hint}")
            kwargs[name] = self.build(hints[name], item, child)
        return tp(**kwargs)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _describe(tp: Any) -> str:
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _as_number(value: Any) -> float | None:
    """int/float, or a numeric string (YAML 1.1 reads `1e-5` as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def origin_of(key: str, origins: Mapping[str, str], default: str) -> str:
    """The file that set `key` (or its closest parent/child), for error messages."""
    plain = re.sub(r"\[\d+\]", "", key)
    probe = plain
    while probe:
        if probe in origins:
            return origins[probe]
        probe = probe.rpartition(".")[0]
    for set_key, file in origins.items():
        if set_key.startswith(plain + "."):
            return file
    return default


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a recipe (with its `defaults` includes), applies overrides, types and validates it."""
    config_path = Path(path)
    if config_path.is_dir() and (config_path / "config.yaml").is_file():
        # A run directory: continue it with the exact config it was started with.
        config_path = config_path / "config.yaml"
        overrides = [f"resume={Path(path)}", *overrides]
    tree, origins = _read_yaml(config_path.resolve(), ())
    for text in overrides:
        _apply_override(tree, origins, text)
    tree.pop("source_file", None)
    shown = _display(config_path.resolve())
    cfg = _Builder(origins, shown).build(RunConfig, tree, "")
    cfg.source_file = str(config_path)
    validate(cfg, origins, shown)
    return cfg


def from_dict(tree: Mapping[str, Any], source: str = "<dict>") -> RunConfig:
    """Types and validates an in-memory dict (tests, notebooks)."""
    cfg = _Builder({}, source).build(RunConfig, dict(tree), "")
    validate(cfg, source=source)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (tuples as lists) that `load_config` reads back to an equal config."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def to_yaml(cfg: RunConfig) -> str:
    tree = to_dict(cfg)
    tree.pop("source_file", None)
    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=None, width=100)


def resolve_device(cfg: RunConfig) -> Literal["cpu", "cuda"]:
    """`auto` means cuda iff this process sees a CUDA device."""
    device = cfg.placement.device
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# Semantic validation
# ----------------------------------------------------------------------------------------------


def validate(
    cfg: RunConfig, origins: Mapping[str, str] | None = None, source: str | None = None
) -> RunConfig:
    """Every range and cross-field check (`rlhf.config.validate`, which imports this module)."""
    from rlhf.config.validate import validate as check

    return check(cfg, origins, source)
