"""Advantage estimators, registered by name (`algorithm.advantage`) in `ADVANTAGE_ESTIMATORS`.

The outcome-reward estimators take the final reward of each sample, `rewards` [B], and `groups` [B] (long),
the id of the prompt each sample answers (the n samples of one prompt share an id; ids need not be
contiguous or sorted), and return one advantage per sample, [B]. PPO's per-token GAE lives in
`rlhf.algorithms.gae`.

`estimate_advantages(cfg, AdvantageInputs(...))` is the one entry point of the loop: it folds the KL into
the reward (`algorithm.kl_in: reward`) and calls the registered estimator, which returns
`(advantages [B, T], returns [B, T] or None)`. A new estimator is a function decorated with
`@register_advantage("name")` (see `rlhf.algorithms.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.algorithms.gae import gae
from rlhf.algorithms.registry import ADVANTAGE_ESTIMATORS, AlgorithmConfig, register_advantage

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


# ------------------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator sees. `token_kl` is the KL-in-reward penalty per token (already masked,
    before `kl_coef`), given only to estimators registered with `kl_per_token=True` and only when
    `algorithm.kl_in` is `reward`; `values` are the critic's, for estimators with `needs_critic=True`."""

    rewards: Tensor  # [B] final reward of each sample
    groups: Tensor  # [B] long, the prompt each sample answers
    mask: Tensor  # [B, T] 1 on the response tokens in the loss
    token_kl: Tensor | None = None  # [B, T]
    values: Tensor | None = None  # [B, T]


def _check_mask(rewards: Tensor, mask: Tensor) -> None:
    if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"mask must be [B, T] with B = {rewards.shape[0]}; got {tuple(mask.shape)}")


def _per_token(adv: Tensor, mask: Tensor) -> tuple[Tensor, None]:
    """The sample's scalar advantage on its response tokens (mask), 0 elsewhere; no returns."""
    return adv[:, None] * mask.float(), None


@register_advantage("grpo", group_relative=True)
def _grpo(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> tuple[Tensor, None]:
    """GRPO: `(r_i - mean_g) / (std_g + eps)`, the group-normalised reward."""
    return _per_token(grpo_advantages(inputs.rewards, inputs.groups, cfg.eps), inputs.mask)


@register_advantage("dr_grpo", group_relative=True)
def _dr_grpo(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> tuple[Tensor, None]:
    """Dr. GRPO: `r_i - mean_g`, no division by the group std."""
    return _per_token(dr_grpo_advantages(inputs.rewards, inputs.groups), inputs.mask)


@register_advantage("rloo", group_relative=True)
def _rloo(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> tuple[Tensor, None]:
    """RLOO: `r_i - mean_{j != i in g} r_j`, the leave-one-out baseline."""
    return _per_token(rloo_advantages(inputs.rewards, inputs.groups), inputs.mask)


@register_advantage("reinforce_pp")
def _reinforce_pp(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> tuple[Tensor, None]:
    """REINFORCE++: `(r_i - mean_batch) / (std_batch + eps)`, token-weighted over the global batch."""
    return _per_token(reinforce_pp_advantages(inputs.rewards, inputs.mask, cfg.eps), inputs.mask)


@register_advantage("reinforce_pp_baseline", group_relative=True)
def _reinforce_pp_baseline(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> tuple[Tensor, None]:
    """REINFORCE++-baseline: subtract the group mean, then normalise over the global batch."""
    advantages = reinforce_pp_baseline_advantages(inputs.rewards, inputs.groups, inputs.mask, cfg.eps)
    return _per_token(advantages, inputs.mask)


@register_advantage("gae", needs_critic=True, kl_per_token=True)
def _gae(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> tuple[Tensor, Tensor]:
    """PPO's GAE: per-token advantages from the critic's values, `gamma` and `lam`; returns for the critic."""
    if inputs.values is None:
        raise ValueError(
            "algorithm.advantage 'gae' is per-token and needs critic values: use "
            "rlhf.algorithms.gae.gae(token_level_rewards(...), values, mask, gamma, lam)"
        )
    coef = cfg.kl_coef if inputs.token_kl is not None else 0.0
    kl_term = inputs.token_kl if inputs.token_kl is not None else torch.zeros_like(inputs.mask)
    token_rewards = token_level_rewards(inputs.rewards, kl_term, inputs.mask, coef)
    return gae(token_rewards, inputs.values, inputs.mask, cfg.gamma, cfg.lam)


def advantage_needs_critic(name: str) -> bool:
    """Whether estimator `name` reads the critic's values (the loop fills `AdvantageInputs.values`)."""
    return bool(ADVANTAGE_ESTIMATORS.get(name).attrs.get("needs_critic", False))


def estimate_advantages(cfg: AlgorithmConfig, inputs: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
    """(advantages [B, T], returns [B, T] or None) of estimator `cfg.advantage`.

    `inputs.token_kl` is the per-token KL to the reference (masked; None without a reference). With
    `cfg.kl_in == "reward"` it becomes part of the reward: per token for estimators registered with
    `kl_per_token=True` (GAE: `-kl_coef * kl_t` on every token, `token_level_rewards`), otherwise
    `r_i - kl_coef * sum_t kl_t` (`apply_kl_to_rewards`) before the estimator runs. With `kl_in: loss`
    the estimator sees no KL.
    """
    entry = ADVANTAGE_ESTIMATORS.get(cfg.advantage)
    _check(inputs.rewards, inputs.groups)
    _check_mask(inputs.rewards, inputs.mask)
    kl_in_reward = inputs.token_kl is not None and cfg.kl_in == "reward"
    if entry.attrs.get("kl_per_token", False):
        token_kl = inputs.token_kl if kl_in_reward else None
        inputs = AdvantageInputs(inputs.rewards, inputs.groups, inputs.mask, token_kl, inputs.values)
    else:
        rewards = inputs.rewards
        if kl_in_reward:
            rewards = apply_kl_to_rewards(rewards, inputs.token_kl, inputs.mask, cfg.kl_coef)
        inputs = AdvantageInputs(rewards, inputs.groups, inputs.mask, None, inputs.values)
    if entry.attrs.get("needs_critic", False) and inputs.values is None:
        raise ValueError(f"algorithm.advantage {cfg.advantage!r} needs the critic's values (inputs.values)")
    return entry(inputs, cfg)


def compute_advantages(cfg: AlgorithmConfig, rewards: Tensor, groups: Tensor, mask: Tensor) -> Tensor:
    """Per-token advantages [B, T] of an estimator without critic and without KL in the reward (for GRPO
    and the other outcome-reward estimators: the sample's scalar advantage on its response tokens (mask), 0
    elsewhere). The loop calls `estimate_advantages`."""
    _check(rewards, groups)
    _check_mask(rewards, mask)
    # GAE raises here: it needs the critic's values.
    return ADVANTAGE_ESTIMATORS.get(cfg.advantage)(AdvantageInputs(rewards, groups, mask), cfg)[0]
