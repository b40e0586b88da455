"""Loss aggregation, policy / value losses and logprob / entropy helpers against hand-computed numbers."""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from rlhf.algorithms.losses import (
    LOSS_AGG_MODES,
    aggregate,
    loss_normalizers,
    policy_loss,
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
    value_loss,
)
from rlhf.config.schema import AlgorithmConfig

T = torch.tensor
LN = math.log


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------ aggregate
VALUES = T([[1.0, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]])
MASK = T([[0.0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])  # row 2 has no loss tokens (e.g. overlong-filtered)


def test_aggregate_modes_by_hand():
    close(aggregate(VALUES, MASK, "token_mean"), 26 / 5)  # (2 + 3 + 6 + 7 + 8) / 5
    close(aggregate(VALUES, MASK, "seq_mean_token_mean"), 4.75)  # (2.5 + 7) / 2: the empty row does not count
    close(aggregate(VALUES, MASK, "seq_mean_token_sum_norm", constant=4), 3.25)  # (5/4 + 21/4) / 2
    assert loss_normalizers(MASK) == (5.0, 2.0)


def test_aggregate_errors_name_the_config_key():
    with pytest.raises(ValueError, match="algorithm.loss_agg"):
        aggregate(VALUES, MASK, "sum")
    with pytest.raises(ValueError, match="loss_agg_constant"):
        aggregate(VALUES, MASK, "seq_mean_token_sum_norm")


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batches_with_global_normalisers_add_up_to_the_full_batch(mode):
    torch.manual_seed(0)
    values = torch.randn(6, 7)
    lengths = [3, 6, 1, 0, 4, 5]  # one prompt token, then responses of different lengths, then padding
    mask = torch.zeros(6, 7)
    for i, n in enumerate(lengths):
        mask[i, 1 : 1 + n] = 1.0
    full = aggregate(values, mask, mode, constant=8)
    num_tokens, num_sequences = loss_normalizers(mask)
    # uneven micro-batches, each trimmed to its own width as a learner's packer would
    total = 0.0
    for p in (slice(0, 1), slice(1, 4), slice(4, 6)):
        width = 1 + max(lengths[p])
        total = total + aggregate(
            values[p, :width],
            mask[p, :width],
            mode,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            constant=8,
        )
    torch.testing.assert_close(total, full, atol=1e-6, rtol=1e-6)
    # and the same split without the global normalisers is not the full-batch loss
    parts = (slice(0, 1), slice(1, 4), slice(4, 6))
    naive = sum(aggregate(values[p], mask[p], mode, constant=8) for p in parts)
    assert not torch.allclose(naive, full)


# ---------------------------------------------------------------------------------------------- policy loss
def _token_case():
    # ratios 1.5, 0.5, 1.5, 0.5, 1.1 on tokens 1..5; position 0 is the prompt (junk values, masked out)
    old = T([[-1.0, -1.0, -2.0, -1.0, -2.0, -1.5]])
    logp = old + T([[50.0, LN(1.5), LN(0.5), LN(1.5), LN(0.5), LN(1.1)]])
    adv = T([[7.0, 1.0, -1.0, -1.0, 1.0, 2.0]])
    mask = T([[0.0, 1, 1, 1, 1, 1]])
    return logp.requires_grad_(), old, adv, mask


def test_ppo_decoupled_clip_both_sides():
    logp, old, adv, mask = _token_case()
    cfg = AlgorithmConfig(clip_low=0.2, clip_high=0.3, loss_agg="token_mean")
    loss, stats = policy_loss(logp, old, adv, mask, cfg)
    # t1: r=1.5, A=+1 -> clipped at 1.3: -1.3 (clip active)
    # t2: r=0.5, A=-1 -> clipped at 0.8: +0.8 (clip active)
    # t3: r=1.5, A=-1 -> unclipped +1.5;  t4: r=0.5, A=+1 -> unclipped -0.5;  t5: r=1.1, A=2 -> -2.2
    close(loss, (-1.3 + 0.8 + 1.5 - 0.5 - 2.2) / 5)
    close(stats["pg_loss"], -0.34)
    close(stats["clip_frac"], 0.4)
    close(stats["ratio_mean"], 5.1 / 5)
    # approx_kl = mean of r - 1 - log r: 0.094535, 0.193147, 0.094535, 0.193147, 0.004690
    close(stats["approx_kl"], 0.580054 / 5)
    close(stats["num_tokens"], 5.0)
    assert set(stats) == {"pg_loss", "clip_frac", "ratio_mean", "approx_kl", "num_tokens"}
    assert all(not v.requires_grad for v in stats.values())
    # d loss / d logp_t = -A r / 5 on unclipped tokens, 0 where the clip is active or off the mask
    loss.backward()
    close(logp.grad, [[0, 0, 0, 0.3, -0.1, -0.44]])


def test_gspo_sequence_ratio_and_clip():
    old = torch.zeros(2, 4)
    delta = T([[9.0, 0.2, -0.1, 9.0], [9.0, 0.001, -0.001, 0.0003]])  # position 0 and padding are junk
    logp = (old + delta).requires_grad_()
    mask = T([[0.0, 1, 1, 0], [0, 1, 1, 1]])
    adv = T([[0.0, 1, 1, 0], [0, -1, -1, -1]])
    cfg = AlgorithmConfig(
        ratio_level="sequence", clip_low=3e-4, clip_high=4e-4, loss_agg="seq_mean_token_mean"
    )
    loss, stats = policy_loss(logp, old, adv, mask, cfg)
    # row 0: s = exp((0.2 - 0.1) / 2) = exp(0.05) = 1.051271 > 1.0004, A = +1 -> clipped: -1.0004
    # row 1: s = exp((0.001 - 0.001 + 0.0003) / 3) = exp(1e-4) = 1.0001 (inside), A = -1 -> +1.0001
    close(loss, (-1.0004 + 1.0001) / 2, atol=1e-6)
    close(stats["clip_frac"], 2 / 5)  # row 0's two tokens
    close(stats["ratio_mean"], (2 * 1.051271 + 3 * 1.0001) / 5)
    loss.backward()
    # row 1: d/dlogp_t [-A exp(mean_t delta)] / 2 sequences = 1.0001 / 3 / 2; row 0 clipped: 0
    g = 1.0001 / 6
    close(logp.grad, [[0, 0, 0, 0], [0, g, g, g]], atol=1e-6)


def test_truncated_importance_sampling():
    old = torch.zeros(1, 4)
    logp = old.clone().requires_grad_()  # ratio 1: only the TIS weight matters
    # raw weights exp(old - rollout) = 3, 1.5, 0.5 -> capped at 2: 2, 1.5, 0.5
    rollout = T([[0.0, -LN(3.0), -LN(1.5), LN(2.0)]])
    mask = T([[0.0, 1, 1, 1]])
    adv = T([[0.0, 1, 1, 1]])
    cfg = AlgorithmConfig(tis_cap=2.0, clip_low=10.0, clip_high=10.0)
    loss, stats = policy_loss(logp, old, adv, mask, cfg, rollout_logprobs=rollout)
    close(loss, -(2 + 1.5 + 0.5) / 3)
    close(stats["pg_loss"], -(2 + 1.5 + 0.5) / 3)  # the weighted loss that is optimised
    close(stats["tis_weight_mean"], 4 / 3)
    # k3(rollout vs old) = w - 1 - log w: 0.901388, 0.094535, 0.193147
    close(stats["mismatch_kl"], 1.189070 / 3)
    loss.backward()
    close(logp.grad, [[0, -2 / 3, -0.5, -1 / 6]])  # the weight is a constant for the gradient
    # without tis_cap the mismatch is still reported but the loss is unweighted
    loss, stats = policy_loss(logp, old, adv, mask, AlgorithmConfig(), rollout_logprobs=rollout)
    close(loss, -1.0)
    assert "tis_weight_mean" not in stats and "mismatch_kl" in stats


def test_kl_penalty_in_loss_and_entropy_bonus():
    old = T([[0.0, -1.0, -2.0]])
    logp = old.clone().requires_grad_()
    ref = T([[5.0, -1.5, -1.8]])  # d = logp - ref = +0.5, -0.2
    mask = T([[0.0, 1, 1]])
    adv = torch.zeros(1, 3)  # no policy-gradient term
    entropy = T([[9.0, 2.0, 1.0]])
    cfg = AlgorithmConfig(kl_coef=0.1, kl_estimator="k1", kl_in="loss", entropy_coef=0.01)
    loss, stats = policy_loss(logp, old, adv, mask, cfg, ref_logprobs=ref, entropy=entropy)
    # 0.1 * mean(0.5, -0.2) - 0.01 * mean(2, 1) = 0.015 - 0.015
    close(loss, 0.0)
    close(stats["kl"], 0.15)
    close(stats["entropy"], 1.5)
    # kl_in: reward -> the KL is already in the advantages, not in the loss
    loss, stats = policy_loss(
        logp, old, adv, mask, AlgorithmConfig(kl_coef=0.1, kl_in="reward"), ref_logprobs=ref
    )
    close(loss, 0.0)
    assert "kl" not in stats
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logp, old, adv, mask, AlgorithmConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, old, adv, mask, AlgorithmConfig(entropy_coef=0.1))


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_policy_loss_micro_batch_split(mode, ratio_level):
    torch.manual_seed(1)
    B, L = 5, 6
    old = -torch.rand(B, L) * 3
    logp = old + 0.3 * torch.randn(B, L)
    ref = old + 0.1 * torch.randn(B, L)
    rollout = old + 0.2 * torch.randn(B, L)
    adv = torch.randn(B, 1).expand(B, L).contiguous()
    mask = (torch.rand(B, L) > 0.3).float()
    mask[:, 0] = 0
    cfg = AlgorithmConfig(
        ratio_level=ratio_level,
        loss_agg=mode,
        loss_agg_constant=6,
        kl_coef=0.05,
        tis_cap=1.5,
        entropy_coef=0.01,
    )
    entropy = torch.rand(B, L)
    kw = dict(ref_logprobs=ref, rollout_logprobs=rollout, entropy=entropy)
    full, _ = policy_loss(logp, old, adv, mask, cfg, **kw)
    num_tokens, num_sequences = loss_normalizers(mask)
    total = 0.0
    for p in (slice(0, 2), slice(2, 3), slice(3, 5)):
        part, _ = policy_loss(
            logp[p],
            old[p],
            adv[p],
            mask[p],
            cfg,
            **{k: v[p] for k, v in kw.items()},
            num_tokens=num_tokens,
            num_sequences=num_sequences,
        )
        total = total + part
    torch.testing.assert_close(total, full, atol=1e-6, rtol=1e-6)


