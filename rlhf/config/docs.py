"""Writes docs/configuration.md from the config dataclasses, so the reference cannot drift from the code.

    python -m rlhf.config.docs           # rewrite docs/configuration.md
    python -m rlhf.config.docs --check   # exit 1 when docs/configuration.md is stale

The hand-written prose is `TEMPLATE` below; each `<!-- keys: NAME -->` line in it becomes the table of
one section (a `RunConfig` field, `top level` for the scalar fields of `RunConfig`, or a dataclass with
a table of its own such as `RolePlacement`): key, type, default, and the field's `metadata["help"]`
from `rlhf/config/schema.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from rlhf.config import schema

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
REGENERATE = "python -m rlhf.config.docs"

# Dataclasses used by several fields get one table of their own instead of being flattened into rows.
OWN_TABLE: tuple[type, ...] = (schema.RolePlacement,)

# Recipe keys that are not dataclass fields: (section, key, type, default, help).
EXTRA_ROWS = [
    ("top level", "defaults", "list[str]", "[]", "Includes (see above); not part of the typed config."),
]

TEMPLATE = r"""# Configuration

A run is described by one YAML *recipe* whose sections mirror the dataclasses in
[`rlhf/config/schema.py`](../rlhf/config/schema.py). `rlhf.config.loader.load_config(path, overrides)` reads it,
merges includes, applies command-line overrides, checks every value's type and range, and returns a
typed `RunConfig`. Anything not written in the recipe keeps the default shown below.

```bash
rlhf validate configs/grpo.yaml trainer.lr=1e-5          # print the fully resolved YAML
rlhf plan     configs/grpo.yaml --inventory configs/inventories/h100x8_l4x8.yaml --propose
rlhf train    configs/grpo.yaml steps=200 placement.colocate=[[rollout,learner]]
rlhf k8s      configs/grpo.yaml --image ghcr.io/me/rlhf:0.1 -o rayjob.yaml
python -m rlhf validate configs/grpo.yaml                # same as `rlhf`
```

Exit codes: `0` ok, `2` bad recipe / override / command line (`error: ...` on stderr),
`3` the roles do not fit the cluster (see [placement.md](placement.md)).

`rlhf validate` also checks what the run will read, without starting Ray or an engine
(`rlhf/cli/preflight.py`), and prints one `checked: ...` line per check to stderr: a local data file's
columns (from its first row or header) against `data.input_key` and `data.label_key` (the label is
required when `data.task_args.task` names a checker); the model directory's `config.json` and
tokenizer; and whether vLLM on this device runs the model's head size and `model.dtype` (vLLM's own
list of supported dtypes). A built-in model that is not built yet, or a hub id, is said to be
checked at the first run. Each problem is one `error:` line naming the key, exit code `2`.

## Includes: `defaults`

```yaml
# configs/my_run.yaml
defaults: [grpo.yaml, base/h100.yaml]   # paths relative to this file
trainer: {lr: 2.0e-6}
```

