"""The documented own-data example (a JSONL file of questions + a user reward function) runs as
shipped, on the tiny model: the file, the column mapping, the dotted-path reward and the held-out split."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config.loader import load_config
from rlhf.production.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own_data"


def test_the_user_reward_function():
    import importlib.util

    spec = importlib.util.spec_from_file_location("own_data_reward", EXAMPLE / "own_data_reward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = module.last_number_matches
    assert fn("q", "There are 1,440 minutes, so 1440", "1440") == 1.0
    assert fn("q", "180 or maybe 190", "180") == 0.0  # the last number counts
    assert fn("q", "no idea", "7") == 0.0


@pytest.mark.slow
def test_own_data_example_runs(tiny_model_dir, tmp_path, monkeypatch):
    from rlhf.loop.driver import train

    monkeypatch.syspath_prepend(str(EXAMPLE))  # the docs say: PYTHONPATH=examples/own_data
    overrides = [
        f"model.path={tiny_model_dir}",
        f"data.source={EXAMPLE / 'questions.jsonl'}",
        "data.num_eval=4",
        "steps=2",
        "eval_every=0",
        "rollout.prompts_per_step=2",
        "rollout.sampling.n=2",
        "rollout.sampling.max_new_tokens=8",
        "rollout.max_model_len=256",
        "trainer.micro_batch_tokens=256",
        "logging.wandb_mode=disabled",
        "logging.plot=false",
        f"logging.output_dir={tmp_path}",
    ]
    cfg = load_config(EXAMPLE / "config.yaml", overrides)
    assert (
        cfg.data.input_key == "question"
        and cfg.reward.sources[0].name == "own_data_reward:last_number_matches"
    )
    rows = read_metrics(train(cfg) / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/reward_mean" in rows[0] and "reward/own_data_reward:last_number_matches_mean" in rows[1]