def test_policy_loss_config_errors():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="algorithm.ratio_level"):
        policy_loss(x, x, x, x, AlgorithmConfig(ratio_level="token_x"))
    with pytest.raises(ValueError, match="loss_agg_constant"):
        policy_loss(x, x, x, x, AlgorithmConfig(loss_agg="seq_mean_token_sum_norm"))
    with pytest.raises(ValueError, match="must all be"):
        policy_loss(x, torch.zeros(1, 4), x, x, AlgorithmConfig())


# ----------------------------------------------------------------------------------------------- value loss
def test_value_loss_clipping():
    values = T([[9.0, 1.0, 2.0, 0.5]]).requires_grad_()
    old = T([[9.0, 0.8, 1.0, 0.5]])
    returns = T([[0.0, 1.2, 3.0, 0.0]])
    mask = T([[0.0, 1, 1, 1]])
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    # t1: (1 - 1.2)^2 = 0.04 both ways; t2: max((2 - 3)^2, (1.2 - 3)^2) = 3.24 (clip wins); t3: 0.25
    close(loss, 0.5 * (0.04 + 3.24 + 0.25) / 3)
    close(stats["value_clip_frac"], 1 / 3)
    close(stats["value_mean"], 3.5 / 3)
    loss.backward()
    # d/dv 0.5 (v - R)^2 / 3 = (v - R) / 3; the clipped token gets none
    close(values.grad, [[0, -0.2 / 3, 0, 0.5 / 3]])
    loss, _ = value_loss(values, old, returns, mask, clip=None)
    close(loss, 0.5 * (0.04 + 1.0 + 0.25) / 3)
    loss, _ = value_loss(values, old, returns, mask, clip=0.2, num_tokens=6)
    close(loss, 0.5 * (0.04 + 3.24 + 0.25) / 6)


