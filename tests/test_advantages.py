"""Advantage estimators against hand-computed numbers."""

import pytest
import torch

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
from rlhf.config.schema import AlgorithmConfig

T = torch.tensor


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_grpo_binary_group_all_equal_group_and_single_sample():
    # group 0: mean 0.5, population std 0.5 -> +-1; group 7: all equal -> 0; group 3: one sample -> 0
    rewards = T([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0])
    groups = T([0, 0, 0, 0, 7, 7, 3])
    close(grpo_advantages(rewards, groups), [1, -1, -1, 1, 0, 0, 0])


def test_grpo_uses_population_std():
    # mean 2, var (1 + 0 + 1) / 3 = 2/3, std 0.816497 -> -1/0.816497 = -1.224745
    close(grpo_advantages(T([1.0, 2.0, 3.0]), T([4, 4, 4])), [-1.224745, 0.0, 1.224745])


def test_grpo_groups_need_not_be_contiguous():
    # interleaved groups: {0: [1, 0]} and {1: [3, 5]} -> +-1 each
    close(grpo_advantages(T([1.0, 3.0, 0.0, 5.0]), T([0, 1, 0, 1])), [1, -1, -1, 1])


def test_dr_grpo_subtracts_group_mean_only():
    rewards = T([1.0, 2.0, 3.0, 1.0, 0.0, 0.0, 1.0, 9.0])
    groups = T([0, 0, 0, 1, 1, 1, 1, 2])
    close(dr_grpo_advantages(rewards, groups), [-1, 0, 1, 0.5, -0.5, -0.5, 0.5, 0])


def test_rloo_leave_one_out_baseline():
    # r=1: others (2+3+6)/3 = 11/3 -> -8/3; r=2: 10/3 -> -4/3; r=3: 3 -> 0; r=6: 2 -> 4; lone sample -> 0
    rewards = T([1.0, 2.0, 3.0, 6.0, 7.0])
    groups = T([0, 0, 0, 0, 1])
    close(rloo_advantages(rewards, groups), [-8 / 3, -4 / 3, 0.0, 4.0, 0.0])


def test_reinforce_pp_global_normalisation_per_sample():
    # mean 1.5, var (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25, std 1.118034
    close(reinforce_pp_advantages(T([0.0, 1.0, 2.0, 3.0])), [-1.341641, -0.447214, 0.447214, 1.341641])


def test_reinforce_pp_with_mask_whitens_tokens():
    # token advantages [0, 0, 0, 1]: mean 0.25, var (3 * 0.0625 + 0.5625) / 4 = 0.1875, std 0.433013
    mask = T([[0.0, 1, 1, 1], [0, 1, 0, 0]])
    close(reinforce_pp_advantages(T([0.0, 1.0]), mask), [-0.577350, 1.732051])


def test_reinforce_pp_baseline():
    # centred [0.5, -0.5, 0, 0, 1, -1]; global mean 0, var 2.5 / 6, std 0.645497
    rewards = T([1.0, 0.0, 3.0, 3.0, 4.0, 2.0])
    groups = T([0, 0, 1, 1, 2, 2])
    close(
        reinforce_pp_baseline_advantages(rewards, groups),
        [0.774597, -0.774597, 0.0, 0.0, 1.549193, -1.549193],
    )


def test_compute_advantages_broadcasts_over_response_tokens():
    mask = T([[0.0, 1, 1, 0], [0, 0, 1, 1]])
    adv = compute_advantages(AlgorithmConfig(advantage="grpo"), T([1.0, 0.0]), T([0, 0]), mask)
    close(adv, [[0, 1, 1, 0], [0, 0, -1, -1]])
    adv = compute_advantages(AlgorithmConfig(advantage="rloo"), T([1.0, 0.0]), T([0, 0]), mask)
    close(adv, [[0, 1, 1, 0], [0, 0, -1, -1]])
    adv = compute_advantages(AlgorithmConfig(advantage="dr_grpo"), T([1.0, 0.0]), T([0, 0]), mask)
    close(adv, [[0, 0.5, 0.5, 0], [0, 0, -0.5, -0.5]])


def test_compute_advantages_reinforce_pp_uses_token_weights():
    # same numbers as test_reinforce_pp_with_mask_whitens_tokens
    mask = T([[0.0, 1, 1, 1], [0, 1, 0, 0]])
    adv = compute_advantages(AlgorithmConfig(advantage="reinforce_pp"), T([0.0, 1.0]), T([0, 1]), mask)
    close(adv, [[0, -0.577350, -0.577350, -0.577350], [0, 1.732051, 0, 0]])


def test_compute_advantages_rejects_gae_and_unknown_names():
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="gae"):
        compute_advantages(AlgorithmConfig(advantage="gae"), T([1.0, 0.0]), T([0, 0]), mask)
    with pytest.raises(ValueError, match="algorithm.advantage"):
        compute_advantages(AlgorithmConfig(advantage="ppo2"), T([1.0, 0.0]), T([0, 0]), mask)
    with pytest.raises(ValueError, match="groups"):
        compute_advantages(AlgorithmConfig(), T([1.0, 0.0]), T([0, 0, 0]), mask)


def test_apply_kl_to_rewards_sums_kl_over_response():
    kl = T([[9.0, 0.1, 0.2, 9.0], [9.0, 9.0, 0.5, -0.1]])
    mask = T([[0.0, 1, 1, 0], [0, 0, 1, 1]])
    # 1 - 0.5 * 0.3 = 0.85; 0 - 0.5 * 0.4 = -0.2
    close(apply_kl_to_rewards(T([1.0, 0.0]), kl, mask, 0.5), [0.85, -0.2])


def test_token_level_rewards_score_on_last_response_token():
    kl = T([[9.0, 0.1, 0.2, 9.0], [9.0, 9.0, 0.5, -0.1], [1.0, 1.0, 1.0, 1.0], [0.0, 0.2, 9.0, 0.4]])
    mask = T([[0.0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]])
    out = token_level_rewards(T([1.0, 0.0, 3.0, 2.0]), kl, mask, 0.5)
    close(
        out,
        [
            [0, -0.05, 1 - 0.1, 0],  # score at t=2, the last response token before padding
            [0, 0, -0.25, 0.05],  # a negative kl estimate becomes a bonus
            [0, 0, 0, 0],  # no response tokens: nothing to attach the score to
            [0, -0.1, 0, 2 - 0.2],  # a hole in the mask: the score still goes to the last 1
        ],
    )
