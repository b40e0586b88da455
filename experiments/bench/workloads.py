"""Benchmark workloads whose answer lengths do not depend on the system that generates them.

A random-weight model emits its end-of-sequence token about as often as any other of its 150k
tokens, so sampled answers always run to `max_tokens`. `set_eos_rate` rewires such a model so that
at every position it emits EOS with a chosen probability `rate`: answer lengths then follow a
geometric distribution (median ln 2 / rate), cut at the length limit. The lengths come from the
weights alone, so any engine that samples the model at temperature 1 (ours, raw vLLM, TRL's) sees
the same distribution.

How: hidden dimension 0 becomes a constant channel. Every embedding row holds the same value `c`
there and no attention or MLP output writes to it, so after the final norm that dimension is a
nearly constant positive number at every position. The EOS row of the output head reads only that
dimension (with weight `beta`), and no other row reads it (tied embeddings: every row reads the same
`c`, which shifts all logits alike). `beta` is found by bisection on random probe sequences so that
the mean EOS probability is `rate`.
"""

from __future__ import annotations

import math

import torch

CHANNEL = 0


@torch.no_grad()
def set_eos_rate(
    model, eos_id: int, rate: float, probes: int = 8, probe_len: int = 128, seed: int = 0
) -> float:
    """Rewire `model` (a LlamaForCausalLM, random weights) in place to emit `eos_id` with probability
    ~`rate` per position; returns the EOS probability measured on the probes."""
    if not 0 < rate < 1:
        raise ValueError(f"eos rate must be in (0, 1), got {rate}")
    embed = model.model.embed_tokens.weight
    head = model.lm_head.weight
    tied = head.data_ptr() == embed.data_ptr()
    hidden = embed.shape[1]
    scale = float(embed[:, 1:].float().std()) * math.sqrt(hidden)  # an embedding row's norm
    embed[:, CHANNEL] = scale
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[CHANNEL, :] = 0
        layer.mlp.down_proj.weight[CHANNEL, :] = 0
        for bias in (
            getattr(layer.self_attn.o_proj, "bias", None),
            getattr(layer.mlp.down_proj, "bias", None),
        ):
            if bias is not None:
                bias[CHANNEL] = 0
    if not tied:
        head[:, CHANNEL] = 0
    head[eos_id, :] = 0
    base = scale if tied else 0.0  # tied: the EOS row reads the channel like every other row
    head[eos_id, CHANNEL] = base

    g = torch.Generator().manual_seed(seed)
    vocab = head.shape[0]
    ids = torch.randint(0, vocab - 2, (probes, probe_len), generator=g).to(embed.device)
    out = model(input_ids=ids, output_hidden_states=True)
    channel = out.hidden_states[-1][..., CHANNEL].float().flatten()  # after the final norm
    logits = out.logits.float().reshape(-1, vocab)
    others = torch.cat([logits[:, :eos_id], logits[:, eos_id + 1 :]], dim=1).logsumexp(-1)
    eos0 = logits[:, eos_id]

    def mean_p(beta: float) -> float:
        return float(torch.sigmoid(eos0 + beta * channel - others).mean())

    lo, hi = -1.0, 1.0
    while mean_p(hi) < rate:
        hi *= 2
    while mean_p(lo) > rate:
        lo *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_p(mid) < rate else (lo, mid)
    beta = (lo + hi) / 2
    head[eos_id, CHANNEL] = base + beta
    return mean_p(beta)


def geometric_quantile(rate: float, q: float) -> float:
    """The q-quantile of the answer length when each token ends the answer with probability `rate`."""
    return math.log(1 - q) / math.log(1 - rate)


def varied_prompt_lengths(num: int, low: int, high: int, seed: int = 0) -> list[int]:
    """Prompt lengths spread uniformly over [low, high], the same for every system."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (num,), generator=g).tolist()


def learning_rate(workload: str, lr: float | None = None) -> float:
    """The learning rate every system of the benchmark trains at: `lr` if given, else 1e-6, and
    1e-10 on the long-tailed workload, whose answer lengths come from the weights: one update at
    1e-5 moved its EOS rate enough to quadruple the mean answer (549 -> 2,228 tokens on the 0.5B
    shape), so every system would generate a different workload after its first step. At 1e-10 each
    step still does the whole optimizer update; the weights, and so the lengths, stay put."""
    if lr is not None:
        return lr
    return 1e-10 if workload == "longtail" else 1e-6
