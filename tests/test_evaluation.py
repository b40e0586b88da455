"""Evaluation sets: pass@k, per-set figures and config errors (unit); a run whose evaluation has its
own engines, monitoring, W&B artifacts and `rlhf eval` on its checkpoint (slow, real Ray and vLLM)."""

from __future__ import annotations

import math

import pytest

from rlhf.config import EvalSetConfig, SamplingConfig
from rlhf.config_loader import ConfigError, from_dict
from rlhf.evaluation import EvalSet, Evaluation, configured_sets, pass_at_k, summarize
from rlhf.types import Prompt, Sample


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert pass_at_k(5, 2, 4) == 1.0  # fewer wrong samples than k: some draw always solves it


def sample(group: int, reward: float, tokens: int = 3, finish: str = "stop") -> Sample:
    prompt = Prompt(index=group, text="q", token_ids=[1], label="1", metadata={})
    s = Sample(
        group=group,
        prompt=prompt,
        response_ids=[5] * tokens,
        response_text="a",
        logprobs=None,
        finish_reason=finish,
    )
    s.reward, s.reward_parts = reward, {"task": reward}
    return s


def test_summary_of_a_set():
    es = EvalSet(
        EvalSetConfig(name="a", pass_k=[1, 2], samples_per_prompt=2), [], SamplingConfig(temperature=0.7)
    )
    samples = [sample(0, 1.0), sample(0, 0.0), sample(1, 0.0, tokens=5, finish="length"), sample(1, 0.0)]
    out = summarize(es, samples, seconds=1.5)
    assert out["reward_mean"] == 0.25 and out["solved_frac"] == 0.25 and out["accuracy"] == 0.25
    assert out["pass@1"] == pytest.approx(0.25) and out["pass@2"] == pytest.approx(0.5)
    assert out["prompts"] == 2 and out["samples"] == 4 and out["temperature"] == 0.7
    assert out["truncated_frac"] == 0.25 and out["length_mean"] == 3.5
    metrics = Evaluation(7, {"a": out, "b": {**out, "reward_mean": 0.9}}).metrics()
    assert metrics["eval/a/pass@2"] == pytest.approx(0.5) and metrics["eval/b/reward_mean"] == 0.9
    assert metrics["eval/reward_mean"] == 0.25 and metrics["eval/step"] == 7  # the first set is the headline


def test_default_set_is_the_held_out_prompts():
    assert [s.name for s in configured_sets(from_dict({}))] == ["held_out"]
    assert configured_sets(from_dict({"data": {"num_eval": 0}})) == []
    cfg = from_dict({"evaluation": {"sets": [{"name": "x", "source": "builtin:countdown"}]}})
    assert [s.source for s in configured_sets(cfg)] == ["builtin:countdown"]


@pytest.mark.parametrize(
    "sets, message",
    [
        ([{"name": "a/b"}], "evaluation.sets[0].name: must be a non-empty name"),
        ([{"source": "missing.jsonl"}], "evaluation.sets[0].source: local data file not found"),
        ([{"reward": "nomodule:fn"}], "evaluation.sets[0].reward: cannot import module"),
        (
            [{"samples_per_prompt": 2, "pass_k": [4]}],
            "evaluation.sets[0].pass_k: each k must be in 1..samples",
        ),
        ([{"max_new_tokens": 5000}], "evaluation.sets[0].max_new_tokens: must be in 1..1023"),
    ],
)
def test_bad_eval_sets_are_one_line(sets, message):
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")
    ):
        from_dict({"evaluation": {"sets": sets}})