Included files are loaded (recursively, with their own `defaults`) and deep-merged in list order,
then the file itself goes on top. Mappings merge key by key; lists and scalars are replaced whole
(`reward.sources` in a child replaces the parent's list). An include cycle is an error that shows
the chain: `b.yaml: defaults: include cycle: a.yaml -> b.yaml -> a.yaml`.

## Overrides

Every command takes `key.sub=value` arguments after the recipe. The value is parsed as YAML:

| override | result |
| --- | --- |
| `trainer.lr=1e-5` | `1e-05` (numeric strings are accepted wherever a number is expected) |
| `rollout.sampling.stop=['</answer>']` | a list |
| `placement.colocate=[[rollout,learner]]` | a list of lists |
| `reward.sources=[{kind: rule, name: task}, {name: format, weight: 0.1}]` | a list of sections |
| `reward.sources[1].weight=0.5` | one item of a list set in the recipe |
| `placement.learner={replicas: 8, accelerator_type: H100}` | a section (merged like a file) |
| `rollout.gpu_memory_utilization=null` | back to the default `None` |
| `logging.run_name=2024-01-01` | string fields keep the text verbatim (no YAML dates/numbers) |
| `resume=runs/grpo-20250101-120000` | continue that run (kept verbatim; a directory or a storage URI such as `s3://bucket/runs/grpo-...`) |

Passing a run directory instead of a recipe (`rlhf train runs/grpo-...`) loads the
`config.yaml` saved in it and sets `resume` to that directory.

## Errors

Every error is one line: `<file>: <dotted.key>: <problem> (got <value>)`. The file is the one that
set the key (an included file, the recipe, or `<override>`):

```
configs/x.yaml: trainer.lr: must be > 0 (got -0.1)
configs/x.yaml: rollout.samplng: unknown key; did you mean 'rollout.sampling'?
<override>: reward.sources[1].name: cannot import module 'my_rewardz' (No module named 'my_rewardz') (got 'my_rewardz:brevity')
<override>: placement.colocate[0]: unknown role 'rollot'; did you mean 'rollout'? (got ['rollot', 'learner'])
```

Types are checked against the dataclass hints: integers where `int` is declared (booleans are not
integers; `2.0` is accepted as 2), numbers or numeric strings where `float` is declared (integers are
promoted), `true/false` for booleans, one of the listed values for enumerations, exactly two numbers
for `adam_betas`.

## Sections and keys

The tables below are generated from the help of each field in
[`rlhf/config/schema.py`](../rlhf/config/schema.py) by `python -m rlhf.config.docs`; edit the
help there, not here.

### top level

<!-- keys: top level -->

### `model`

<!-- keys: model -->

### `data`

<!-- keys: data -->

### `rollout`

<!-- keys: rollout -->

### `reward`

<!-- keys: reward -->

See [rewards.md](rewards.md) for writing reward functions.

### `algorithm`

<!-- keys: algorithm -->

See [algorithms.md](algorithms.md) for the maths.

### `trainer`

<!-- keys: trainer -->

### `placement`

Where roles run; see [placement.md](placement.md) for the planner and colocation.

<!-- keys: placement -->

#### `RolePlacement`

The keys of each role above (`placement.rollout.replicas`, `placement.learner.gpus`, ...):

<!-- keys: RolePlacement -->

### `sync`

<!-- keys: sync -->

### `logging`

<!-- keys: logging -->

### `checkpoint`

<!-- keys: checkpoint -->

### `evaluation`

Eval sets, evaluated before the first step, every `eval_every` steps and after the last; results are
`eval/<name>/...` at the step whose weights produced them ([monitoring.md](monitoring.md)).

<!-- keys: evaluation -->

## Python API

```python
from rlhf.config.loader import load_config, validate, to_yaml, to_dict, from_dict, resolve_device, ConfigError

cfg = load_config("configs/grpo.yaml", ["trainer.lr=1e-5"])
text = to_yaml(cfg)  # load_config reads it back to an equal config
device = resolve_device(cfg)  # "cpu" | "cuda"
cfg2 = from_dict({"steps": 2})  # in-memory dicts, same checks
```
"""

HEADER = (
    "<!-- Generated by `python -m rlhf.config.docs` from rlhf/config/schema.py (field help) and "
    "rlhf/config/docs.py (prose); edit those, not this file. -->\n\n"
)
_MARKER = re.compile(r"^<!-- keys: ([A-Za-z_ ]+) -->$", re.M)
_DOC_LINK = re.compile(r"(?<![\w/.])docs/([\w-]+\.md)(#[\w-]+)?")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(schema))


def type_text(tp: Any) -> str:
    """The type of a field as a recipe writer sees it: `int`, `str or null`, one of `a`, `b`, ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        text = " or ".join(type_text(a) for a in rest)
        return f"{text} or null" if len(rest) < len(args) else text
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is list:
        (item,) = args
        if dataclasses.is_dataclass(item):
            return "list of sections"
        return f"list[{type_text(item)}]"
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        value = args[1] if args else Any
        return "mapping" if value is Any else f"mapping of {type_text(value)}"
    if dataclasses.is_dataclass(tp):
        return f"`{tp.__name__}`"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def value_text(value: Any) -> str:
    """A default as it would be written in YAML (flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", lambda m: f"e{m.group(1).lstrip('+')}{m.group(2)}", repr(value))
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value):
        shown = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return value_text({k: v for k, v in shown.items() if v not in (None, [], {})})
    return str(value)


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"{f.name}: a config field needs a default")


def help_of(cls: type, f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "").strip()
    if not text:
        raise ValueError(f"rlhf/config/schema.py: {cls.__name__}.{f.name} has no help text")
    return text


def rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every key of `cls`, nested sections flattened with dotted keys."""
    hints = _hints(cls)
    out: list[tuple[str, str, str, str]] = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp) and tp not in OWN_TABLE:
            help_of(cls, f)
            out += rows(tp, f"{key}.")
            continue
        default = "see below" if tp in OWN_TABLE else f"`{value_text(default_of(f))}`"
        out.append((f"`{key}`", type_text(tp), default, help_of(cls, f)))
        if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            out += rows(args[0], f"{key}[i].")
    return out


