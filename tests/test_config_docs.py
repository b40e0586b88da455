"""docs/configuration.md is generated from the config dataclasses' help, lists exactly their keys, and is
up to date (`python -m rlhf.config.docs` rewrites it)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

from rlhf.config import docs as config_docs
from rlhf.config import schema as C

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _keys(cls, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls, vars(C))
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp) and tp is not C.RolePlacement:  # RolePlacement: a table of its own
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
        heading = re.match(r"####? `?([A-Za-z_ ]+)`?$", line)
        if heading:
            current = heading.group(1)
            sections[current] = set()
        elif line.startswith("## "):
            current = None
        elif current and line.startswith("| `"):
            first_cell = line.split("|")[1]  # one row may document several keys: `a`, `b` or `a` / `b`
            sections[current].update(re.findall(r"`([^`]+)`", first_cell))
    return sections


def _all_dataclasses(cls=C.RunConfig, seen=None) -> list[type]:
    seen = [] if seen is None else seen
    if cls in seen:
        return seen
    seen.append(cls)
    for tp in typing.get_type_hints(cls, vars(C)).values():
        for candidate in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(candidate):
                _all_dataclasses(candidate, seen)
    return seen


def test_every_config_key_is_documented_and_every_documented_key_exists():
    documented = _documented()
    for f in dataclasses.fields(C.RunConfig):
        if not dataclasses.is_dataclass(typing.get_type_hints(C.RunConfig, vars(C))[f.name]):
            continue
        expected = _keys(typing.get_type_hints(C.RunConfig, vars(C))[f.name])
        got = documented.get(f.name, set())
        assert expected - got == set(), f"docs/configuration.md, `{f.name}`: undocumented keys"
        assert got - expected == set(), f"docs/configuration.md, `{f.name}`: keys that do not exist"
    role_keys = {f.name for f in dataclasses.fields(C.RolePlacement)}
    got = documented.get("RolePlacement", set())
    assert role_keys - got == set(), "docs/configuration.md: undocumented RolePlacement keys"
    assert got - role_keys == set(), "docs/configuration.md: RolePlacement keys that do not exist"


def test_every_config_field_has_help():
    classes = _all_dataclasses()
    assert C.RolePlacement in classes and C.EvalSetConfig in classes
    for cls in classes:
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help")
            assert isinstance(text, str) and text.strip(), f"{cls.__name__}.{f.name}: no help text"


def test_configuration_md_is_generated_from_the_schema():
    assert DOC.read_text() == config_docs.render(), (
        "docs/configuration.md is stale; regenerate it with `python -m rlhf.config.docs`"
    )


def test_the_generated_reference_links_to_files_that_exist():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", config_docs.render()):
        assert (DOC.parent / target).exists(), f"docs/configuration.md links to a missing {target}"


def test_check_mode_reports_a_stale_file(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration\n")
    cmd = [sys.executable, "-m", "rlhf.config.docs", "--check", "--path", str(stale)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 1
    assert "is stale; regenerate it with `python -m rlhf.config.docs`" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert subprocess.run([sys.executable, "-m", "rlhf.config.docs", "--path", str(stale)]).returncode == 0
    assert stale.read_text() == config_docs.render()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
