"""The GSM8K and MATH recipes: they validate as shipped and point at the real hub datasets; the GSM8K
recipe trains on the written GSM8K-layout fixture with the tiny model and the `math` reward (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config.loader import load_config
from rlhf.production.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@pytest.mark.parametrize(
    "recipe, source, subset, fmt",
    [
        ("gsm8k", "openai/gsm8k", "main", "gsm8k"),
        ("math", "DigitalLearningGmbH/MATH-lighteval", "default", "math"),
    ],
)
def test_recipes_as_shipped(recipe, source, subset, fmt):
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml")
    assert (cfg.data.source, cfg.data.subset, cfg.data.format) == (source, subset, fmt)
    assert cfg.model.path == "Qwen/Qwen2.5-1.5B-Instruct" and cfg.data.system_prompt == SYSTEM_PROMPT
    assert [(s.kind, s.name) for s in cfg.reward.sources] == [("rule", "math")]
    assert cfg.rollout.sampling.max_new_tokens == 1024 and cfg.placement.colocate == [["rollout", "learner"]]
    assert cfg.data.max_prompt_tokens + cfg.rollout.sampling.max_new_tokens <= cfg.rollout.max_model_len


@pytest.mark.slow
def test_gsm8k_recipe_trains_on_the_fixture(tiny_model_dir, tmp_path):
    from rlhf.loop.driver import train

    overrides = [
        f"model.path={tiny_model_dir}",
        f"data.source={REPO / 'tests' / 'fixtures' / 'gsm8k_sample.jsonl'}",
        "data.subset=null",
        "data.num_eval=4",
        "data.max_prompt_tokens=400",
        "steps=2",
        "eval_every=0",
        "rollout.prompts_per_step=2",
        "rollout.sampling.n=4",
        "rollout.sampling.max_new_tokens=12",
        "rollout.max_model_len=512",
        "trainer.micro_batch_tokens=512",
        "placement.colocate=[]",
        "checkpoint.every=0",
        "logging.wandb_mode=disabled",
        "logging.plot=false",
        f"logging.output_dir={tmp_path}",
    ]
    run_dir = train(load_config(REPO / "configs" / "gsm8k.yaml", overrides))
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # 8 samples a step, each scored 0 or 1; unreadable ones counted, never raised
        assert r["reward/math_mean"] in {k / 8 for k in range(9)}
        assert 0 <= r["reward/errors"] <= 8
    evals = [r for r in rows if "eval/held_out/accuracy" in r]  # the held-out set is scored by `math`
    assert [r["step"] for r in evals] == [0, 2]
    assert all(r["eval/held_out/prompts"] == 4 for r in evals)
