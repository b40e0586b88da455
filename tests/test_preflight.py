"""`rlhf validate`'s checks of a run's inputs (rlhf/cli/preflight.py): data columns, the model directory,
what vLLM on this device runs; each problem one line naming the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlhf.cli.main import EXIT_CONFIG, main
from rlhf.cli.preflight import (
    PreflightError,
    check_data_columns,
    check_model,
    check_run_inputs,
    local_model_dir,
)
from rlhf.config.schema import DataConfig, RunConfig

REPO = Path(__file__).resolve().parents[1]


def data(path: Path, **kw) -> DataConfig:
    return DataConfig(source=str(path), **kw)


def test_data_columns_of_each_file_kind(tmp_path):
    rows = [{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": "4"}]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PreflightError) as err:
        check_data_columns(data(jsonl))  # input_key defaults to "prompt"
    assert str(err.value) == f"data.input_key 'prompt' is not a column of {jsonl} (columns: question, answer)"
    assert check_data_columns(data(jsonl, input_key="question")) == (
        f"data.source {jsonl}: input_key 'question', label_key 'answer'"
    )
    # no label column: fine without a task checker, an error with one
    assert "prompts get no label" in check_data_columns(
        data(jsonl, input_key="question", label_key="solution")
    )
    with pytest.raises(PreflightError, match=r"^data.label_key 'solution' .*task 'arithmetic' needs labels$"):
        check_data_columns(
            data(jsonl, input_key="question", label_key="solution", task_args={"task": "arithmetic"})
        )
    as_array = tmp_path / "q.json"
    as_array.write_text(json.dumps(rows))
    csv = tmp_path / "q.csv"
    csv.write_text("question,answer\n1+1,2\n")
    import datasets

    parquet = tmp_path / "q.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    for path in (as_array, csv, parquet):
        assert check_data_columns(data(path, input_key="question")).endswith("label_key 'answer'"), path
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(PreflightError, match=r"^data.source .*broken.jsonl': the first line is not JSON"):
        check_data_columns(data(broken))
    assert "built-in task" in check_data_columns(DataConfig(source="builtin:arithmetic"))


def test_model_directory_checks(tiny_model_dir, tmp_path):
    assert check_model(tiny_model_dir, "auto", "cpu").endswith("head size and float32 on cpu: ok")
    # no config.json
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightError, match=r"has no config.json"):
        local_model_dir(str(tmp_path / "empty"))
    # a tokenizer that does not load
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for f in broken.glob("tokenizer*"):
        f.write_text("{broken")
    with pytest.raises(PreflightError, match=r"^model.path .*broken': the tokenizer does not load"):
        check_model(str(broken), "auto", "cpu")
    # a head size vLLM's CPU attention cannot run
    small = tmp_path / "small_heads"
    shutil.copytree(tiny_model_dir, small)
    config = json.loads((small / "config.json").read_text())
    config["num_attention_heads"] = config["hidden_size"] // 16
    config.pop("head_dim", None)
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(PreflightError, match=r"head size 16 .*needs at least 32"):
        check_model(str(small), "auto", "cpu")


def test_a_built_in_model_not_yet_built_is_said_so(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    cfg = RunConfig()
    cfg.model.path = "smollm2-135m-instruct"
    assert local_model_dir(cfg.model.path) is None
    lines = check_run_inputs(cfg, "cpu")
    assert (
        lines[0]
        == "model.path 'smollm2-135m-instruct': not on this machine yet (built or downloaded at the first run)"
    )


def test_cli_validate_reports_a_bad_data_column_in_one_line(tmp_path, capsys, tiny_model_dir):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    args = ["validate", str(REPO / "configs/quickstart.yaml"), f"model.path={tiny_model_dir}"]
    assert main([*args, f"data.source={questions}"]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1]
        == f"error: data.input_key 'prompt' is not a column of {questions} (columns: question, answer)"
    )
    assert main([*args, f"data.source={questions}", "data.input_key=question"]) == 0
    err = capsys.readouterr().err
    assert f"checked: model.path {tiny_model_dir}: config, tokenizer" in err
    assert f"checked: data.source {questions}: input_key 'question', label_key 'answer'" in err
