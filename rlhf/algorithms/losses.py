"""Policy and value losses, loss aggregation, and per-token log-probs / entropy from logits.

Per-token tensors are [B, T] aligned with `input_ids`: position t is about token t; `mask` is 1.0 on the
response tokens that enter the loss. Every loss is "per-token loss -> aggregate(mode)".

Loss aggregations (`algorithm.loss_agg`) and off-policy corrections (`algorithm.off_policy_correction`)
are registered by name in `rlhf.algorithms.registry` (`@register_loss_aggregation`, `@register_correction`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.algorithms.kl import MAX_LOG_RATIO, kl_estimate
from rlhf.algorithms.registry import (
    LOSS_AGGREGATIONS,
    AlgorithmConfig,
    register_correction,
    register_loss_aggregation,
)
from rlhf.algorithms.registry import OFF_POLICY_CORRECTIONS as CORRECTIONS


# ---------------------------------------------------------------------------------------------- aggregation
def loss_normalizers(mask: Tensor) -> tuple[float, float]:
    """(num_tokens, num_sequences) of a batch, the defaults `aggregate` uses.

    A learner that splits a batch into micro-batches (and data-parallel ranks) computes these once on the
    whole batch (summing them over ranks) and passes them to every micro-batch's loss: the micro-batch losses
    then add up to the loss of the whole batch. Sequences without loss tokens do not count.
    """
    mask = mask.float()
    return float(mask.sum()), float((mask.sum(dim=1) > 0).sum())


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    *,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    constant: float | None = None,
) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    token_mean               sum_{i,t} x_it m_it / num_tokens                  (DAPO: every token counts once)
    seq_mean_token_mean      sum_i [sum_t x_it m_it / sum_t m_it] / num_sequences   (GRPO: every sample once)
    seq_mean_token_sum_norm  sum_i [sum_t x_it m_it / constant] / num_sequences     (Dr. GRPO: no length bias)

    Each mode is a sum over sequences divided by a batch-level normaliser (num_tokens / num_sequences,
    defaults from `loss_normalizers(mask)`), which is what makes micro-batch losses add up exactly.
    """
    if values.shape != mask.shape:
        raise ValueError(f"aggregate: values {tuple(values.shape)} vs mask {tuple(mask.shape)}")
    entry = LOSS_AGGREGATIONS.get(mode)
    # float32 masks: a bf16 sum of ones is no longer exact beyond 256 tokens.
    return entry(values, mask.float(), num_tokens=num_tokens, num_sequences=num_sequences, constant=constant)


def _sequences(mask: Tensor, num_sequences: float | None):
    """The divisor of the per-sequence modes: the sequences with loss tokens, at least 1."""
    if num_sequences is None:
        return (mask.sum(dim=1) > 0).sum().clamp(min=1)
    return max(float(num_sequences), 1.0)


@register_loss_aggregation("token_mean")
def token_mean(values: Tensor, mask: Tensor, *, num_tokens=None, num_sequences=None, constant=None) -> Tensor:
    """`sum_{i,t} x_it m_it / N_tokens`: every token counts once (DAPO, PPO)."""
    token_sums = (values.float() * mask).sum(dim=1)
    n = mask.sum().clamp(min=1) if num_tokens is None else max(float(num_tokens), 1.0)
    return token_sums.sum() / n


@register_loss_aggregation("seq_mean_token_mean")
def seq_mean_token_mean(
    values: Tensor, mask: Tensor, *, num_tokens=None, num_sequences=None, constant=None
) -> Tensor:
    """`(1/N_seq) sum_i [sum_t x_it m_it / sum_t m_it]`: every sample counts once (GRPO, GSPO, RLOO)."""
    token_sums = (values.float() * mask).sum(dim=1)
    return (token_sums / mask.sum(dim=1).clamp(min=1)).sum() / _sequences(mask, num_sequences)


