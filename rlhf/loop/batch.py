"""Turn sampled responses into the padded tensors learners train on."""

from __future__ import annotations

import torch

from rlhf.types import Sample, TrainBatch


def make_train_batch(samples: list[Sample], pad_token_id: int) -> TrainBatch:
    """Right-pad prompt+response rows; per-token tensors are aligned with `input_ids`.

    `loss_mask[i, t]` is 1 where token t is a response token of row i sampled by the policy
    (`Sample.response_mask`; environment tokens of a multi-turn episode are 0), so `rollout_logprobs[i, t]`
    is the engine's log-probability of that token given everything before it.
    """
    lengths = [len(s.prompt.token_ids) + len(s.response_ids) for s in samples]
    width = max(lengths)
    b = len(samples)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    loss_mask = torch.zeros((b, width), dtype=torch.float32)
    # The engine returns logprobs only where the algorithm needs them (rlhf.algorithms.old_logprobs).
    with_logprobs = all(s.logprobs is not None for s in samples)
    rollout_logprobs = torch.zeros((b, width), dtype=torch.float32) if with_logprobs else None
    for i, s in enumerate(samples):
        p, r = len(s.prompt.token_ids), len(s.response_ids)
        input_ids[i, : p + r] = torch.tensor(s.prompt.token_ids + s.response_ids, dtype=torch.long)
        attention_mask[i, : p + r] = 1
        if s.response_mask is None:
            loss_mask[i, p : p + r] = 1.0
        else:  # multi-turn: environment tokens are context, not actions
            loss_mask[i, p : p + r] = torch.tensor(s.response_mask[:r], dtype=torch.float32)
        if r and with_logprobs:
            rollout_logprobs[i, p : p + r] = torch.tensor(s.logprobs[:r], dtype=torch.float32)
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        rollout_logprobs=rollout_logprobs,
        advantages=torch.zeros((b, width), dtype=torch.float32),
        rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32),
        group=torch.tensor([s.group for s in samples], dtype=torch.long),
    )


def response_lengths(batch: TrainBatch) -> torch.Tensor:
    return batch.loss_mask.sum(dim=1)
