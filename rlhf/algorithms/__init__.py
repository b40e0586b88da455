"""The RL math as pure tensor functions: advantages, GAE, KL estimators, losses, DAPO filters.

No Ray, no DeepSpeed: the driver and learners call these on plain [B] / [B, T] tensors.
See docs/algorithms.md for every algorithm's formula and the `algorithm.*` keys that select it.
"""

from rlhf.algorithms.advantages import (
    apply_kl_to_rewards,
    compute_advantages,
    dr_grpo_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    token_level_rewards,
)
from rlhf.algorithms.filters import dynamic_sampling_keep, overlong_mask, overlong_penalty
from rlhf.algorithms.gae import gae, whiten
from rlhf.algorithms.kl import kl_estimate, kl_penalty
from rlhf.algorithms.losses import (
    aggregate,
    loss_normalizers,
    masked_mean,
    policy_loss,
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
    value_loss,
)

__all__ = [
    "aggregate",
    "apply_kl_to_rewards",
    "compute_advantages",
    "dr_grpo_advantages",
    "dynamic_sampling_keep",
    "gae",
    "grpo_advantages",
    "kl_estimate",
    "kl_penalty",
    "loss_normalizers",
    "masked_mean",
    "overlong_mask",
    "overlong_penalty",
    "policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "token_level_rewards",
    "value_loss",
    "whiten",
]