# ---------------------------------------------------------------------------------- logprobs and entropy
def _logits():
    # logits[:, 0] uniform over 3 -> predicts token 1; logits[:, 1] -> probs [0.25, 0.5, 0.25] -> token 2
    return T([[[0.0, 0.0, 0.0], [0.0, LN(2.0), 0.0], [5.0, -3.0, 1.0]]])


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 1024])
def test_token_logprobs_alignment(chunk_size):
    ids = T([[2, 0, 1]])
    out = token_logprobs(_logits(), ids, chunk_size=chunk_size)
    close(out, [[0.0, -LN(3.0), LN(0.5)]])  # position 0 has no prediction


def test_token_logprobs_temperature_and_gradient():
    logits = _logits().requires_grad_()
    ids = T([[2, 0, 1]])
    # logits / 2 at t=1: [0, log(2)/2, 0] -> p(1) = sqrt(2) / (2 + sqrt(2)) = 0.414214
    close(token_logprobs(logits, ids, temperature=2.0)[:, 2], [LN(0.414214)])
    token_logprobs(logits, ids)[0, 2].backward()
    # d log p(1) / d logits = onehot(1) - p
    close(logits.grad[0, 1], [-0.25, 0.5, -0.25])
    close(logits.grad[0, 2], [0.0, 0.0, 0.0])


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_token_entropy(chunk_size):
    uniform = torch.zeros(2, 5, 8)
    close(token_entropy(uniform, chunk_size=chunk_size), [[0.0] + [LN(8.0)] * 4] * 2)
    # [0.25, 0.5, 0.25]: 0.5 log 4 + 0.5 log 2 = 1.039721
    close(token_entropy(_logits(), chunk_size=chunk_size)[:, :3], [[0.0, LN(3.0), 1.039721]])


