"""Padding-free micro-batches (`trainer.packing`): the same numbers as right-padded rows.

The sequences of a micro-batch run as one row of their real tokens with position ids restarting per
sequence; the per-token results are scattered back to the padded layout, so the losses see the same
tensors. Checked in fp32 on CPU, with rows of uneven lengths, for the policy's training step, the
reference's logprobs and the critic's values and value loss. The learners run in this process
(rank 0 of a world of one on gloo), as in tests/test_learner_reference.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from rlhf.trainer.packing import pack_micro_batches, pack_rows, row_lengths, unpack_rows

from rlhf.config.schema import RunConfig
from rlhf.testing import random_train_batch, whole_batch_step
from rlhf.types import TrainBatch

in_process_learners = pytest.mark.skipif(
    os.environ.get("DS_ACCELERATOR") != "cpu",
    reason="in-process CPU learners need DS_ACCELERATOR=cpu before DeepSpeed is imported (scripts/test.sh)",
)


# ---------------------------------------------------------------------------------------------- units
def test_pack_rows_and_unpack_rows_round_trip():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    packed, positions = pack_rows(ids, mask)
    assert packed.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    values = torch.arange(9, dtype=torch.float32)[None].requires_grad_()
    back = unpack_rows(values, mask)
    assert back.tolist() == [[0, 1, 2, 0], [3, 4, 0, 0], [5, 6, 7, 8]]
    back.sum().backward()  # differentiable: every packed value reaches exactly one padded slot
    assert values.grad.tolist() == [[1.0] * 9]


def test_packed_micro_batches_count_real_tokens():
    lengths = [10, 3, 7, 2, 8]
    packed = pack_micro_batches(lengths, 12, padded=False)
    assert sorted(i for mb in packed for i in mb) == list(range(5))
    assert all(sum(lengths[i] for i in mb) <= 12 for mb in packed)
    assert len(packed) == 3  # 30 tokens in budgets of 12: [10, 2], [8, 3], [7]
    # Padded, the same rows cost rows x longest: 5 micro-batches would be needed at most, 4 here.
    assert len(pack_micro_batches(lengths, 12)) > len(packed)
    # A row above the budget still runs, alone.
    assert pack_micro_batches([20, 3], 12, padded=False) == [[0], [1]]


# ---------------------------------------------------------------------------------------------- learners
def uneven_batch(seed: int = 0, rows: int = 7, width: int = 30) -> TrainBatch:
    """Random rows with a reference, critic values and returns too (every pass has its inputs)."""
    g = torch.Generator().manual_seed(seed)
    b = random_train_batch(rows, width, 4, g)
    b.ref_logprobs = (b.old_logprobs - 0.1) * b.loss_mask
    b.values = 0.1 * torch.randn(rows, width, generator=g) * b.attention_mask
    b.returns = torch.randn(rows, width, generator=g) * b.loss_mask
    return b


def learner(role: str, packing: bool, model_dir: str):
    import socket

    from rlhf.trainer.learner import Learner

    cfg = RunConfig()
    cfg.steps = 2
    cfg.model.dtype = "float32"
    cfg.placement.device = "cpu"
    cfg.rollout.sampling.temperature = 0.7
    cfg.trainer.zero_stage = 0
    cfg.trainer.lr = 1e-3
    cfg.trainer.critic.lr = 1e-3
    cfg.algorithm.kl_coef = 0.05  # the KL term is in the loss too
    cfg.trainer.packing = packing
    cfg.trainer.micro_batch_tokens = 64  # several micro-batches, packed ones unlike padded ones
    cfg.algorithm.entropy_coef = 0.01  # the entropy goes through autograd too
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Learner(cfg, model_dir, role, "cpu", 0, 1, "127.0.0.1", port)


def one_step(lrn, batch: TrainBatch) -> tuple[dict, dict]:
    (stats,) = lrn.train(batch, [whole_batch_step(batch, 64, padded=not lrn.packing)])
    return stats, lrn.full_state_dict()


@pytest.mark.slow
@in_process_learners
def test_packed_passes_equal_padded_ones(in_process, tiny_model_dir):
    batch = uneven_batch()
    assert len(set(row_lengths(batch))) > 3  # uneven lengths, so padding would matter

    # Policy: logprobs, then one optimizer step (loss, gradient norm, the weights after it).
    packed, padded = learner("policy", True, tiny_model_dir), learner("policy", False, tiny_model_dir)
    lp_packed, lp_padded = packed.logprobs(batch), padded.logprobs(batch)
    assert lp_padded.abs().sum() > 0
    torch.testing.assert_close(lp_packed, lp_padded, rtol=1e-5, atol=1e-5)
    (stats_a, state_a), (stats_b, state_b) = one_step(packed, batch), one_step(padded, batch)
    assert stats_a["loss"] == pytest.approx(stats_b["loss"], rel=1e-5, abs=1e-7)
    assert stats_a["grad_norm"] == pytest.approx(stats_b["grad_norm"], rel=1e-5)
    for key in ("entropy", "clip_frac"):
        if key in stats_a["weighted"]:
            assert stats_a["weighted"][key] == pytest.approx(stats_b["weighted"][key], rel=1e-5, abs=1e-7)
    for name in state_b:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-5, atol=1e-5)

    # Reference: the frozen model's logprobs at temperature 1 (what the audit asks for).
    ref_packed, ref_padded = (
        learner("reference", True, tiny_model_dir),
        learner("reference", False, tiny_model_dir),
    )
    torch.testing.assert_close(
        ref_packed.logprobs(batch, temperature=1.0),
        ref_padded.logprobs(batch, temperature=1.0),
        rtol=1e-5,
        atol=1e-5,
    )

    # Critic: values (0 on each sequence's first token and on padding), then one value-loss step.
    critic_packed, critic_padded = (
        learner("critic", True, tiny_model_dir),
        learner("critic", False, tiny_model_dir),
    )
    with torch.no_grad():  # a fresh head starts at V = 0: give it weights so the values differ per token
        for lrn in (critic_packed, critic_padded):
            torch.manual_seed(0)
            for p in lrn.engine.module.head.parameters():
                p.copy_(torch.randn_like(p) * 0.1)
    v_packed, v_padded = critic_packed.values(batch), critic_padded.values(batch)
    assert v_padded.abs().sum() > 0
    assert (v_packed[:, 0] == 0).all()
    torch.testing.assert_close(v_packed, v_padded, rtol=1e-5, atol=1e-5)
    (stats_a, state_a), (stats_b, state_b) = one_step(critic_packed, batch), one_step(critic_padded, batch)
    assert stats_a["loss"] == pytest.approx(stats_b["loss"], rel=1e-5, abs=1e-7)
    assert stats_a["grad_norm"] == pytest.approx(stats_b["grad_norm"], rel=1e-5)
    for name in state_b:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-5, atol=1e-5)


def test_packed_attention_equals_block_diagonal_sdpa():
    """The attention function keeps each sequence to itself: equal to SDPA with a block-diagonal causal
    mask, grouped-query heads included."""
    from rlhf.trainer.attention import packed_attention, sequence_bounds

    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    bounds, longest = sequence_bounds(positions)
    assert bounds.tolist() == [0, 5, 6, 15, 18] and bounds.dtype == torch.int32 and longest == 9
    n, heads, kv_heads, dim = sum(lengths), 4, 2, 8
    q = torch.randn(1, heads, n, dim, generator=g)
    k, v = (torch.randn(1, kv_heads, n, dim, generator=g) for _ in range(2))
    out, _ = packed_attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=bounds, max_length_q=longest)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal = torch.ones(n, n).tril().bool()
    mask = causal & (seq[:, None] == seq[None, :])
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True
    ).transpose(1, 2)
    assert out.shape == (1, n, heads, dim)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_padding_fraction_of_a_plan():
    from rlhf.trainer.group import padding_fraction

    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    shard = TrainBatch(mask.clone(), mask, mask.float(), None, torch.zeros(3, 4), torch.zeros(3))
    steps = [[{"micro_batches": [[0, 1], [2]]}]]
    # micro-batch [0, 1]: 6 real tokens of 2 x 4 computed; [2]: 1 of 1 -> 1 - 7 / 9
    assert padding_fraction([shard], steps, packed=False) == pytest.approx(2 / 9)
    assert padding_fraction([shard], steps, packed=True) == 0.0
