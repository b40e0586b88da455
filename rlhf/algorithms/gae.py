"""Generalized Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438) for PPO with a critic.

    delta_t = r_t + gamma * V_{t+1} - V_t           (V after the last response token = 0: the episode ends)
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t                             (the critic's regression target)

The response tokens of a row are the positions where `mask` is 1; they may start anywhere (after the
prompt) and be followed by right padding. Positions outside the mask are not steps of the episode: they get
A = R = 0 and are skipped, so the recursion links each response token to the next response token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Returns (advantages [B, T], returns [B, T]), both 0 off the mask. Rewards off the mask are ignored."""
    if not (token_rewards.shape == values.shape == mask.shape) or mask.dim() != 2:
        raise ValueError(
            f"gae: token_rewards {tuple(token_rewards.shape)}, values {tuple(values.shape)} and "
            f"mask {tuple(mask.shape)} must all be the same [B, T]"
        )
    with torch.no_grad():
        rewards, values, on = token_rewards.float(), values.float(), mask > 0
        advantages = torch.zeros_like(values)
        next_value = torch.zeros_like(values[:, 0])  # V of the next response token (0 past the end)
        next_advantage = torch.zeros_like(values[:, 0])
        for t in reversed(range(values.shape[1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantage = delta + gamma * lam * next_advantage
            # Off the mask: write 0 and carry the recursion state through unchanged.
            advantages[:, t] = torch.where(on[:, t], advantage, 0.0)
            next_advantage = torch.where(on[:, t], advantage, next_advantage)
            next_value = torch.where(on[:, t], values[:, t], next_value)
        returns = (advantages + values) * on
    return advantages, returns


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries (population std), 0 off the mask.

    With `shift_mean=False` the mean is added back (only the scale changes), as some PPO variants do.
    """
    mask = mask.float()
    count = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / count
    var = ((x - mean).square() * mask).sum() / count
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask
