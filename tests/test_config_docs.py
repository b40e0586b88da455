"""docs/configuration.md lists exactly the keys the config dataclasses have (no drift either way)."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from rlhf.config import schema as C

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _keys(cls, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls, vars(C))
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp) and tp is not C.RolePlacement:  # RolePlacement: one paragraph
            out |= _keys(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            out.add(f"{prefix}{f.name}")
            out |= _keys(args[0], f"{prefix}{f.name}[i].")
        else:
            out.add(f"{prefix}{f.name}")
    return out


def _documented() -> dict[str, set[str]]:
    sections: dict[str, set[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"### `?([a-z_ ]+)`?$", line)
        if heading:
            current = heading.group(1)
            sections[current] = set()
        elif line.startswith("## "):
            current = None
        elif current and line.startswith("| `"):
            first_cell = line.split("|")[1]  # one row may document several keys: `a`, `b` or `a` / `b`
            sections[current].update(re.findall(r"`([^`]+)`", first_cell))
    return sections


def test_every_config_key_is_documented_and_every_documented_key_exists():
    documented = _documented()
    for f in dataclasses.fields(C.RunConfig):
        if not dataclasses.is_dataclass(typing.get_type_hints(C.RunConfig, vars(C))[f.name]):
            continue
        expected = _keys(typing.get_type_hints(C.RunConfig, vars(C))[f.name])
        got = documented.get(f.name, set())
        assert expected - got == set(), f"docs/configuration.md, `{f.name}`: undocumented keys"
        assert got - expected == set(), f"docs/configuration.md, `{f.name}`: keys that do not exist"
    paragraph = DOC.read_text().split("`RolePlacement` keys:")[1].split("\n\n")[0]
    for f in dataclasses.fields(C.RolePlacement):
        assert f"`{f.name}`" in paragraph, f"docs/configuration.md: RolePlacement key `{f.name}` undocumented"
