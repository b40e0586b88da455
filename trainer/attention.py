"""Attention over packed micro-batches on GPU learners: each sequence attends only to itself.

A packed micro-batch is one row of concatenated sequences (`learner.pack_rows`). Transformers can run
it with SDPA and a block-diagonal [N, N] mask, which is exact but computes every one of the N^2
scores; on the GPU that costs far more than the padding it saves. This attention function takes the
sequence boundaries (`cu_seq_lens_q`, cumulative lengths, as transformers' flash-attention kwargs
carry them) and runs variable-length flash attention (`torch.nn.attention.varlen`) where the
installed torch has it on the device, else causal SDPA one sequence at a time: compute follows the
sequences' own lengths either way.

Registered with transformers under `ATTENTION_NAME`; models load with `attn_implementation` set to
it. It builds no mask (transformers skips mask creation for implementations it does not know).
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F

ATTENTION_NAME = "rlhf_packed"
log = logging.getLogger(__name__)
_VARLEN_FAILED: list[str] = []  # set once the kernel refused a call in this process


@functools.cache
def _varlen():
    """(varlen_attn, its keyword names) when this torch has it, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, H, N, D], key/value [1, Hkv, N, D] -> (output [1, N, H, D], None), causal within each
    sequence of `cu_seq_lens_q` (int32 [S + 1], on the device). Without it: plain causal SDPA."""
    if cu_seq_lens_q is None:  # not a packed call (e.g. a padded batch): the usual causal attention
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"packed attention: expected one packed row, got a batch of {query.shape[0]}")
    if dropout:
        raise ValueError("packed attention: attention dropout is not supported")
    found = _varlen() if query.is_cuda and not _VARLEN_FAILED else None
    if found is not None:
        try:
            out = _varlen_forward(found, query, key, value, cu_seq_lens_q, max_length_q, scaling)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            # This torch's kernel refuses the case (dtype, head size, GPU): one sequence at a time.
            _VARLEN_FAILED.append(repr(exc))
            log.warning("variable-length attention unavailable (%s); packed sequences run one at a time", exc)
            out = None
        if out is not None:
            return out[None], None
    # One sequence at a time (CPU, or a torch without variable-length attention).
    bounds = cu_seq_lens_q.tolist()
    gqa = key.shape[1] != query.shape[1]
    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling, enable_gqa=gqa
        )
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def _varlen_forward(found, query, key, value, cu, max_len, scaling) -> torch.Tensor | None:
    """[N, H, D] from torch's variable-length flash attention; None if this torch's signature lacks
    something needed (the caller then falls back)."""
    varlen_attn, names = found
    q = query[0].transpose(0, 1)  # [N, H, D]
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
    kwargs = {}
    if "window_size" in names:
        kwargs["window_size"] = (-1, 0)  # causal
    elif "is_causal" in names:
        kwargs["is_causal"] = True
    else:
        return None
    if scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-12:
        if "scale" not in names:
            return None
        kwargs["scale"] = scaling
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in names:
            kwargs["enable_gqa"] = True
        else:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    max_len = int(max_len) if max_len is not None else int((cu[1:] - cu[:-1]).max())
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def register() -> str:
    """Register `packed_attention` with transformers (idempotent); its `attn_implementation` name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    return ATTENTION_NAME


def sequence_bounds(positions: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence lengths (int32 [S + 1]) and the longest sequence of a packed row whose
    position ids restart at 0 for each sequence."""
    flat = positions.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    total = torch.tensor([flat.numel()], device=flat.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())
