"""Multi-turn environments without an engine: the interface, the loader, config checks, rewards."""

from __future__ import annotations

from pathlib import Path

import pytest
from rlhf.reward.rules import RewardError, RuleReward
from rlhf.rollout.environments import (
    EnvError,
    Environment,
    StepResult,
    check_environment_args,
    resolve_environment_class,
)
from rlhf.rollout.environments.guess_number import GuessNumberEnv

from rlhf.config.loader import ConfigError, load_config
from rlhf.tasks import get_task
from rlhf.types import Prompt, Sample

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
ENV_OVERRIDES = ["rollout.environment.name=guess_number", "reward.sources=[{kind: rule, name: env}]"]


class CountingEnv(Environment):
    """Used by name from the config tests (tests.test_environments:CountingEnv)."""

    def __init__(self, limit: int = 3):
        self.limit = limit

    def step(self, assistant_text):
        return [{"role": "user", "content": "again"}], 0.5, False, {}

    def final_reward(self):
        return 2.0


def test_step_result_accepts_tuples_and_rejects_junk():
    r = StepResult.of(([{"role": "user", "content": "hi"}], 1, False, None))
    assert r == StepResult([{"role": "user", "content": "hi"}], 1.0, False, {})
    for junk, words in [
        ("text", r"returned str; expected \(messages, reward, done, info\)"),
        (([{"content": "no role"}], 0.0, False, {}), "chat messages"),
        (([], "1", False, {}), "reward must be a number"),
        (([], float("nan"), False, {}), "finite"),
    ]:
        with pytest.raises(EnvError, match=words):
            StepResult.of(junk)


def test_resolve_environment_class_by_builtin_and_dotted_path():
    assert resolve_environment_class("guess_number") is GuessNumberEnv
    # (pytest imports this file under another module name: compare by name)
    assert resolve_environment_class("tests.test_environments:CountingEnv").__qualname__ == "CountingEnv"
    assert resolve_environment_class("tests.test_environments.CountingEnv").__qualname__ == "CountingEnv"
    with pytest.raises(EnvError, match="cannot import module 'nowhere_pkg'"):
        resolve_environment_class("nowhere_pkg:Env")
    with pytest.raises(EnvError, match="has no attribute 'Missing'"):
        resolve_environment_class("tests.test_environments:Missing")
    with pytest.raises(EnvError, match="not a subclass"):
        resolve_environment_class("tests.test_environments:test_step_result_accepts_tuples_and_rejects_junk")
    check_environment_args(CountingEnv, {"limit": 2})
    with pytest.raises(EnvError, match="unexpected keyword argument 'limt'"):
        check_environment_args(CountingEnv, {"limt": 2})


def test_config_checks_name_args_and_the_env_reward():
    cfg = load_config(QUICKSTART, [*ENV_OVERRIDES, "data.source=builtin:guess_number"])
    assert cfg.rollout.environment.name == "guess_number" and cfg.rollout.environment.max_turns == 4
    cases = [
        (["rollout.environment.name=nowhere_pkg:Env"], "rollout.environment.name: cannot import"),
        (
            ["rollout.environment.args={wins: 1}"],
            "rollout.environment.args: GuessNumberEnv: got an unexpected",
        ),
        (["rollout.environment.max_turns=0"], "rollout.environment.max_turns: must be >= 1"),
        (["rollout.environment.tools=[shell]"], "rollout.environment.tools[0]: unknown tool"),
        (["rollout.environment.tools=[nowhere_pkg:fn]"], "rollout.environment.tools[0]: cannot import"),
        (["reward.sources=[{kind: rule, name: task}]"], "reward.sources: the environment's rewards would be"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(QUICKSTART, [*ENV_OVERRIDES, *extra])
    with pytest.raises(ConfigError, match="rule 'env' needs a multi-turn environment"):
        load_config(QUICKSTART, ["reward.sources=[{kind: rule, name: env}]"])


def _sample(episode):
    prompt = Prompt(index=0, text="p", token_ids=[1], label=3)
    return Sample(0, prompt, [5, 6], "r", None, "stop", episode=episode)


def test_env_rule_reads_the_episode_and_combines_with_other_sources():
    from rlhf.reward.pipeline import RewardPipeline

    from rlhf.config.schema import RewardConfig, RewardSourceConfig

    rule = RuleReward.from_config("env")
    assert rule(_sample({"reward": 1.5})) == 1.5
    with pytest.raises(ValueError, match="set rollout.environment.name"):
        rule(_sample(None))
    with pytest.raises(ValueError, match="the episode failed: boom"):
        rule(_sample({"reward": 0.0, "error": "boom"}))
    with pytest.raises(RewardError, match="takes no args"):
        RuleReward.from_config("env", {"x": 1})
    # the sample reward is the weighted sum of the env reward and every other source
    cfg = RewardConfig(
        sources=[RewardSourceConfig(name="env"), RewardSourceConfig(name="task", weight=0.5)], on_error="zero"
    )
    pipeline = RewardPipeline(cfg, task=get_task("guess_number"))
    samples = [_sample({"reward": 0.8}), _sample({"reward": 0.0, "error": "step timed out"})]
    samples[0].response_text = "I guess 3"
    pipeline.score(samples)
    assert samples[0].reward == pytest.approx(0.8 + 0.5 * 1.0)
    assert samples[0].reward_parts == {"env": 0.8, "task": 1.0}
    assert samples[1].reward_parts["env"] == 0.0 and pipeline.last_stats()["reward/errors"] == 1.0


def test_guess_number_task_and_env():
    task = get_task("guess_number")
    rows = task.generate(50, seed=1, max_number=10)
    assert len({r["prompt"] for r in rows}) == 50 and all(1 <= r["answer"] <= 10 for r in rows)
    assert task.check("My guess: 7", 7) == 1.0 and task.check("7 or 8", 7) == 0.0
    env = GuessNumberEnv(win_reward=1.0, turn_cost=0.1)
    assert env.reset(Prompt(index=0, text="", token_ids=[1], label=7)) is None
    higher = StepResult([{"role": "user", "content": "Higher."}], -0.1, False, {"success": False})
    assert env.step("5") == higher
    assert env.step("I think 9").messages == [{"role": "user", "content": "Lower."}]
    assert env.step("no idea").messages[0]["content"].startswith("Please answer")
    found = env.step("7")
    assert found.done and found.reward == 1.0 and found.info["guesses"] == 4 and found.info["success"]
    with pytest.raises(ValueError, match="expected the secret integer"):
        GuessNumberEnv().reset(Prompt(index=3, text="", token_ids=[1], label="x"))
    # a demonstration game (few-shot) and a system prompt come before the prompt's question
    demo = [{"role": "user", "content": "Guess."}, {"role": "assistant", "content": "4"}]
    env = GuessNumberEnv(system_prompt="Play.", examples=demo)
    messages = env.reset(Prompt(index=0, text="", token_ids=[1], label=2, metadata={"raw_prompt": "Game 1."}))
    assert messages == [{"role": "system", "content": "Play."}, *demo, {"role": "user", "content": "Game 1."}]
    with pytest.raises(EnvError, match="args.examples"):
        check_environment_args(GuessNumberEnv, {"examples": [{"content": "4"}]})
