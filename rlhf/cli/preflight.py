"""What `rlhf validate` checks of a run's inputs without starting Ray or an engine: the data file's
columns against `data.input_key` / `data.label_key`, the model directory's config and tokenizer, and
whether vLLM on this device runs the model's head size and `model.dtype`. Each problem is one line
naming the key (`PreflightError`); what was checked comes back as lines for the user."""

from __future__ import annotations

import json
import os

from rlhf.config.loader import ConfigError
from rlhf.config.schema import DataConfig, RunConfig
from rlhf.data.formats import LAYOUTS, resolve_format
from rlhf.data.prompts import FILE_FORMATS, column_problems


class PreflightError(ConfigError):
    """One line: the key, the value, what is wrong (`rlhf` prints it and exits as for a bad config)."""


def check_run_inputs(cfg: RunConfig, device: str) -> list[str]:
    """Raise PreflightError on the first problem; return one line per check made (or skipped)."""
    lines = []
    model_dir = local_model_dir(cfg.model.path)
    if model_dir is None:
        lines.append(
            f"model.path {cfg.model.path!r}: not on this machine yet (built or downloaded at the first run)"
        )
    else:
        lines.append(check_model(model_dir, cfg.model.dtype, device, cfg.model.trust_remote_code))
    lines.append(check_data_columns(cfg.data))
    if cfg.trainer.lora.rank > 0:
        lines.append(check_lora_serving(cfg, device, model_dir))
    return lines


def check_lora_serving(cfg: RunConfig, device: str, model_dir: str | None) -> str:
    """What a LoRA run's weight pushes will send: the adapters, or merged weights where the engines
    cannot serve LoRA (`trainer.lora.sync: adapter` there is an error)."""
    from rlhf.rollout.lora import push_choice

    lora = cfg.trainer.lora
    adapter, reason = push_choice(cfg, device, model_dir)
    if adapter:
        return f"trainer.lora: weight pushes send the rank-{lora.rank} adapters alone"
    if lora.sync == "adapter":
        raise PreflightError(f"trainer.lora.sync=adapter: {reason}")
    return f"trainer.lora: weight pushes send merged weights: {reason}"


def local_model_dir(path: str) -> str | None:
    """The model directory if it is on this machine (a local path, or a built-in model already built)."""
    from rlhf.data.models import BUILTIN_MODELS, cache_root

    expanded = os.path.expanduser(path)
    if os.path.exists(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise PreflightError(
                f"model.path {path!r} has no config.json: expected a Hugging Face model directory"
            )
        return expanded
    if path in BUILTIN_MODELS:
        built = os.path.join(cache_root(None), "models", path)
        return built if os.path.isfile(os.path.join(built, "config.json")) else None
    return None


def check_model(model_dir: str, dtype: str, device: str, trust_remote_code: bool = False) -> str:
    from rlhf.data.models import check_engine_can_run
    from rlhf.rollout.engine import resolve_dtype

    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PreflightError(f"model.path {model_dir!r}: config.json does not read as JSON ({e})") from None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001  (any loader error is the user's to read, in one line)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PreflightError(f"model.path {model_dir!r}: the tokenizer does not load ({first})") from None
    try:
        check_engine_can_run(model_dir, device)
    except ValueError as e:
        raise PreflightError(str(e)) from None
    wanted = resolve_dtype(dtype, device)
    supported = vllm_dtypes(device)
    if supported is not None and wanted not in supported:
        raise PreflightError(
            f"model.dtype {dtype!r} ({wanted} on {device}): vLLM on this device runs {', '.join(supported)}"
        )
    return f"model.path {model_dir}: config, tokenizer ({type(tokenizer).__name__}), head size and {wanted} on {device}: ok"


def vllm_dtypes(device: str) -> list[str] | None:
    """The dtypes vLLM's platform says it runs here (None where vLLM cannot tell for `device`)."""
    try:
        from vllm.platforms import current_platform
    except Exception:  # noqa: BLE001  (no vLLM, or one that fails to import: the engine will say so)
        return None
    on_cpu = current_platform.is_cpu()
    if on_cpu != (device == "cpu"):
        return None
    return [str(d).removeprefix("torch.") for d in current_platform.supported_dtypes]


def check_data_columns(data: DataConfig) -> str:
    """A local data file's columns (from its first row or header) against input_key and label_key."""
    source = os.path.expanduser(data.source)
    if data.source.startswith("builtin:"):
        return f"data.source {data.source}: built-in task, columns ok"
    ext = os.path.splitext(source)[1].lower()
    if not os.path.isfile(source) or ext not in FILE_FORMATS:
        return f"data.source {data.source}: not a local data file, columns checked when the run loads it"
    columns = _columns(source, ext)
    error, label_warning = column_problems(data, columns, data.task_args.get("task"))
    if error:
        raise PreflightError(error)
    fmt = resolve_format(data.format, columns)
    if fmt in LAYOUTS:
        layout = LAYOUTS[fmt]
        return (
            f"data.source {data.source}: format {fmt}, prompts from {layout.input_key!r}, labels "
            f"extracted from {layout.solution_key!r}"
        )
    label_note = (
        f"label_key {data.label_key!r}"
        if label_warning is None
        else f"no {data.label_key!r} column: prompts get no label"
    )
    return f"data.source {data.source}: input_key {data.input_key!r}, {label_note}"


def _columns(path: str, ext: str) -> list[str]:
    if ext in (".parquet", ".arrow"):
        import datasets

        builder = datasets.load_dataset(FILE_FORMATS[ext], data_files=path, split="train", streaming=True)
        return list(next(iter(builder), {}))
    with open(path) as f:
        if ext == ".csv":
            import csv

            return next(csv.reader(f), [])
        if ext == ".json":
            text = f.read()
            try:
                rows = json.loads(text)
                first = rows[0] if isinstance(rows, list) and rows else rows
            except json.JSONDecodeError:  # JSON lines with a .json name
                first = json.loads(text.splitlines()[0]) if text.strip() else {}
        else:
            line = next((line for line in f if line.strip()), "")
            try:
                first = json.loads(line) if line else {}
            except json.JSONDecodeError as e:
                raise PreflightError(f"data.source {path!r}: the first line is not JSON ({e})") from None
    return list(first) if isinstance(first, dict) else []
