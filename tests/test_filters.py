"""DAPO filters against hand-computed values."""

import pytest
import torch

from rlhf.algorithms.filters import dynamic_sampling_keep, overlong_mask, overlong_penalty

T = torch.tensor


def test_dynamic_sampling_keeps_groups_with_different_rewards():
    rewards = T([1.0, 1.0, 0.0, 1.0, 0.5, 2.0, 2.0, 2.0, 0.0, 0.3])
    groups = T([0, 0, 1, 1, 2, 3, 3, 3, 9, 9])
    # group 0 all equal, 1 mixed, 2 a single sample, 3 all equal, 9 mixed (ids need not be contiguous)
    expected = [False, False, True, True, False, False, False, False, True, True]
    assert dynamic_sampling_keep(rewards, groups).tolist() == expected


def test_overlong_penalty_is_linear_in_the_buffer():
    # max 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at 10
    lengths = T([3, 6, 7, 8, 10])
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, 1.0), T([0.0, 0.0, -0.25, -0.5, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, 2.0), T([0.0, 0.0, -0.5, -1.0, -2.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 10, 0, 1.0), T([0.0, 0.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong_penalty(lengths, 10, 11, 1.0)


def test_overlong_mask_drops_truncated_samples():
    assert overlong_mask(T([True, False, True])).tolist() == [0.0, 1.0, 0.0]