@register_loss_aggregation("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(
    values: Tensor, mask: Tensor, *, num_tokens=None, num_sequences=None, constant=None
) -> Tensor:
    """`(1/N_seq) sum_i [sum_t x_it m_it / loss_agg_constant]`: no length bias (Dr. GRPO)."""
    token_sums = (values.float() * mask).sum(dim=1)
    n = _sequences(mask, num_sequences)
    if constant is None or constant <= 0:
        raise ValueError(
            "loss_agg 'seq_mean_token_sum_norm' needs a positive constant "
            f"(algorithm.loss_agg_constant, normally rollout.sampling.max_new_tokens); got {constant!r}"
        )
    return (token_sums / constant).sum() / n


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Detached mean over the masked entries (0 when the mask is empty): the form of every logged stat."""
    mask = mask.float()
    return ((values.float() * mask).sum() / mask.sum().clamp(min=1)).detach()


# The built-in names (more can be registered).
LOSS_AGG_MODES = LOSS_AGGREGATIONS.names()


# ---------------------------------------------------------------------------------------------- policy loss
def _behaviour_weight(old_logprobs: Tensor, rollout_logprobs: Tensor) -> Tensor:
    """w_t = pi_old(y_t) / pi_rollout(y_t) per token (the log-ratio clamped like every ratio here)."""
    return torch.exp((old_logprobs - rollout_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


@register_correction("none")
def no_correction(old_logprobs: Tensor, rollout_logprobs: Tensor, cfg: AlgorithmConfig) -> None:
    """No weight: the tokens count as sampled from pi_old."""
    return None


@register_correction("tis")
def truncated_importance_sampling(
    old_logprobs: Tensor, rollout_logprobs: Tensor, cfg: AlgorithmConfig
) -> Tensor:
    """Truncated importance sampling: `min(pi_old / pi_rollout, tis_cap)` per token (needs `tis_cap`)."""
    # Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training": tokens
    # were sampled by the engine, not by pi_old.
    return _behaviour_weight(old_logprobs, rollout_logprobs).clamp(max=cfg.tis_cap)


@register_correction("decoupled_ppo")
def decoupled_ppo(old_logprobs: Tensor, rollout_logprobs: Tensor, cfg: AlgorithmConfig) -> Tensor:
    """Decoupled PPO: `pi_old / pi_behav` per token; tokens whose weight exceeds `tis_cap` (if set) are
    left out."""
    # Fu et al. 2025, AReaL: pi_old is the proximal policy (the learner before this update), the
    # behaviour policy sampled the tokens, possibly several versions ago; tokens whose behaviour weight
    # exceeds the cap are left out rather than clipped.
    weight = _behaviour_weight(old_logprobs, rollout_logprobs)
    if cfg.tis_cap is not None:
        weight = torch.where(weight <= cfg.tis_cap, weight, torch.zeros_like(weight))
    return weight


# The built-in choices of `algorithm.off_policy_correction` (more corrections can be registered).
OFF_POLICY_CORRECTIONS = ("auto", *CORRECTIONS.names())


# The cap of the correction an FP8 engine turns on by itself (`rollout.quantization: fp8`, no `tis_cap`):
# the value of configs/tis.yaml. FP8 engines sample from a slightly different policy than the bf16
# learner scores, on every token, so the correction is on wherever the run did not choose one.
QUANTIZED_TIS_CAP = 2.0


def off_policy_correction(cfg: AlgorithmConfig, max_staleness: int = 0, quantized: bool = False) -> str:
    """`algorithm.off_policy_correction` resolved: auto -> tis when tis_cap is set, decoupled_ppo for
    asynchronous runs (max_staleness >= 1), tis for quantized engines (`quantized`: rollout.quantization
    is not `none`), else none."""
    choice = cfg.off_policy_correction
    if choice != "auto":
        CORRECTIONS.get(choice)  # an unknown name raises, listing the registered ones
        return choice
    if cfg.tis_cap is not None:
        return "tis"
    if max_staleness > 0:
        return "decoupled_ppo"
    return "tis" if quantized else "none"


def resolved_algorithm(run_cfg) -> AlgorithmConfig:
    """The learner's `algorithm` settings for the run `run_cfg` (a RunConfig), with what the batch does
    not carry resolved: the loss constant, the off-policy correction and its cap."""
    import dataclasses

    from rlhf.algorithms.old_logprobs import rollout_quantized

    alg, staleness, quantized = run_cfg.algorithm, run_cfg.rollout.max_staleness, rollout_quantized(run_cfg)
    return dataclasses.replace(
        alg,
        loss_agg_constant=alg.loss_agg_constant or run_cfg.rollout.sampling.max_new_tokens,
        off_policy_correction=off_policy_correction(alg, staleness, quantized),
        tis_cap=resolved_tis_cap(alg, staleness, quantized),
    )


def resolved_tis_cap(cfg: AlgorithmConfig, max_staleness: int = 0, quantized: bool = False) -> float | None:
    """`algorithm.tis_cap`, or `QUANTIZED_TIS_CAP` where quantized engines turned `tis` on without one."""
    if cfg.tis_cap is None and off_policy_correction(cfg, max_staleness, quantized) == "tis":
        return QUANTIZED_TIS_CAP
    return cfg.tis_cap


# ---------------------------------------------------------------------------------------------- policy loss (cont.)
def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: AlgorithmConfig,
    *,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (PPO, Schulman et al. 2017) with the GRPO/DAPO/GSPO variations; returns (loss, stats).

        ratio   = pi(y_t) / pi_old(y_t)                                       ratio_level: token
                = exp(mean_t [log pi(y_t) - log pi_old(y_t)])  per sequence   ratio_level: sequence (GSPO)
        pg_t    = -min(ratio A_t, clip(ratio, 1 - clip_low, 1 + clip_high) A_t)   (clip_high > clip_low: DAPO)
        w_t     = pi_old(y_t) / pi_rollout(y_t)  (detached; pi_rollout: the engine that sampled y_t)
        pg_t   *= min(w_t, tis_cap)                        off_policy_correction: tis (truncated IS)
        pg_t   *= w_t, tokens with w_t > tis_cap dropped   off_policy_correction: decoupled_ppo
        loss    = agg(pg) + kl_coef * agg(kl(pi || pi_ref)) - entropy_coef * agg(entropy)

    The KL term applies when kl_coef > 0 and kl_in == "loss" (then `ref_logprobs` is required); the entropy
    term when entropy_coef > 0 (then `entropy` is required). Stats are detached masked token means plus
    `num_tokens`, so a learner can average them over micro-batches weighted by tokens.
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape):
        raise ValueError(
            f"policy_loss: logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)}, "
            f"advantages {tuple(advantages.shape)} and mask {tuple(mask.shape)} must all be [B, T]"
        )
    mask = mask.float()
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    agg = dict(
        mode=cfg.loss_agg, num_tokens=num_tokens, num_sequences=num_sequences, constant=cfg.loss_agg_constant
    )

    log_ratio = logprobs - old_logprobs
    if cfg.ratio_level == "token":
        ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    elif cfg.ratio_level == "sequence":
        # GSPO (Zheng et al. 2025): one length-normalised ratio per sequence, so its clip range is ~1e-4 wide.
        seq_log_ratio = (log_ratio * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        ratio = torch.exp(seq_log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))[:, None].expand_as(log_ratio)
    else:
        raise ValueError(f"algorithm.ratio_level must be 'token' or 'sequence', got {cfg.ratio_level!r}")

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(unclipped, clipped)
    stats = {
        # Tokens where the clipped branch won: their gradient is zero.
        "clip_frac": masked_mean((clipped > unclipped).to(mask.dtype), mask),
        "ratio_mean": masked_mean(ratio, mask),
        # KL(pi_old || pi) on tokens sampled from pi_old.
        "approx_kl": masked_mean(kl_estimate(old_logprobs, logprobs.detach(), "k3"), mask),
        "num_tokens": mask.sum().detach(),
    }

    if rollout_logprobs is not None:
        rollout_logprobs = rollout_logprobs.detach()
        # KL(pi_rollout || pi_old): how far the inference engine's sampler is from the learner's policy.
        stats["mismatch_kl"] = masked_mean(kl_estimate(rollout_logprobs, old_logprobs, "k3"), mask)
        weight = CORRECTIONS.get(off_policy_correction(cfg))(old_logprobs, rollout_logprobs, cfg)
        if weight is not None:
            pg = pg * weight
            stats["tis_weight_mean"] = masked_mean(weight, mask)

    stats["pg_loss"] = masked_mean(pg, mask)
    loss = aggregate(pg, mask, **agg)

    if cfg.kl_coef > 0 and cfg.kl_in == "loss":
        if ref_logprobs is None:
            raise ValueError(
                "algorithm.kl_coef > 0 with algorithm.kl_in: loss needs ref_logprobs (a reference model)"
            )
        kl = kl_estimate(logprobs, ref_logprobs.detach(), cfg.kl_estimator)
        loss = loss + cfg.kl_coef * aggregate(kl, mask, **agg)
        stats["kl"] = masked_mean(kl, mask)

    if entropy is not None:
        stats["entropy"] = masked_mean(entropy, mask)
    if cfg.entropy_coef != 0:
        if entropy is None:
            raise ValueError("algorithm.entropy_coef != 0 needs the per-token entropy (losses.token_entropy)")
        loss = loss - cfg.entropy_coef * aggregate(entropy, mask, **agg)

    return loss, stats


# ----------------------------------------------------------------------------------------------- value loss
def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float | None = 0.2,
    *,
    num_tokens: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), token_mean.

    The clip keeps the critic from moving far from the values that produced the advantages (`clip=None`:
    plain squared error).
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(
            f"value_loss: values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, "
            f"returns {tuple(returns.shape)} and mask {tuple(mask.shape)} must all be [B, T]"
        )
    mask = mask.float()
    old_values, returns = old_values.detach(), returns.detach()
    unclipped = (values - returns).square()
    if clip is None:
        per_token = 0.5 * unclipped
        clipped_wins = torch.zeros_like(unclipped)
    else:
        clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns).square()
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipped_wins = (clipped > unclipped).to(mask.dtype)
    loss = aggregate(per_token, mask, "token_mean", num_tokens=num_tokens)
    stats = {
        "value_loss": masked_mean(per_token, mask),
        "value_clip_frac": masked_mean(clipped_wins, mask),
        "value_mean": masked_mean(values, mask),
        "returns_mean": masked_mean(returns, mask),
        "num_tokens": mask.sum().detach(),
    }
    return loss, stats


# ------------------------------------------------------------------------------------ logprobs and entropy
def _shifted_chunks(logits: Tensor, chunk_size: int | None):
    """Yield (t0, t1, logits[:, t0-1:t1-1]): the logits that predict tokens t0..t1-1 (t >= 1).

    `chunk_size` counts tokens (rows x positions), so a float32 chunk stays ~chunk_size x V whatever B is."""
    B, T = logits.shape[:2]
    step = T if chunk_size is None else max(int(chunk_size) // max(B, 1), 1)
    for t0 in range(1, T, step):
        t1 = min(t0 + step, T)
        yield t0, t1, logits[:, t0 - 1 : t1 - 1]


def token_logprobs(
    logits: Tensor,
    input_ids: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = 1024,
    compiled: bool = False,
) -> Tensor:
    """log p(token_t | tokens < t) for every position, [B, T] float32, aligned with input_ids (position 0 = 0).

    `logits` [B, T, V] are a causal LM's outputs (logits[:, t] predicts token t + 1). Pass the sampling
    temperature so the logprobs match the rollout engine's. See `token_logprobs_and_entropy`.
    """
    _check_shapes(logits, input_ids)
    kernels = _kernels(compiled)
    return _TokenLogprobs.apply(logits, input_ids, float(temperature), chunk_size, kernels, False)[0]


def token_logprobs_and_entropy(
    logits: Tensor,
    input_ids: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = 1024,
    compiled: bool = False,
) -> tuple[Tensor, Tensor]:
    """(log-probs, entropy), both [B, T] float32 aligned with input_ids; the entropy is detached (for logging).

    One autograd function: the forward computes log-probs, logsumexp and entropy in float32, `chunk_size`
    tokens at a time; the backward writes d logp / d logits = (onehot - softmax) / temperature straight
    into one gradient buffer. (Slicing logits per chunk under autograd instead makes every slice's
    backward allocate and add a full [B, T, V] zero tensor and keeps float32 copies for backward.)
    `compiled=True` runs both per-chunk bodies through torch.compile, which fuses them into a few
    passes over the logits with no float32 [B, T, V] temporaries (GPU learners use it; see
    experiments/results/gpu/README.md for the effect on a 150k vocabulary).
    """
    _check_shapes(logits, input_ids)
    kernels = _kernels(compiled)
    return _TokenLogprobs.apply(logits, input_ids, float(temperature), chunk_size, kernels, True)


def _check_shapes(logits: Tensor, input_ids: Tensor) -> None:
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"token_logprobs: logits {tuple(logits.shape)} must be [B, T, V] for input_ids {tuple(input_ids.shape)}"
        )


def _entropy(z: Tensor, norm: Tensor) -> Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v over the last dim, given norm = logsumexp(z)."""
    return norm - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