def _can_compile() -> bool:
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.mark.parametrize(
    "compiled",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(not _can_compile(), reason="torch.compile on CPU needs a C compiler"),
        ),
    ],
)
@pytest.mark.parametrize("chunk_size", [None, 2, 7])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy_match_log_softmax(chunk_size, temperature, compiled):
    """The chunked forward/backward (eager or torch.compile'd) equals autograd through a plain log_softmax."""
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (3, 6))
    weights = torch.randn(3, 6, dtype=torch.float64)

    logp, entropy = token_logprobs_and_entropy(
        logits, ids, temperature=temperature, chunk_size=chunk_size, compiled=compiled
    )
    (logp * weights).sum().backward()
    grad = logits.grad.clone()

    ref_logits = logits.detach().clone().requires_grad_()
    log_softmax = torch.log_softmax(ref_logits[:, :-1] / temperature, dim=-1)
    ref = F.pad(log_softmax.gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0))
    (ref * weights).sum().backward()
    ref_entropy = F.pad(-(log_softmax.exp() * log_softmax).sum(-1), (1, 0))

    assert logp.dtype == torch.float32 and not entropy.requires_grad
    # The log-prob-only entry point (no entropy passes) gives the same numbers.
    only = token_logprobs(
        logits.detach(), ids, temperature=temperature, chunk_size=chunk_size, compiled=compiled
    )
    torch.testing.assert_close(only, logp.detach(), atol=0.0, rtol=0.0)
    close(logp, ref.detach())
    close(entropy, ref_entropy.detach())
    torch.testing.assert_close(grad, ref_logits.grad, atol=1e-5, rtol=1e-5)  # float32 inside
    assert grad[:, -1].abs().max() == 0  # the last position predicts nothing


def test_token_logprobs_bf16_gradient_dtype_and_logits_untouched():
    logits = torch.randn(2, 4, 9, dtype=torch.bfloat16, requires_grad=True)
    before = logits.detach().clone()
    token_logprobs(logits, torch.randint(0, 9, (2, 4))).sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad).all()
    assert torch.equal(logits.detach(), before)
    # float32 logits: the eager backward must copy before working in place
    logits32 = torch.randn(2, 4, 9, requires_grad=True)
    before = logits32.detach().clone()
    token_logprobs(logits32, torch.randint(0, 9, (2, 4)), temperature=0.5).sum().backward()
    assert torch.equal(logits32.detach(), before)


