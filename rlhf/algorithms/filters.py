"""DAPO's sample filters and overlong shaping (Yu et al. 2025, "DAPO", arXiv:2503.14476)."""

from __future__ import annotations

import torch
from torch import Tensor


def dynamic_sampling_keep(rewards: Tensor, groups: Tensor) -> Tensor:
    """Bool [B]: True for samples whose group has at least two different rewards.

    A group whose rewards are all equal (all right, all wrong, or a single sample) has zero advantage under
    every group baseline, so it only dilutes the batch; DAPO drops it and samples more prompts.
    """
    if rewards.dim() != 1 or groups.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and groups {tuple(groups.shape)} must both be [B]")
    _, index = torch.unique(groups, return_inverse=True)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    rewards = rewards.float()
    low = torch.full((num_groups,), float("inf"), device=rewards.device).scatter_reduce(
        0, index, rewards, "amin"
    )
    high = torch.full((num_groups,), float("-inf"), device=rewards.device).scatter_reduce(
        0, index, rewards, "amax"
    )
    return (high > low)[index]


def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, added to the reward, [B]:

        0                                          if L <= max_new_tokens - buffer
        -penalty * (L - (max_new_tokens - buffer)) / buffer   in the last `buffer` tokens
        -penalty                                   if L >= max_new_tokens

    `buffer = 0` disables it (all zeros).
    """
    lengths = lengths.float()
    if buffer <= 0:
        return torch.zeros_like(lengths)
    if buffer > max_new_tokens:
        raise ValueError(f"algorithm.overlong_buffer ({buffer}) exceeds max_new_tokens ({max_new_tokens})")
    over = (lengths - (max_new_tokens - buffer)).clamp(0, buffer)
    return -penalty * over / buffer


def overlong_mask(truncated: Tensor) -> Tensor:
    """Float [B]: 0 for truncated responses, 1 otherwise (DAPO's overlong filtering).

    Multiply it into the loss mask (`mask * overlong_mask(truncated)[:, None]`): a cut-off response is not
    wrong, only unfinished, so it should not be punished through its reward.
    """
    return (~truncated.bool()).float()