def _chunk_forward(
    chunk: Tensor, ids: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp, logsumexp, entropy or None) [B, c] of the tokens `ids` [B, c] under logits `chunk` [B, c, V] / T."""
    z = chunk.float() / temperature
    norm = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, ids[..., None]).squeeze(-1) - norm
    return logp, norm, (_entropy(z, norm) if with_entropy else None)


def _chunk_backward(chunk: Tensor, ids: Tensor, norm: Tensor, grad: Tensor, temperature: float) -> Tensor:
    """d loss / d chunk = grad * (onehot(ids) - softmax(z)) / T, in the logits' dtype."""
    probs = torch.exp(chunk.float() / temperature - norm[..., None])
    onehot = torch.arange(chunk.shape[-1], device=chunk.device) == ids[..., None]
    return ((onehot.float() - probs) * (grad[..., None] / temperature)).to(chunk.dtype)


def _chunk_backward_eager(
    chunk: Tensor, ids: Tensor, norm: Tensor, grad: Tensor, temperature: float
) -> Tensor:
    """`_chunk_backward` with one float32 temporary, updated in place (what eager mode can do)."""
    z = chunk.float() if chunk.dtype != torch.float32 else chunk.clone()  # never modify the logits
    g = grad[..., None]
    dz = z.div_(temperature).sub_(norm[..., None]).exp_().mul_(-g)  # -grad * softmax(z)
    dz.scatter_add_(-1, ids[..., None], g)
    return dz.div_(temperature) if temperature != 1.0 else dz


