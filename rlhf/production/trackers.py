"""Experiment trackers: where each step's metrics and the run's config go besides `metrics.jsonl`.

`logging.trackers` picks any of W&B, TensorBoard and MLflow; a lab without a hosted service still
gets its curves in TensorBoard event files or a local MLflow store. Each tracker is one small class
with the same three calls (`log(metrics, step)`, `log_config(config)`, `finish()`), and
`TrackerGroup` sends every call to all of them: a tracker that fails prints one line naming it and
the others go on, so a full disk or an unreachable store never stops a training run.

`metrics.jsonl` is not one of them: the run's closing summary and reward plot read it back, so it is
always written (rlhf/production/metrics.py). A resumed run appends to what it started: W&B by the
run's id, TensorBoard in the same directory (dropping the steps after the resumed checkpoint), MLflow
through the run id kept in `<run dir>/trackers.json`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rlhf.config.optional import missing_package

TRACKERS = ("wandb", "tensorboard", "mlflow")
# The module each tracker imports and how to get it.
STATE_FILE = "trackers.json"  # what a resume needs to find its tracker runs again
# Shown as metric columns next to the hyperparameters in TensorBoard's HPARAMS tab.
HPARAM_METRICS = ("reward/mean", "eval/reward_mean")


def wandb_mode(mode: str) -> str:
    """auto: online when an API key is configured, otherwise offline (sync later with `wandb sync`)."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def default_log(msg: str) -> None:
    print(f"[rlhf] {msg}", file=sys.stderr, flush=True)


def flatten(tree: Any, prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config as dotted keys with scalar values (lists, mappings in lists and null as JSON),
    the form every tracker's hyperparameter table takes."""
    out: dict[str, str | int | float | bool] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) and value:
                out.update(flatten(value, name))
            else:
                out[name] = _scalar(value)
        return out
    return {prefix: _scalar(tree)}


def _scalar(value: Any) -> str | int | float | bool:
    if isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, default=str)


def read_state(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_state(run_dir: Path, name: str, entry: dict[str, Any]) -> None:
    state = read_state(run_dir)
    state[name] = entry
    (Path(run_dir) / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


class Tracker:
    """One destination of a run's metrics and config."""

    name = ""

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_config(self, config: dict[str, Any]) -> None:
        """The run's config (nested, as in `config.yaml`) as hyperparameters."""

    def finish(self) -> None:
        """Flush and close; the run is over."""


class WandbTracker(Tracker):
    """A W&B run with the run's name as its id (a resume with the same name continues it)."""

    name = "wandb"

    def __init__(self, run_dir: Path, project: str, run_name: str, mode: str):
        import wandb

        self.run = wandb.init(
            project=project,
            name=run_name,
            dir=str(run_dir),
            mode=mode,
            resume="allow",
            id=run_name.replace("/", "-"),
        )
        # Every row carries the step its figures belong to, and W&B plots against it: evaluations on
        # their own engines arrive steps later, which W&B's own (only growing) step could not take.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "step": step})

    def log_image(self, key: str, path: Path) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))})

    def finish(self) -> None:
        self.run.finish()


