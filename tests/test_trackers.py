"""The experiment trackers (rlhf/production/trackers.py) with the real packages: TensorBoard event
files read back by TensorBoard's own reader, an MLflow file store read back by MlflowClient, a
resume that appends, a failing tracker that leaves the others logging, and a missing package as one
line."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from rlhf.config.loader import ConfigError, from_dict
from rlhf.production.trackers import (
    STATE_FILE,
    MlflowTracker,
    TensorBoardTracker,
    TrackerGroup,
    flatten,
    open_trackers,
)

CONFIG = {"seed": 3, "algorithm": {"name": "grpo", "kl_coef": 0.01}, "logging": {"trackers": ["mlflow"]}}
FLAT = {"seed": 3, "algorithm.name": "grpo", "algorithm.kl_coef": 0.01, "logging.trackers": '["mlflow"]'}


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) pairs as TensorBoard shows them (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_hparams(logdir: Path) -> dict[str, object]:
    """The hyperparameters the HPARAMS tab shows for the run (from its session-start summary)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    out: dict[str, object] = {}
    for key, value in data.session_start_info.hparams.items():
        out[key] = getattr(value, value.WhichOneof("kind"))
    return out


def mlflow_history(store: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_flatten_config_to_dotted_scalars():
    assert flatten(CONFIG) == FLAT
    assert flatten({"a": {}, "b": None, "c": [{"x": 1}], "d": True}) == {
        "a": "{}",
        "b": "null",
        "c": '[{"x": 1}]',
        "d": True,
    }


def test_tensorboard_scalars_config_and_resume(tmp_path):
    logdir = tmp_path / "run" / "tensorboard"
    tracker = TensorBoardTracker(logdir)
    tracker.log_config(CONFIG)
    for step in range(4):
        tracker.log({"reward/mean": step / 10, "train/kl": 0.5 + step}, step)
    tracker.finish()
    assert tensorboard_scalars(logdir) == {
        "reward/mean": [(0, 0.0), (1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))],
        "train/kl": [(0, 0.5), (1, 1.5), (2, 2.5), (3, 3.5)],
    }
    assert tensorboard_hparams(logdir) == pytest.approx({**FLAT, "seed": 3.0})

    # Resumed from a checkpoint at step 1: steps 2-3 of the first attempt are replaced, not doubled.
    resumed = TensorBoardTracker(logdir)
    resumed.log_config(CONFIG)
    for step in (2, 3, 4):
        resumed.log({"reward/mean": 1.0 + step}, step)
    resumed.finish()
    assert tensorboard_scalars(logdir)["reward/mean"] == [
        (0, 0.0),
        (1, pytest.approx(0.1)),
        (2, 3.0),
        (3, 4.0),
        (4, 5.0),
    ]