_COMPILED: tuple | None = None


def _kernels(compiled: bool) -> tuple:
    """(forward, backward) chunk kernels: torch.compile'd, or eager with an in-place backward."""
    global _COMPILED
    if not compiled:
        return _chunk_forward, _chunk_backward_eager
    if _COMPILED is None:
        # dynamic: micro-batch shapes change every call; one graph serves them all.
        _COMPILED = (
            torch.compile(_chunk_forward, dynamic=True),
            torch.compile(_chunk_backward, dynamic=True),
        )
    return _COMPILED


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits: Tensor, input_ids: Tensor, temperature: float, chunk_size, kernels, with_entropy
    ):
        """`with_entropy=False` (log-prob passes) skips the entropy's extra passes; it stays 0."""
        forward_kernel = kernels[0]
        B, T = input_ids.shape
        logp = logits.new_zeros(B, T, dtype=torch.float32)
        entropy = logits.new_zeros(B, T, dtype=torch.float32)
        norm = logits.new_zeros(B, T, dtype=torch.float32)
        for t0, t1, chunk in _shifted_chunks(logits, chunk_size):
            logp[:, t0:t1], norm[:, t0:t1], chunk_entropy = forward_kernel(
                chunk, input_ids[:, t0:t1], temperature, with_entropy
            )
            if chunk_entropy is not None:
                entropy[:, t0:t1] = chunk_entropy
        ctx.save_for_backward(logits, input_ids, norm)
        ctx.temperature, ctx.chunk_size, ctx.backward_kernel = temperature, chunk_size, kernels[1]
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None):
        if grad_logp is None:
            return None, None, None, None, None, None
        logits, input_ids, norm = ctx.saved_tensors
        grad = torch.empty_like(logits)
        grad[:, -1:] = 0  # the last position predicts nothing
        for t0, t1, chunk in _shifted_chunks(logits, ctx.chunk_size):
            grad[:, t0 - 1 : t1 - 1] = ctx.backward_kernel(
                chunk, input_ids[:, t0:t1], norm[:, t0:t1], grad_logp[:, t0:t1].float(), ctx.temperature
            )
        return grad, None, None, None, None, None


def token_entropy(logits: Tensor, *, temperature: float = 1.0, chunk_size: int | None = 1024) -> Tensor:
    """Entropy H = logsumexp(z) - sum_v softmax(z)_v z_v of the distribution that produced each token, [B, T]
    float32, aligned like `token_logprobs` (position 0 = 0)."""
    if logits.dim() != 3:
        raise ValueError(f"token_entropy: logits must be [B, T, V], got {tuple(logits.shape)}")
    pieces = [logits.new_zeros(logits.shape[0], min(1, logits.shape[1]), dtype=torch.float32)]
    for _, _, chunk in _shifted_chunks(logits, chunk_size):
        z = chunk.float() / temperature
        pieces.append(_entropy(z, torch.logsumexp(z, dim=-1)))
    return torch.cat(pieces, dim=1)
