"""The RL math as pure tensor functions: advantages, GAE, KL estimators, losses, DAPO filters.

No Ray, no DeepSpeed: the driver and learners call these on plain [B] / [B, T] tensors.
See docs/algorithms.md for every algorithm's formula and the `algorithm.*` keys that select it.
The names those keys take are registries (`rlhf.algorithms.registry`): a new advantage estimator, loss
aggregation, off-policy correction or KL estimator is one decorated function.
"""

from rlhf.algorithms.advantages import (
    AdvantageInputs,
    advantage_needs_critic,
    apply_kl_to_rewards,
    compute_advantages,
    dr_grpo_advantages,
    estimate_advantages,
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
from rlhf.algorithms.registry import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    OFF_POLICY_CORRECTIONS,
    Registry,
    register_advantage,
    register_correction,
    register_kl_estimator,
    register_loss_aggregation,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "OFF_POLICY_CORRECTIONS",
    "AdvantageInputs",
    "Registry",
    "advantage_needs_critic",
    "aggregate",
    "apply_kl_to_rewards",
    "compute_advantages",
    "dr_grpo_advantages",
    "dynamic_sampling_keep",
    "estimate_advantages",
    "gae",
    "grpo_advantages",
    "kl_estimate",
    "kl_penalty",
    "loss_normalizers",
    "masked_mean",
    "overlong_mask",
    "overlong_penalty",
    "policy_loss",
    "register_advantage",
    "register_correction",
    "register_kl_estimator",
    "register_loss_aggregation",
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
