"""KL estimators against hand-computed values, and their (un)biasedness on an exact expectation."""

import math

import pytest
import torch

from rlhf.algorithms.kl import kl_estimate

T = torch.tensor
LOG2 = math.log(2.0)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_values_by_hand():
    # d = log pi - log pi_ref: +log 2 and -log 2 and 0
    logp = T([[math.log(0.5), math.log(0.25), -1.0]])
    ref = T([[math.log(0.25), math.log(0.5), -1.0]])
    close(kl_estimate(logp, ref, "k1"), [[LOG2, -LOG2, 0]])
    close(kl_estimate(logp, ref, "k2"), [[0.240227, 0.240227, 0]])  # 0.5 * 0.693147^2
    # k3 = exp(-d) - 1 + d: 0.5 - 1 + 0.693147 and 2 - 1 - 0.693147
    close(kl_estimate(logp, ref, "k3"), [[0.193147, 0.306853, 0]])


def test_k2_k3_are_non_negative():
    d = torch.linspace(-30, 30, 601)
    assert (kl_estimate(d, torch.zeros_like(d), "k3") >= 0).all()
    assert (kl_estimate(d, torch.zeros_like(d), "k2") >= 0).all()


def test_log_ratio_is_clamped_to_20():
    out = kl_estimate(T([100.0, -100.0]), T([0.0, 0.0]), "k3")
    # exp(-20) - 1 + 20 = 19.000000002 and exp(20) - 1 - 20 = 485165174.41 (float32: relative tolerance)
    torch.testing.assert_close(out, T([19.0, 485165174.41]), rtol=1e-6, atol=1e-5)
    assert torch.isfinite(out).all()
    close(kl_estimate(T([100.0]), T([0.0]), "k1"), [20.0])


def test_k1_and_k3_are_unbiased_estimates_of_kl_pi_ref():
    # pi = [0.5, 0.25, 0.25], pi_ref = [0.25, 0.5, 0.25]:
    # KL(pi || pi_ref) = 0.5 log 2 + 0.25 log 0.5 + 0 = 0.25 log 2 = 0.173287
    pi = T([0.5, 0.25, 0.25])
    ref = T([0.25, 0.5, 0.25])
    for estimator in ("k1", "k3"):
        expectation = (pi * kl_estimate(pi.log(), ref.log(), estimator)).sum()
        close(expectation, 0.25 * LOG2)
    # k2 is biased: E[d^2 / 2] = 0.5 * (0.5 + 0.25) * log(2)^2 = 0.180170
    close((pi * kl_estimate(pi.log(), ref.log(), "k2")).sum(), 0.180170)


def test_unknown_estimator_names_the_key():
    with pytest.raises(ValueError, match="algorithm.kl_estimator"):
        kl_estimate(T([0.0]), T([0.0]), "k4")