def _cell(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")


def _link_docs(text: str) -> str:
    """`docs/x.md#anchor` mentions in help become links relative to docs/."""
    return _DOC_LINK.sub(lambda m: f"[docs/{m.group(1)}]({m.group(1)}{m.group(2) or ''})", text)


def table(section: str) -> str:
    run_hints = _hints(schema.RunConfig)
    by_name = {cls.__name__: cls for cls in OWN_TABLE}
    if section == "top level":
        body = [
            (
                f"`{f.name}`",
                type_text(run_hints[f.name]),
                f"`{value_text(default_of(f))}`",
                help_of(schema.RunConfig, f),
            )
            for f in dataclasses.fields(schema.RunConfig)
            if not dataclasses.is_dataclass(run_hints[f.name])
        ]
    elif section in by_name:
        body = rows(by_name[section])
    elif section in run_hints and dataclasses.is_dataclass(run_hints[section]):
        body = rows(run_hints[section])
    else:
        raise ValueError(f"rlhf/config/docs.py: `<!-- keys: {section} -->` names no config section")
    body += [
        (f"`{key}`", tp, f"`{default}`", text) for sec, key, tp, default, text in EXTRA_ROWS if sec == section
    ]
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines += [
        "| " + " | ".join(_cell(c) for c in (key, tp, default, _link_docs(text))) + " |"
        for key, tp, default, text in body
    ]
    return "\n".join(lines)


def sections() -> list[str]:
    """Every table the reference must contain."""
    run_hints = _hints(schema.RunConfig)
    nested = [
        f.name for f in dataclasses.fields(schema.RunConfig) if dataclasses.is_dataclass(run_hints[f.name])
    ]
    return ["top level", *nested, *(cls.__name__ for cls in OWN_TABLE)]


def render() -> str:
    """The full text of docs/configuration.md."""
    found = _MARKER.findall(TEMPLATE)
    missing = [s for s in sections() if s not in found]
    if missing:
        raise ValueError(f"rlhf/config/docs.py: TEMPLATE has no `<!-- keys: NAME -->` line for {missing}")
    return HEADER + _MARKER.sub(lambda m: table(m.group(1)), TEMPLATE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.config.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    parser.add_argument("--path", type=Path, default=DOC_PATH, help="the file to write or check")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.path.is_file() or args.path.read_text() != text:
            shown = os.path.relpath(args.path) if args.path.is_absolute() else args.path
            print(f"{shown} is stale; regenerate it with `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    args.path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
