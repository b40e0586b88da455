r"""Rule `math`: answers extracted from responses and checked with math-verify, where a regex fails.

Every expectation below was checked by hand against what math-verify 0.9 returns. Where math-verify
alone gets a case wrong and the rule fixes the input first, the case says so.
"""

from __future__ import annotations

import threading
import time

import pytest
from rlhf.reward import RewardError, RewardPipeline
from rlhf.reward.math import MathRule, extract_answer, verify_answer
from rlhf.reward.rules import NoAnswer, RuleReward

from rlhf.config.loader import ConfigError, from_dict
from rlhf.config.schema import RewardConfig, RewardSourceConfig
from rlhf.types import Prompt, Sample


def make_sample(response: str, label, group: int = 0) -> Sample:
    return Sample(
        group=group,
        prompt=Prompt(index=group, text="q", token_ids=[1], label=label),
        response_ids=[2],
        response_text=response,
        logprobs=None,
        finish_reason="stop",
    )


@pytest.fixture(scope="module")
def rule() -> RuleReward:
    """The rule as the pipeline builds it: under a time limit, so each call runs in a worker thread."""
    return RuleReward.from_config("math", {}, None, timeout_s=10.0)


EQUAL = [
    # (response, label): the same value written differently
    ("The answer is 0.5", "1/2"),
    (r"So the probability is \boxed{\frac{1}{2}}.", "0.5"),
    (r"\boxed{1/2}", r"\frac{1}{2}"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    ("#### 3.0", "3"),
    (r"\boxed{3}", "3.0"),
    (r"\boxed{\{2,1\}}", r"\{1,2\}"),  # sets: order does not matter
    (r"\boxed{(0, 1]}", "(0,1]"),  # a half-open interval
    (r"\boxed{5 \text{ cm}}", "5"),  # units are dropped
    ("The answer is 5 cm.", "5"),
    ("#### 1,000", "1000"),  # thousands separators
    (r"\boxed{1,000}", "1000"),
    (r"\boxed{1{,}000}", "1000"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{1}{2}\sqrt{3}"),
    (r"\boxed{\dfrac{\sqrt{3}}{2}}", r"\frac{\sqrt 3}{2}"),
    (r"\boxed{(x+1)^2}", "x^2+2x+1"),
    (r"Nested: \boxed{\frac{\frac{1}{2}}{2}} and done", "1/4"),  # \boxed{} with nested braces
    ("First \\boxed{7}, then on reflection \\boxed{8}", "8"),  # the last \boxed{} counts
    ("The answer is: **42**.", "42"),  # markdown bold
    (r"The final answer is $\frac{3}{4}$.", "0.75"),
    (r"The final answer is \(\frac{3}{4}\)", "0.75"),
    ("#### $18", "18"),
    ("She has 12 apples, then buys 30 more, so 42", "42"),  # no marker: the last number
    (r"\boxed{x = 3}", "3"),  # an assignment to the variable asked for
    # math-verify alone reads these wrong; the rule rewrites them first:
    ("The answer is 18 dollars.", "18"),  # plain "18 dollars" parses as 18*d*o*l*l*a*r*s
    (r"\boxed{1\,000}", "1000"),  # LaTeX's thin-space thousands separator parses as 1*0
    # math-verify's leniency, kept as is: a percentage equals both its number and its fraction
    (r"\boxed{12\%}", "12"),
    (r"\boxed{12\%}", "0.12"),
]

DIFFERENT = [
    (r"\boxed{[0,1]}", "(0,1]"),  # closed vs half-open interval
    (r"\boxed{(0,1)}", "(0,1]"),
    (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}"),
    ("#### 41", "42"),
    ("The answer is 7.", "8"),
    (r"\boxed{(2,1)}", "(1,2)"),  # tuples (and open intervals) are ordered
    (r"\boxed{3.14159}", r"\pi"),  # a rounded value is not pi
    (r"\boxed{10.0000001}", "10"),
    (r"\boxed{@@@}", "3"),  # nonsense inside a box: read as text, and it is not "3"
    (r"\boxed{\frac{1}{0}}", "1"),
]


@pytest.mark.parametrize("response, label", EQUAL)
def test_equal_answers_score_one(rule, response, label):
    scores, errors = rule.score([make_sample(response, label)], on_error="raise")
    assert (scores, errors) == ([1.0], 0)


@pytest.mark.parametrize("response, label", DIFFERENT)
def test_wrong_answers_score_zero_without_an_error(rule, response, label):
    scores, errors = rule.score([make_sample(response, label)], on_error="raise")
    assert (scores, errors) == ([0.0], 0)


@pytest.mark.parametrize(
    "response, where",
    [
        (r"\boxed{\frac{1}{2}} and \boxed{3", "closed"),
        ("[[[ \\boxed{{{{ ", "closed"),
        ("", "no \\boxed"),
        ("I do not know.", "no \\boxed"),
        ("blah " * 200_000, "no \\boxed"),  # 1 MB of text without an answer
        ("\\boxed{" + "9" * 5000 + "}", "5000 characters"),
        (r"\boxed{}", "empty"),
        (r"\boxed{ $ $ }", "empty"),
    ],
)
def test_malformed_responses_score_zero_and_count_an_error(rule, response, where):
    # Even with on_error=raise: the policy wrote no answer, which must not stop the run.
    scores, errors = rule.score(
        [make_sample(response, "3"), make_sample(r"\boxed{3}", "3")], on_error="raise"
    )
    assert (scores, errors) == ([0.0, 1.0], 1)
    with pytest.raises(NoAnswer, match=where.replace("\\", "\\\\")):
        verify_answer(response, "3")


def test_extraction_order():
    assert extract_answer(r"#### 5 but \boxed{6}") == ("6", True)
    assert extract_answer("The answer is 4.\n#### 5") == ("5", False)
    assert extract_answer("The answer is 4, not 3\nso") == ("4, not 3", False)
    assert extract_answer("Answer: 12") == ("12", False)
    assert extract_answer("from 3 to -2.5") == ("-2.5", False)


@pytest.mark.parametrize("label", [None, "", "   "])
def test_a_missing_label_is_an_error_of_the_data(rule, label):
    with pytest.raises(RewardError, match="rule 'math' needs a label"):
        rule.score([make_sample(r"\boxed{3}", label)], "reward.sources[0] (math)", on_error="raise")
    scores, errors = rule.score([make_sample(r"\boxed{3}", label)], on_error="zero")
    assert (scores, errors) == ([0.0], 1)


def test_math_verify_timeouts_need_the_main_thread():
    """Why the rule turns math-verify's signal timeouts off: with them on, it raises in a thread."""
    from math_verify import parse

    box = {}
    thread = threading.Thread(target=lambda: box.update(out=_catch(lambda: parse("$1$"))))
    thread.start()
    thread.join()
    assert isinstance(box["out"], ValueError) and "threaded environment" in str(box["out"])
    # The rule itself scores from a worker thread (the time limit) and from a plain thread alike.
    thread = threading.Thread(target=lambda: box.update(out=verify_answer(r"\boxed{1/2}", "0.5")))
    thread.start()
    thread.join()
    assert box["out"] == 1.0


def _catch(fn):
    try:
        return fn()
    except Exception as exc:
        return exc


def test_a_call_past_the_time_limit_scores_zero_and_counts():
    def slow(prompt, response, label):
        time.sleep(1.0)
        return 1.0

    rule = MathRule("math", slow, timeout_s=0.05)
    scores, errors = rule.score([make_sample(r"\boxed{1}", "1")], on_error="raise")
    assert (scores, errors) == ([0.0], 1)


def test_pipeline_counts_unreadable_responses_in_reward_errors():
    pipeline = RewardPipeline(RewardConfig(sources=[RewardSourceConfig(kind="rule", name="math")]))
    samples = [
        make_sample(r"\boxed{\frac{1}{2}}", "0.5"),
        make_sample("#### 7", "8"),
        make_sample(r"\boxed{oops", "8"),
    ]
    assert pipeline.score(samples) == [1.0, 0.0, 0.0]
    assert samples[0].reward_parts == {"math": 1.0}
    assert pipeline.last_stats()["reward/errors"] == 1.0
    assert pipeline.last_stats()["reward/math_mean"] == pytest.approx(1 / 3)


def test_config_accepts_the_rule_and_rejects_args():
    cfg = from_dict({"reward": {"sources": [{"kind": "rule", "name": "math"}]}})
    assert cfg.reward.sources[0].name == "math"
    cfg = from_dict({"evaluation": {"sets": [{"name": "m", "reward": "math"}]}})
    assert cfg.evaluation.sets[0].reward == "math"
    with pytest.raises(RewardError, match="rule 'math' takes no args"):
        RuleReward.from_config("math", {"strict": False})
    with pytest.raises(ConfigError, match="unknown rule; use one of task, format, math, env"):
        from_dict({"reward": {"sources": [{"kind": "rule", "name": "maths"}]}})
