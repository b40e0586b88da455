"""Every shipped recipe validates; every recipe whose loop differs runs 2 steps on the CPU with a tiny model.

The recipes that differ from `grpo.yaml` only in the advantage estimator or the loss aggregation
(`dr_grpo`, `rloo`, `reinforce_pp`, `gspo`) and `calculator_tool_one_example` (the environment of
`calculator_tool` with another prompt file) validate here and are not run again: their estimators
and losses have hand-computed unit tests (tests/test_advantages.py, tests/test_losses.py), and
tests/test_registries.py trains a step with an estimator plugged in by name. `lora` (the quickstart
with LoRA adapters) runs in tests/test_loop.py, which trains it with adapter pushes and resumes it.
`gsm8k` and `math` (hub datasets) run in tests/test_math_recipes.py on a local GSM8K-layout file;
`code` is the quickstart's loop with another built-in task and the `code_tests` reward
(tests/test_code_tests_reward.py scores its problems; tests/test_humaneval.py runs the reward with engines).
`async` runs in tests/test_async.py (two engines, one step off, resumed), `guess_number` in
tests/test_agent_loop.py; `tis` is `grpo` with TIS's cap, whose weights have hand-computed tests in
tests/test_losses.py and whose engine logprobs the asynchronous run's decoupled PPO uses too.
`grpo` is the quickstart's loop with a reference actor, which `ppo`'s run starts too, and the KL
term in the loss, which the LoRA resume run in tests/test_loop.py trains with.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config.loader import load_config
from rlhf.production.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "configs").glob("*.yaml"))
SAME_LOOP_AS_RUN = {
    "quickstart",
    "dr_grpo",
    "rloo",
    "reinforce_pp",
    "gspo",
    "calculator_tool_one_example",
    "lora",
    "gsm8k",
    "math",
    "code",
    "tis",
    "async",
    "guess_number",
    "grpo",
}
ALGORITHM_RECIPES = [p for p in RECIPES if p.stem not in SAME_LOOP_AS_RUN]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.steps >= 1


@pytest.mark.slow
@pytest.mark.parametrize("path", ALGORITHM_RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_two_steps(path, tiny_model_dir, tmp_path):
    from rlhf.loop.driver import train

    overrides = [
        f"model.path={tiny_model_dir}",
        "steps=2",
        "data.num_eval=0",
        "evaluation.sets=[]",  # no held-out prompts, so no evaluation (a recipe's own sets need them)
        "rollout.prompts_per_step=2",
        "rollout.sampling.n=4",
        "rollout.sampling.max_new_tokens=12",
        "rollout.max_model_len=256",
        "trainer.micro_batch_tokens=256",
        "logging.wandb_mode=disabled",
        f"logging.output_dir={tmp_path}",
        "logging.plot=false",
        f"logging.run_name={path.stem}",
    ]
    run_dir = train(load_config(path, overrides))
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["train/grad_norm"] >= 0 for r in rows)
