"""GAE against hand-computed recursions."""

import pytest
import torch

from rlhf.algorithms.gae import gae, whiten

T = torch.tensor


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_gamma_lambda_one_is_returns_to_go_minus_values():
    # response = positions 1..3, position 0 is the prompt, 4 is padding
    rewards = T([[0.0, 0.1, 0.2, 1.0, 0.0]])
    values = T([[5.0, 0.5, 0.6, 0.7, 9.0]])
    mask = T([[0.0, 1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # returns-to-go 1.3, 1.2, 1.0
    close(ret, [[0, 1.3, 1.2, 1.0, 0]])
    close(adv, [[0, 0.8, 0.6, 0.3, 0]])


def test_discounted_recursion_by_hand():
    # t=2: delta = 1 - 0.4 = 0.6, A = 0.6
    # t=1: delta = 0.9 * 0.4 - 0.5 = -0.14, A = -0.14 + 0.9 * 0.8 * 0.6 = 0.292
    rewards = T([[0.0, 0.0, 1.0, 0.0]])
    values = T([[3.0, 0.5, 0.4, 7.0]])
    mask = T([[0.0, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[0, 0.292, 0.6, 0]])
    close(ret, [[0, 0.792, 1.0, 0]])


def test_rows_with_different_prompt_lengths_and_padding():
    # the same 2-token episode as above, starting at t=1 in row 0 and at t=3 in row 1
    rewards = T([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    values = T([[3.0, 0.5, 0.4, 7.0, 7.0, 7.0], [3.0, 3.0, 3.0, 0.5, 0.4, 7.0]])
    mask = T([[0.0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[0, 0.292, 0.6, 0, 0, 0], [0, 0, 0, 0.292, 0.6, 0]])
    close(ret, [[0, 0.792, 1.0, 0, 0, 0], [0, 0, 0, 0.792, 1.0, 0]])


def test_positions_off_the_mask_are_skipped():
    # a masked-out token (e.g. tool output) between two response tokens: its reward and value are ignored
    rewards = T([[0.0, 0.0, 5.0, 1.0]])
    values = T([[3.0, 0.5, 100.0, 0.4]])
    mask = T([[0.0, 1, 0, 1]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[0, 0.292, 0, 0.6]])
    close(ret, [[0, 0.792, 0, 1.0]])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_whiten_over_masked_entries():
    # masked entries 1, 2, 3: mean 2, population var 2/3
    close(whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1, 1, 0]])), [[-1.224745, 0, 1.224745, 0]], atol=1e-5)
    # shift_mean=False keeps the mean: 2 + [-1.224745, 0, 1.224745]
    close(
        whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1, 1, 0]]), shift_mean=False),
        [[0.775255, 2, 3.224745, 0]],
        atol=1e-5,
    )