class TensorBoardTracker(Tracker):
    """Event files in `logdir` (tensorboardX: no TensorFlow, no `tensorboard` needed to write them).

    The writer opens at the first logged step: in a directory that already holds event files (a
    resume) it purges that step and later ones, so TensorBoard drops what the interrupted attempt
    logged after the checkpoint the run resumed from."""

    name = "tensorboard"

    def __init__(self, logdir: Path):
        from tensorboardX import SummaryWriter

        self._writer_class = SummaryWriter
        self.logdir = Path(logdir)
        self.resumed = any(self.logdir.glob("events.out.tfevents.*"))
        self.writer = None
        self.config: dict[str, Any] | None = None

    def _open(self, step: int | None) -> None:
        purge = step if self.resumed and step is not None else None
        # tensorboardX names a file by the second it opened: the suffix keeps a resume in the same
        # second from overwriting the first attempt's file (and sorts after it, as TensorBoard reads).
        self.writer = self._writer_class(
            logdir=str(self.logdir), purge_step=purge, flush_secs=30, filename_suffix=f".{time.time_ns()}"
        )
        if self.config is not None:
            self._write_config(self.config)

    def _write_config(self, config: dict[str, Any]) -> None:
        from tensorboardX.summary import hparams

        flat = flatten(config)
        experiment, session_start, _ = hparams(flat, dict.fromkeys(HPARAM_METRICS, 0.0))
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)
        table = "\n".join(["| key | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in flat.items()])
        self.writer.add_text("config", table)
        self.writer.flush()

    def log_config(self, config: dict[str, Any]) -> None:
        self.config = config
        if self.writer is not None:
            self._write_config(config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.writer is None:
            self._open(step)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a step takes seconds: a crash then loses nothing that was logged

    def finish(self) -> None:
        if self.writer is None and self.config is not None:
            self._open(None)
        if self.writer is not None:
            self.writer.close()


def mlflow_key(key: str) -> str:
    """MLflow names take letters, digits, `_ - . / :` and spaces; anything else becomes `_`."""
    return re.sub(r"[^\w\-./: ]", "_", key)


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class MlflowTracker(Tracker):
    """An MLflow run in `tracking_uri`, experiment `experiment`, named after the run. Its id is kept in
    `<run dir>/trackers.json`: a resume logs into the same MLflow run."""

    name = "mlflow"
    PARAM_CHARS = 6000  # MLflow's longest parameter value

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_dir: Path,
        log: Callable[[str], None] = default_log,
    ):
        if tracking_uri.startswith("file:") or "://" not in tracking_uri:
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless told otherwise;
            # it is the store that needs no server and no database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import RunStatus
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.log_line = log
        self.run_id: str | None = None
        previous = read_state(run_dir).get("mlflow")
        if previous and previous.get("tracking_uri") != tracking_uri:
            log(
                f"tracker mlflow: this run logged to {previous.get('tracking_uri')} before; a new run in {tracking_uri}"
            )
        elif previous:
            try:
                self.client.get_run(previous["run_id"])
                self.run_id = previous["run_id"]
                self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            except MlflowException:
                log(
                    f"tracker mlflow: run {previous['run_id']} not found in {tracking_uri}; starting a new one"
                )
        if self.run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run = self.client.create_run(
                experiment_id, run_name=run_name, tags={"rlhf.run_dir": str(Path(run_dir).resolve())}
            )
            self.run_id = run.info.run_id
            write_state(run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": tracking_uri})

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = {mlflow_key(k): str(v)[: self.PARAM_CHARS] for k, v in flatten(config).items()}
        # A resumed run's parameters are there already, and MLflow never changes one.
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        for chunk in _batches(new, 100):
            self.client.log_batch(self.run_id, params=chunk)
        changed = [k for k, v in flat.items() if k in existing and existing[k] != v and k != "resume"]
        if changed:
            self.log_line(
                f"tracker mlflow: {len(changed)} config value(s) differ from the run's first start and "
                f"keep their first value there: {', '.join(changed[:5])}"
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(mlflow_key(k), float(v), now, step) for k, v in metrics.items()]
        for chunk in _batches(rows, 1000):
            self.client.log_batch(self.run_id, metrics=chunk)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(
    logging_cfg, run_dir: Path, run_name: str, log: Callable[[str], None] = default_log
) -> list[Tracker]:
    """The trackers `logging.trackers` names (W&B unless `logging.wandb_mode` is `disabled`). One that
    cannot start prints one line and the run goes on without it."""
    opened: list[Tracker] = []
    mode = wandb_mode(logging_cfg.wandb_mode)
    for name in dict.fromkeys(logging_cfg.trackers):
        if name == "wandb" and mode == "disabled":
            continue
        missing = missing_package(name)
        if missing:
            log(f"tracker {name}: not started: {missing}")
            continue
        try:
            if name == "wandb":
                opened.append(WandbTracker(run_dir, logging_cfg.project, run_name, mode))
            elif name == "tensorboard":
                opened.append(TensorBoardTracker(Path(run_dir) / "tensorboard"))
            elif name == "mlflow":
                uri = logging_cfg.mlflow_tracking_uri or default_mlflow_uri(logging_cfg.output_dir)
                opened.append(MlflowTracker(uri, logging_cfg.project, run_name, run_dir, log))
        except Exception as exc:
            log(f"tracker {name}: not started ({type(exc).__name__}: {_first_line(exc)}); the run goes on")
    return opened


def default_mlflow_uri(output_dir: str) -> str:
    """One local store for every run of `output_dir`, so `mlflow ui` compares them side by side; for
    run directories on a storage URI (which MLflow's file store cannot write), `$RLHF_CACHE/mlruns`
    on the driver's node: set `logging.mlflow_tracking_uri` to share one across nodes."""
    from rlhf.production import storage

    if storage.is_remote(output_dir):
        from rlhf.data.models import cache_root

        return (Path(cache_root()).resolve() / "mlruns").as_uri()
    return (Path(output_dir).resolve() / "mlruns").as_uri()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


class TrackerGroup:
    """Sends each call to every tracker. A failure prints one line naming the tracker; later failures
    of the same kind are counted and reported once at `finish`, not printed each step."""

    def __init__(self, trackers: list[Tracker], log: Callable[[str], None] = default_log):
        self.trackers = list(trackers)
        self.log_line = log
        self.failures: dict[str, int] = {}
        self.last_error: dict[str, str] = {}

    def _call(self, tracker: Tracker, what: str, fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self.failures[tracker.name] = self.failures.get(tracker.name, 0) + 1
            kind = type(exc).__name__
            if self.last_error.get(tracker.name) != kind:
                self.last_error[tracker.name] = kind
                self.log_line(
                    f"tracker {tracker.name}: {what} not logged ({kind}: {_first_line(exc)}); "
                    "the run and the other trackers go on"
                )

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            self._call(tracker, f"step {step}", tracker.log, metrics, step)

    def log_config(self, config: dict[str, Any]) -> None:
        for tracker in self.trackers:
            self._call(tracker, "config", tracker.log_config, config)

    def finish(self) -> None:
        for tracker in self.trackers:
            self._call(tracker, "finish", tracker.finish)
            if self.failures.get(tracker.name, 0) > 1:
                self.log_line(
                    f"tracker {tracker.name}: {self.failures[tracker.name]} calls failed in this run"
                )
        self.trackers = []

    def get(self, name: str) -> Tracker | None:
        return next((t for t in self.trackers if t.name == name), None)
