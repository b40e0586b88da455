r"""GSM8K and MATH layouts (`data.format`): labels extracted at load, auto-detection, bad rows and files,
the hub call, and the shipped fixtures scored by the `math` rule against their own solutions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
from rlhf.reward.math import verify_answer
from transformers import AutoTokenizer

from rlhf.cli.preflight import PreflightError, check_data_columns
from rlhf.config.schema import DataConfig
from rlhf.data.formats import gsm8k_label, math_label, resolve_format
from rlhf.data.prompts import PromptData
from rlhf.types import Sample

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GSM8K = str(FIXTURES / "gsm8k_sample.jsonl")
MATH = str(FIXTURES / "math_sample.jsonl")


@pytest.fixture(scope="module")
def tok(tiny_qwen_dir):
    return AutoTokenizer.from_pretrained(tiny_qwen_dir)


def rows_of(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def all_prompts(data: PromptData) -> dict[int, tuple[str, str]]:
    """{row: (user message, label)} over train and eval prompts."""
    prompts = data.prompts_in_order() + data.eval_prompts()
    return {p.index: (p.metadata["raw_prompt"], p.label) for p in prompts}


@pytest.mark.parametrize(
    "solution, label",
    [
        ("2 + 3 = <<2+3=5>>5\n#### 5", "5"),
        ("Total: 1,080.\n#### 1,080", "1080"),  # commas removed
        ("#### -4", "-4"),
        ("It is 4.5\n#### 4.5", "4.5"),
        ("#### $18", "18"),
        ("no marker, 12", None),
        ("#### twelve", None),
        ("####", None),
        (None, None),
    ],
)
def test_gsm8k_label(solution, label):
    assert gsm8k_label(solution) == label


@pytest.mark.parametrize(
    "solution, label",
    [
        (r"so $x = \boxed{5}$.", "5"),
        (r"first \boxed{1}, finally $\boxed{\frac{\sqrt{3}}{2}}$", r"\frac{\sqrt{3}}{2}"),
        (r"$\boxed{\{-3, 5\}}$", r"\{-3, 5\}"),
        (r"never closed \boxed{\frac{1}{2}", None),
        (r"\boxed{ }", None),
        ("no box: 5", None),
    ],
)
def test_math_label(solution, label):
    assert math_label(solution) == label


def test_gsm8k_fixture_loads_with_labels(tok):
    data = PromptData(DataConfig(source=GSM8K, format="gsm8k", num_eval=4), tok)
    rows = rows_of(GSM8K)
    assert len(data) == len(rows) - 4 and len(data.eval_prompts()) == 4
    got = all_prompts(data)
    assert got[0] == (rows[0]["question"], "47")
    assert got[5][1] == "1080" and rows[5]["answer"].endswith("#### 1,080")  # "1,080" -> "1080"
    assert got[21][1] == "4.5" and got[22][1] == "-4"
    assert len(got) == len(rows)
    assert data.next_batch(1)[0].text.startswith("<|im_start|>user\n")  # the chat template applies


def test_math_fixture_loads_with_labels(tok):
    data = PromptData(DataConfig(source=MATH, format="math", num_eval=2), tok)
    got = all_prompts(data)
    rows = rows_of(MATH)
    assert len(got) == len(rows)
    assert got[0] == (rows[0]["problem"], "30")
    assert got[2][1] == r"\frac{11}{12}"
    assert got[4][1] == r"\{-3, 5\}" and got[6][1] == "(0, 3]"
    assert got[28][1] == "x + 3"


def test_auto_detects_the_layout(tok, tmp_path):
    assert resolve_format("auto", ["question", "answer"]) == "gsm8k"
    assert resolve_format("auto", ["problem", "level", "type", "solution"]) == "math"
    assert resolve_format("auto", ["prompt", "answer"]) == "columns"
    assert resolve_format("columns", ["question", "answer"]) == "columns"
    gsm = PromptData(DataConfig(source=GSM8K, format="auto", num_eval=0), tok)
    assert all_prompts(gsm)[0][1] == "47"
    math = PromptData(DataConfig(source=MATH, format="auto", num_eval=0), tok)
    assert all_prompts(math)[2][1] == r"\frac{11}{12}"
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": f"p{i}", "answer": i} for i in range(3)])
    assert all_prompts(PromptData(DataConfig(source=plain, format="auto", num_eval=0), tok))[2] == ("p2", 2)


def test_parquet_file_in_the_gsm8k_layout(tok, tmp_path):
    path = str(tmp_path / "gsm8k.parquet")
    datasets.Dataset.from_list(rows_of(GSM8K)).to_parquet(path)
    data = PromptData(DataConfig(source=path, format="gsm8k", num_eval=0), tok)
    assert all_prompts(data)[13][1] == "2520"


def test_rows_without_a_label_are_skipped_with_one_warning(tok, tmp_path, caplog):
    rows = rows_of(GSM8K)[:6]
    rows[2]["answer"] = "She forgot the final line."
    rows[4]["answer"] = "#### about seven"
    path = write_jsonl(tmp_path / "some_bad.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="rlhf.data.prompts"):
        data = PromptData(DataConfig(source=path, format="gsm8k", num_eval=0), tok)
    assert sorted(all_prompts(data)) == [0, 1, 3, 5]
    assert data.num_skipped_rows == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"data.source {path}: skipped 2 row(s): 2 with no '#### <number>' in 'answer' (first: row 2)"
    ]


def test_a_file_without_any_label_is_one_line(tok, tmp_path):
    rows = [{"problem": "What is 1+1?", "solution": "It is 2."}] * 3
    path = write_jsonl(tmp_path / "unboxed.jsonl", rows)
    with pytest.raises(ValueError) as err:
        PromptData(DataConfig(source=path, format="math", num_eval=0), tok)
    assert str(err.value) == (
        f"data.source {path!r}: no usable prompt in 3 row(s): 3 with no \\boxed{{...}} in 'solution' "
        "(first: row 0)"
    )


def test_a_missing_column_is_one_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "solution": "#### 1"}] * 3)
    message = (
        f"data.format 'gsm8k' reads columns 'question' and 'answer', but {path} has no 'answer' "
        "(columns: question, solution)"
    )
    with pytest.raises(KeyError) as err:
        PromptData(DataConfig(source=path, format="gsm8k", num_eval=0), tok)
    assert err.value.args[0] == message
    with pytest.raises(PreflightError) as err:  # `rlhf validate` says the same
        check_data_columns(DataConfig(source=path, format="gsm8k"))
    assert str(err.value) == message
    assert check_data_columns(DataConfig(source=GSM8K, format="auto")) == (
        f"data.source {GSM8K}: format gsm8k, prompts from 'question', labels extracted from 'answer'"
    )


def test_hub_ids_go_to_load_dataset_with_the_subset(tok, monkeypatch):
    """The hub is unreachable here: record the call and hand back the fixture's rows instead."""
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(rows_of(GSM8K))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = DataConfig(source="openai/gsm8k", subset="main", split="train", format="gsm8k", num_eval=0)
    data = PromptData(cfg, tok)
    assert calls == [(("openai/gsm8k", "main"), {"split": "train"})]
    assert all_prompts(data)[0][1] == "47"


