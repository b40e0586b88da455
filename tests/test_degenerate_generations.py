"""Degenerate generations (empty response, only EOS, truncated) flow through scoring, advantages and
the loss without NaN or a crash: they are ordinary samples that earn what the reward gives them."""

from __future__ import annotations

import math

import torch
from rlhf.reward import RewardPipeline

from rlhf.algorithms.advantages import compute_advantages
from rlhf.algorithms.losses import policy_loss
from rlhf.config.schema import AlgorithmConfig, RewardConfig, RewardSourceConfig
from rlhf.loop.batch import make_train_batch
from rlhf.tasks import get_task
from rlhf.types import Prompt, Sample

EOS = 2


def sample(response_ids: list[int], text: str, finish: str, group: int) -> Sample:
    prompt = Prompt(index=group, text="What is 6*7?", token_ids=[1, 7, 8], label="42")
    return Sample(group, prompt, response_ids, text, None, finish)


def test_empty_eos_only_and_truncated_responses_train_without_nan():
    samples = [
        sample([], "", "stop", 0),  # the engine stopped at once (empty response)
        sample([EOS], "", "stop", 0),  # only EOS
        sample([9] * 5, "4 4 4 4 4", "length", 1),  # truncated at max_new_tokens
        sample([5, 6, EOS], "42", "stop", 1),
    ]
    pipe = RewardPipeline(RewardConfig(sources=[RewardSourceConfig()]), task=get_task("arithmetic"))
    assert pipe.score(samples) == [0.0, 0.0, 0.0, 1.0]
    batch = make_train_batch(samples, pad_token_id=0)
    assert batch.loss_mask.sum(1).tolist() == [0.0, 1.0, 5.0, 3.0]  # the empty one adds no token
    assert [s.truncated for s in samples] == [False, False, True, False]
    alg = AlgorithmConfig()
    batch.advantages = compute_advantages(alg, batch.rewards, batch.group, batch.loss_mask)
    # group 0 is all-equal (std 0): zero advantages, not NaN
    assert torch.isfinite(batch.advantages).all() and batch.advantages[:2].abs().sum() == 0
    logp = torch.full(batch.loss_mask.shape, -1.0, requires_grad=True)
    loss, stats = policy_loss(logp, logp.detach(), batch.advantages, batch.loss_mask, alg)
    loss.backward()
    assert math.isfinite(float(loss)) and torch.isfinite(logp.grad).all()
    assert all(math.isfinite(float(v)) for v in stats.values())