def test_decoupled_ppo_weights_by_behaviour_and_drops_tokens_above_the_cap():
    """Decoupled PPO (AReaL): pg_t = w_t * PPO_t with w_t = pi_prox / pi_behav, tokens with w_t > cap left out."""
    prox = torch.zeros(1, 4)  # pi_old here is the proximal policy: the learner before this update
    logp = prox.clone().requires_grad_()  # ratio 1 against pi_prox
    behav = T([[0.0, -LN(3.0), -LN(1.5), LN(2.0)]])  # w = 3, 1.5, 0.5
    mask = T([[0.0, 1, 1, 1]])
    adv = T([[0.0, 1, 1, 1]])
    cfg = AlgorithmConfig(off_policy_correction="decoupled_ppo", tis_cap=2.0, clip_low=10.0, clip_high=10.0)
    loss, stats = policy_loss(logp, prox, adv, mask, cfg, rollout_logprobs=behav)
    # w = 3 exceeds the cap: that token is dropped (weight 0), not clipped to 2 as TIS would
    close(loss, -(0 + 1.5 + 0.5) / 3)
    close(stats["tis_weight_mean"], 2 / 3)
    loss.backward()
    close(logp.grad, [[0, 0, -0.5, -1 / 6]])
    # without a cap every token keeps its full weight
    logp.grad = None
    cfg = AlgorithmConfig(off_policy_correction="decoupled_ppo", clip_low=10.0, clip_high=10.0)
    loss, _ = policy_loss(logp, prox, adv, mask, cfg, rollout_logprobs=behav)
    close(loss, -(3 + 1.5 + 0.5) / 3)
    # the proximal ratio is clipped as in PPO, the behaviour weight multiplies the clipped objective
    cfg = AlgorithmConfig(off_policy_correction="decoupled_ppo", clip_low=0.2, clip_high=0.2)
    moved = (prox + LN(1.5) * mask).requires_grad_()  # ratio 1.5 -> clipped at 1.2 for A > 0
    loss, _ = policy_loss(moved, prox, adv, mask, cfg, rollout_logprobs=behav)
    close(loss, -(3 * 1.2 + 1.5 * 1.2 + 0.5 * 1.2) / 3)


def test_off_policy_correction_auto():
    from rlhf.algorithms.losses import off_policy_correction
    from rlhf.algorithms.old_logprobs import engine_logprobs_needed

    assert off_policy_correction(AlgorithmConfig()) == "none"
    assert off_policy_correction(AlgorithmConfig(), max_staleness=1) == "decoupled_ppo"
    assert off_policy_correction(AlgorithmConfig(tis_cap=2.0), max_staleness=1) == "tis"
    assert off_policy_correction(AlgorithmConfig(off_policy_correction="none"), max_staleness=2) == "none"
    assert not engine_logprobs_needed(AlgorithmConfig())  # the default: the engines return no logprobs
    assert engine_logprobs_needed(AlgorithmConfig(), max_staleness=1)  # the behaviour policy is needed
    assert engine_logprobs_needed(AlgorithmConfig(recompute_old_logprobs=False))
    with pytest.raises(ValueError, match="off_policy_correction"):
        off_policy_correction(AlgorithmConfig(off_policy_correction="magic"))


def test_old_logprob_sources():
    from rlhf.algorithms import old_logprobs

    assert old_logprobs.source(AlgorithmConfig(), has_reference=False) == "training_pass"
    assert old_logprobs.source(AlgorithmConfig(ppo_epochs=2), has_reference=False) == "learner_pass"
    assert old_logprobs.source(AlgorithmConfig(mini_batches=4), has_reference=False) == "learner_pass"
    assert (
        old_logprobs.source(AlgorithmConfig(kl_coef=0.1, kl_in="reward"), has_reference=True)
        == "learner_pass"
    )
    assert (
        old_logprobs.source(AlgorithmConfig(kl_coef=0.1, kl_in="loss"), has_reference=True) == "training_pass"
    )
    assert (
        old_logprobs.source(AlgorithmConfig(recompute_old_logprobs=True), has_reference=False)
        == "learner_pass"
    )
    assert old_logprobs.source(AlgorithmConfig(recompute_old_logprobs=False), has_reference=False) == "engine"