@pytest.mark.parametrize("path, key", [(GSM8K, "answer"), (MATH, "solution")], ids=["gsm8k", "math"])
def test_every_fixture_solution_scores_one_against_its_label(path, key):
    """The labels and the `math` rule agree: a worked solution from the file is a correct response."""
    label_of = gsm8k_label if key == "answer" else math_label
    for i, row in enumerate(rows_of(path)):
        assert verify_answer(row[key], label_of(row[key])) == 1.0, f"row {i}"


def test_an_eval_set_file_in_the_math_layout_is_checked_by_the_math_rule(tok):
    from rlhf.config.loader import from_dict
    from rlhf.evaluation.sets import build_sets, score, summarize

    cfg = from_dict(
        {
            "data": {"source": GSM8K, "format": "auto", "num_eval": 4},
            "evaluation": {
                "sets": [{"name": "math_file", "source": MATH, "reward": "math", "num_prompts": 3}]
            },
        }
    )
    (es,) = build_sets(cfg, tok)
    assert [p.label for p in es.prompts] == ["30", "5", r"\frac{11}{12}"]
    responses = [r"\boxed{30}", "So y = 5.", r"\boxed{0.9}"]  # right, right (last number), wrong
    samples = [
        Sample(group=i, prompt=p, response_ids=[1], response_text=r, logprobs=None, finish_reason="stop")
        for i, (p, r) in enumerate(zip(es.prompts, responses))
    ]
    score(es, samples)
    assert [s.reward for s in samples] == [1.0, 1.0, 0.0]
    assert summarize(es, samples, 1.0)["accuracy"] == pytest.approx(2 / 3)


def test_a_format_with_a_built_in_task_is_a_config_error():
    from rlhf.config.loader import ConfigError, from_dict

    with pytest.raises(ConfigError, match="data.format: applies to data files and hub datasets"):
        from_dict({"data": {"source": "builtin:arithmetic", "format": "gsm8k"}})
    with pytest.raises(ConfigError, match="data.format: must be one of 'columns', 'auto', 'gsm8k', 'math'"):
        from_dict({"data": {"source": GSM8K, "format": "gsm"}})
    # a built-in eval set beside GSM8K training data is fine: the format is the training data's
    cfg = from_dict(
        {
            "data": {"source": GSM8K, "format": "gsm8k"},
            "evaluation": {"sets": [{"source": "builtin:arithmetic"}]},
        }
    )
    assert cfg.data.format == "gsm8k"
