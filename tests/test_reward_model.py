"""Reward-model source: a tiny random LlamaForSequenceClassification, in-process and as Ray actors."""

from __future__ import annotations

import time

import pytest
import torch
from rlhf.reward import RewardPipeline
from rlhf.reward.model import RewardModelActor

from rlhf.config.schema import RewardConfig, RewardSourceConfig
from rlhf.types import Prompt, Sample

PROMPTS = ["What is 2+3?", "What is 12*4?", "Name a colour.", "What is 2+3?", "Say hi."]
RESPONSES = ["5", "The answer is 48, since 12 times 4 is 48.", "blue", "6", "hi there, how are you today?"]


def make_samples(responses: list[str]) -> list[Sample]:
    return [
        Sample(
            group=i // 2,
            prompt=Prompt(index=i, text=p, token_ids=[], label=None),
            response_ids=[],
            response_text=r,
            logprobs=[],
            finish_reason="stop",
        )
        for i, (p, r) in enumerate(zip(PROMPTS, responses))
    ]


def test_actor_batches_match_single_scoring(rm_path):
    batched = RewardModelActor(rm_path, "cpu", batch_size=4).score(PROMPTS, RESPONSES)
    single = RewardModelActor(rm_path, "cpu", batch_size=1).score(PROMPTS, RESPONSES)
    assert len(batched) == len(PROMPTS) and all(isinstance(s, float) for s in batched)
    assert batched == pytest.approx(single, abs=1e-5)
    # The same prompt with different responses must be told apart.
    assert abs(batched[0] - batched[3]) > 1e-6
    assert len(set(batched)) == len(batched)


def test_actor_does_not_double_bos(rm_path):
    """Chat-templated prompts may start with the BOS text; the Llama-style tokenizer adds BOS too."""
    from rlhf.testing import BOS

    actor = RewardModelActor(rm_path, "cpu")
    assert actor.score([BOS + PROMPTS[0]], [RESPONSES[0]]) == actor.score([PROMPTS[0]], [RESPONSES[0]])


def test_actor_matches_the_model_run_by_hand(rm_path):
    """The score is the classifier's logit at the last token of prompt + response, unpadded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(rm_path)
    model = AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1).eval()
    ids = tokenizer(PROMPTS[1] + RESPONSES[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        expected = model.score(hidden[0, -1]).item()
    assert RewardModelActor(rm_path, "cpu", batch_size=8).score(PROMPTS, RESPONSES)[1] == pytest.approx(
        expected, abs=1e-5
    )


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_pipeline_with_reward_model_actors(rm_path, ray_cluster):
    expected = RewardModelActor(rm_path, "cpu", batch_size=2).score(PROMPTS, RESPONSES)
    cfg = RewardConfig(
        sources=[
            RewardSourceConfig(kind="model", path=rm_path, weight=2.0),
            RewardSourceConfig(kind="rule", name=f"{__name__}:is_short", weight=1.0),
        ],
        batch_size=2,
    )
    # Two replicas share the batch (3 + 2 samples).
    pipe = RewardPipeline(cfg, device="cpu", actor_options=[{"num_cpus": 1}, {"num_cpus": 1}])
    try:
        assert len(pipe.sources[0].actors) == 2
        samples = make_samples(RESPONSES)
        rewards = pipe.score(samples)
        rm = [s.reward_parts["rm"] for s in samples]
        assert rm == pytest.approx(expected, abs=1e-5)
        assert rewards == pytest.approx(
            [2 * e + float(len(r) < 5) for e, r in zip(expected, RESPONSES)], abs=1e-5
        )
        # Deterministic: scoring the same samples again gives the same numbers.
        again = pipe.score(make_samples(RESPONSES))
        assert again == pytest.approx(rewards, abs=1e-6)
        # Different responses give different scores.
        changed = make_samples(["7", *RESPONSES[1:]])
        pipe.score(changed)
        assert abs(changed[0].reward_parts["rm"] - rm[0]) > 1e-6
        stats = pipe.last_stats()
        assert stats["reward/rm_mean"] == pytest.approx(sum(s.reward_parts["rm"] for s in changed) / 5)
        assert stats["reward/errors"] == 0.0 and stats["fault/reward_restarts"] == 0.0

        # A replica that died (killed, and gone before its chunk arrives: a kill racing a fast score
        # could miss it) is restarted and scores its chunk again: same numbers.
        source = pipe.sources[0]
        dead = source.actors[1]
        ray_cluster.kill(dead, no_restart=True)
        wait_until_dead(ray_cluster, dead)
        pending = source.submit(make_samples(RESPONSES))
        values, errors = source.collect(pending, make_samples(RESPONSES), "raise")
        assert values == pytest.approx(expected, abs=1e-5) and errors == 0
        assert source.actors[1] != dead and source.restarts == 1
        pipe.score(make_samples(RESPONSES))
        assert pipe.last_stats()["fault/reward_restarts"] == 1.0
    finally:
        actors = pipe.sources[0].actors
        pipe.shutdown()
    for actor in actors:  # shutdown() killed the replicas
        wait_until_dead(ray_cluster, actor)


def wait_until_dead(ray, actor, timeout_s: float = 30.0) -> None:
    """ray.kill is asynchronous: poll the actor until a call fails with RayActorError (or fail)."""
    with pytest.raises(ray.exceptions.RayActorError):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ray.get(actor.ready.remote(), timeout=timeout_s)
            time.sleep(0.2)


def is_short(prompt: str, response: str, label) -> float:
    """A user rule for the pipeline test above (imported by dotted path)."""
    return float(len(response) < 5)