def test_mlflow_metrics_params_and_resume_into_the_same_run(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    store, run_dir = tmp_path / "mlruns", tmp_path / "run"
    run_dir.mkdir()
    tracker = MlflowTracker(store.as_uri(), "lab", "run-a", run_dir)
    tracker.log_config(CONFIG)
    tracker.log({"reward/mean": 0.25, "eval/held_out/pass@1": 0.5}, 1)
    tracker.log({"reward/mean": 0.5}, 2)
    tracker.finish()

    run_id = json.loads((run_dir / STATE_FILE).read_text())["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=store.as_uri())
    run = client.get_run(run_id)
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "lab"
    assert run.data.params == {k: str(v) for k, v in FLAT.items()}
    assert mlflow_history(store, run_id, "reward/mean") == [(1, 0.25), (2, 0.5)]
    assert mlflow_history(store, run_id, "eval/held_out/pass_1") == [(1, 0.5)]  # `@` is not allowed

    # A resume finds the run id in the run directory and appends; a changed config value keeps its
    # first value (MLflow parameters never change) and says so in one line.
    resumed = MlflowTracker(store.as_uri(), "lab", "run-a", run_dir)
    assert resumed.run_id == run_id
    resumed.log_config({**CONFIG, "seed": 4})
    resumed.log({"reward/mean": 0.75}, 3)
    resumed.finish()
    assert mlflow_history(store, run_id, "reward/mean") == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert client.get_run(run_id).data.params["seed"] == "3"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "[rlhf] tracker mlflow: 1 config value(s) differ from the run's first start and keep their first value there: seed"
    ]


def test_a_failing_tracker_does_not_stop_the_others(tmp_path, capsys):
    """The MLflow store disappears after the run started: each step fails there (one line, then a
    count at the end) and still reaches TensorBoard."""
    store, run_dir = tmp_path / "mlruns", tmp_path / "run"
    run_dir.mkdir()
    mlflow_tracker = MlflowTracker(store.as_uri(), "lab", "run-b", run_dir)
    group = TrackerGroup([mlflow_tracker, TensorBoardTracker(run_dir / "tensorboard")])
    group.log_config(CONFIG)
    group.log({"reward/mean": 0.5}, 1)
    shutil.rmtree(store)
    for step in (2, 3, 4):
        group.log({"reward/mean": step / 4}, step)
    group.finish()
    assert tensorboard_scalars(run_dir / "tensorboard")["reward/mean"] == [
        (1, 0.5),
        (2, 0.5),
        (3, 0.75),
        (4, 1.0),
    ]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("[rlhf] tracker mlflow: step 2 not logged (")
    assert err[0].endswith(f"'{store}' does not exist.); the run and the other trackers go on")
    assert err[1] == "[rlhf] tracker mlflow: 4 calls failed in this run"  # steps 2-4 and finish


def test_missing_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # how Python marks a module that cannot import
    with pytest.raises(ConfigError) as err:
        from_dict({"logging": {"trackers": ["tensorboard", "mlflow"]}})
    assert str(err.value) == (
        "<dict>: logging.trackers: mlflow needs the mlflow package, which is not installed: "
        "pip install 'rlhf[mlflow]' (or mlflow-skinny) (got ['tensorboard', 'mlflow'])"
    )
    # A config that skipped validation: the run starts without that tracker, after one line.
    cfg = from_dict({"logging": {"trackers": ["tensorboard"], "output_dir": str(tmp_path)}}).logging
    cfg.trackers = ["mlflow", "tensorboard"]
    opened = open_trackers(cfg, tmp_path, "run-c")
    assert [t.name for t in opened] == ["tensorboard"]
    assert capsys.readouterr().err.splitlines() == [
        "[rlhf] tracker mlflow: not started: needs the mlflow package, which is not installed: "
        "pip install 'rlhf[mlflow]' (or mlflow-skinny)"
    ]
    opened[0].finish()


def test_default_trackers_keep_wandb_and_disabled_turns_it_off(tmp_path):
    cfg = from_dict({"logging": {"output_dir": str(tmp_path)}}).logging
    assert cfg.trackers == ["wandb"]
    cfg.wandb_mode = "disabled"
    assert open_trackers(cfg, tmp_path, "run-d") == []


def test_wandb_goes_through_the_same_interface(tmp_path):
    """Offline W&B: the config as the run's config, each step's row with its step (a late row too)."""
    from test_evaluation import wandb_records

    from rlhf.production.trackers import WandbTracker

    tracker = WandbTracker(tmp_path, "lab", "run-e", "offline")
    group = TrackerGroup([tracker])
    group.log_config(CONFIG)
    group.log({"reward/mean": 0.25}, 1)
    group.log({"reward/mean": 0.5}, 2)
    group.log({"eval/reward_mean": 0.75}, 1)  # an evaluation on its own engines, arriving late
    group.finish()
    # W&B's service can still be writing the offline file when `finish` returns: wait for its end.
    deadline = time.monotonic() + 60
    records = wandb_records(tmp_path)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, "the offline W&B file never got its exit record"
        time.sleep(0.2)
        records = wandb_records(tmp_path)
    rows = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    history = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    assert history == [
        {"reward/mean": 0.25, "step": 1},
        {"reward/mean": 0.5, "step": 2},
        {"eval/reward_mean": 0.75, "step": 1},
    ]
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in r.config.update})
    assert config["seed"] == 3 and config["algorithm"] == {"name": "grpo", "kl_coef": 0.01}


def test_default_mlflow_store_is_local_even_for_run_directories_on_a_storage_uri(tmp_path, monkeypatch):
    from rlhf.production.trackers import default_mlflow_uri

    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "cache"))
    assert default_mlflow_uri(str(tmp_path / "runs")) == (tmp_path / "runs" / "mlruns").as_uri()
    assert default_mlflow_uri("s3://bucket/runs").startswith("file://")  # MLflow's file store is local
