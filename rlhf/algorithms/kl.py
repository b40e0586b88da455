"""KL estimators between the policy and the reference model, per token.

Tokens are sampled from the policy pi, so these estimate KL(pi || pi_ref) = E_{x~pi}[log pi(x) - log pi_ref(x)]
from one sample per position (Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html).
With d = log pi(x) - log pi_ref(x):

    k1 = d                       unbiased, high variance, can be negative
    k2 = d^2 / 2                 biased, low variance, >= 0 (its gradient is the true KL's gradient to first order)
    k3 = exp(-d) - 1 + d         unbiased, low variance, >= 0 (GRPO's choice)

Each estimator is registered by name (`algorithm.kl_estimator`) in `rlhf.algorithms.registry.KL_ESTIMATORS`;
`@register_kl_estimator("name")` adds one: a function of the clamped log-ratio d [B, T].
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.algorithms.registry import KL_ESTIMATORS as KL_REGISTRY
from rlhf.algorithms.registry import register_kl_estimator

# exp(20) ~ 5e8: larger gaps only appear through numerical noise or a broken reference, and would overflow k3.
MAX_LOG_RATIO = 20.0


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) for tokens sampled from pi; shape [B, T], not masked.

    Gradients flow through both arguments; detach `ref_logprobs` (it normally is) for a KL penalty.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"kl_estimate: logprobs {tuple(logprobs.shape)} vs ref_logprobs {tuple(ref_logprobs.shape)}"
        )
    entry = KL_REGISTRY.get(estimator)
    log_ratio = (logprobs - ref_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return entry(log_ratio)


@register_kl_estimator("k1")
def k1(log_ratio: Tensor) -> Tensor:
    """`d`: unbiased, high variance, can be negative."""
    return log_ratio


@register_kl_estimator("k2")
def k2(log_ratio: Tensor) -> Tensor:
    """`d^2 / 2`: biased, low variance, >= 0."""
    return 0.5 * log_ratio.square()


@register_kl_estimator("k3")
def k3(log_ratio: Tensor) -> Tensor:
    """`exp(-d) - 1 + d`: unbiased, low variance, >= 0 (GRPO)."""
    return torch.exp(-log_ratio) - 1.0 + log_ratio


# The built-in names (more can be registered).
KL_ESTIMATORS = KL_REGISTRY.names()


# The name docs/architecture.md uses for the same function.
kl_penalty = kl_estimate
