"""Outcome-reward advantage estimators: one scalar per sample, broadcast over its response tokens.

All estimators take the final reward of each sample, `rewards` [B], and `groups` [B] (long), the id of the
prompt each sample answers (the n samples of one prompt share an id; ids need not be contiguous or sorted).
They return one advantage per sample, [B]; `compute_advantages` picks one by `algorithm.advantage` and
broadcasts it to the response tokens. PPO's per-token GAE lives in `rlhf.algorithms.gae`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.config.schema import AlgorithmConfig

SCALAR_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


def _check(rewards: Tensor, groups: Tensor | None = None) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be one scalar per sample, shape [B]; got {tuple(rewards.shape)}")
    if groups is not None and groups.shape != rewards.shape:
        raise ValueError(f"groups {tuple(groups.shape)} must match rewards {tuple(rewards.shape)}")


def _group_sum(values: Tensor, groups: Tensor) -> Tensor:
    """For each sample, the sum of `values` over the samples of its group, [B]."""
    _, index = torch.unique(groups, return_inverse=True)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    return sums[index]


def group_mean(rewards: Tensor, groups: Tensor) -> Tensor:
    """For each sample, the mean reward of its group, [B]."""
    _check(rewards, groups)
    rewards = rewards.float()
    return _group_sum(rewards, groups) / _group_sum(torch.ones_like(rewards), groups)


def grpo_advantages(rewards: Tensor, groups: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean_g) / (std_g + eps).

    std_g is the population std (divide by n, not n - 1), so a group's advantages have unit variance and a
    one-sample group gets A = 0 (its reward is its own mean) instead of a NaN. Groups whose rewards are all
    equal get A = 0 too: they carry no learning signal (see `filters.dynamic_sampling_keep`).
    """
    centred = rewards.float() - group_mean(rewards, groups)
    std = group_mean(centred.square(), groups).sqrt()
    return centred / (std + eps)


def dr_grpo_advantages(rewards: Tensor, groups: Tensor) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = r_i - mean_g.

    Dropping the std division removes GRPO's question-difficulty bias; the other half of the fix (no
    per-response length normalisation) is `algorithm.loss_agg: seq_mean_token_sum_norm`.
    """
    return rewards.float() - group_mean(rewards, groups)


def rloo_advantages(rewards: Tensor, groups: Tensor) -> Tensor:
    """RLOO (Ahmadian et al. 2024; Kool et al. 2019): A_i = r_i - mean_{j != i, j in g} r_j.

    The leave-one-out baseline is independent of sample i, so the estimator stays unbiased.
    A one-sample group has no other samples to compare with and gets A = 0.
    """
    _check(rewards, groups)
    rewards = rewards.float()
    sums = _group_sum(rewards, groups)
    others = _group_sum(torch.ones_like(rewards), groups) - 1
    baseline = (sums - rewards) / others.clamp(min=1)
    return torch.where(others > 0, rewards - baseline, torch.zeros_like(rewards))


def reinforce_pp_advantages(rewards: Tensor, mask: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ (Hu 2025): A_i = (r_i - mean_batch) / (std_batch + eps), normalised over the global batch.

    The paper whitens the token-level advantages of the whole batch. A sample's advantage is the same on all
    its response tokens, so with `mask` [B, T] the mean and (population) std weight each sample by its number
    of response tokens, which is exactly that token-level whitening; without `mask` every sample counts once.
    """
    _check(rewards)
    rewards = rewards.float()
    if mask is None:
        weights = torch.ones_like(rewards)
    else:
        if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
            raise ValueError(f"mask must be [B, T] with B = {rewards.shape[0]}; got {tuple(mask.shape)}")
        weights = mask.float().sum(dim=1)
    total = weights.sum()
    if total <= 0:
        return torch.zeros_like(rewards)
    mean = (weights * rewards).sum() / total
    std = ((weights * (rewards - mean).square()).sum() / total).sqrt()
    return (rewards - mean) / (std + eps)


def reinforce_pp_baseline_advantages(
    rewards: Tensor, groups: Tensor, mask: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """REINFORCE++-baseline (Hu 2025): subtract the group mean, then normalise over the global batch.

    The group mean removes prompt difficulty (like GRPO); the global std keeps the scale stable without
    GRPO's per-group std, which blows up groups that are nearly all-equal.
    """
    return reinforce_pp_advantages(dr_grpo_advantages(rewards, groups), mask, eps)


def compute_advantages(cfg: AlgorithmConfig, rewards: Tensor, groups: Tensor, mask: Tensor) -> Tensor:
    """Per-token advantages [B, T] = the sample's scalar advantage on its response tokens (mask), 0 elsewhere."""
    _check(rewards, groups)
    if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"mask must be [B, T] with B = {rewards.shape[0]}; got {tuple(mask.shape)}")
    name = cfg.advantage
    if name == "grpo":
        adv = grpo_advantages(rewards, groups, cfg.eps)
    elif name == "dr_grpo":
        adv = dr_grpo_advantages(rewards, groups)
    elif name == "rloo":
        adv = rloo_advantages(rewards, groups)
    elif name == "reinforce_pp":
        adv = reinforce_pp_advantages(rewards, mask, cfg.eps)
    elif name == "reinforce_pp_baseline":
        adv = reinforce_pp_baseline_advantages(rewards, groups, mask, cfg.eps)
    elif name == "gae":
        raise ValueError(
            "algorithm.advantage 'gae' is per-token and needs critic values: use "
            "rlhf.algorithms.gae.gae(token_level_rewards(...), values, mask, gamma, lam)"
        )
    else:
        raise ValueError(f"algorithm.advantage must be one of {(*SCALAR_ESTIMATORS, 'gae')}, got {name!r}")
    return adv[:, None] * mask.float()


def apply_kl_to_rewards(rewards: Tensor, kl: Tensor, mask: Tensor, coef: float) -> Tensor:
    """KL in the reward (`algorithm.kl_in: reward`) for scalar estimators: r_i - coef * sum_t kl_it over the response.

    `kl` [B, T] is a per-token estimate (`kl.kl_estimate`) computed without gradient.
    """
    _check(rewards)
    return rewards.float() - coef * (kl.float() * mask.float()).sum(dim=1)


def token_level_rewards(rewards: Tensor, kl: Tensor, mask: Tensor, coef: float) -> Tensor:
    """Per-token rewards [B, T] for PPO/GAE (Ouyang et al. 2022): -coef * kl_t on every response token, plus the
    sample's score on its last response token. Rows without response tokens get all zeros."""
    _check(rewards)
    mask = mask.float()
    token_rewards = -coef * kl.float() * mask
    T = mask.shape[1]
    has_response = mask.sum(dim=1) > 0
    last = T - 1 - torch.argmax(mask.flip(dims=[1]), dim=1)  # index of the last 1 in each row
    rows = torch.arange(mask.shape[0], device=mask.device)
    score = torch.where(has_response, rewards.float(), torch.zeros_like(rewards, dtype=torch.float))
    token_rewards[rows, last] += score
    return token_rewards
