"""Micro-batches of a learner rank: which rows go together, and how they run without padding.

`pack_micro_batches` groups rows under the token budget (`trainer.micro_batch_tokens`);
`pack_rows`/`unpack_rows` turn a micro-batch of right-padded rows into one row of real tokens and
per-token results back (`trainer.packing`); `ValueModel` is the critic's per-token value head, which
takes the packed row's position ids like the language models do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rlhf.types import TrainBatch


def pack_micro_batches(lengths: list[int], token_budget: int, padded: bool = True) -> list[list[int]]:
    """Greedy packing by token budget, longest rows first. A micro-batch costs rows x its longest row
    (`padded`) or the sum of its rows (packed without padding: first fit over the open micro-batches).

    A row longer than the budget gets a micro-batch of its own. Returns lists of row indices.
    """
    if token_budget <= 0:
        raise ValueError(f"trainer.micro_batch_tokens must be positive, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    micro: list[list[int]] = []
    if not padded:
        room: list[int] = []
        for i in order:
            slot = next((k for k, free in enumerate(room) if lengths[i] <= free), None)
            if slot is None:
                micro.append([i])
                room.append(token_budget - lengths[i])
            else:
                micro[slot].append(i)
                room[slot] -= lengths[i]
        return micro
    current: list[int] = []
    width = 0
    for i in order:
        if current and max(width, lengths[i]) * (len(current) + 1) > token_budget:
            micro.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, lengths[i])
    if current:
        micro.append(current)
    return micro


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows [b, W] -> their real tokens in one row [1, N] and position ids restarting at 0
    for each sequence (HF models keep attention within each sequence when given such position ids and
    no attention mask)."""
    keep = attention_mask.bool()
    positions = torch.cumsum(attention_mask, dim=1) - 1
    return input_ids[keep][None], positions[keep][None]


def unpack_rows(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token values of a packed row [1, N] back to the padded layout [b, W] (0 on padding);
    differentiable in `values`."""
    return values.new_zeros(attention_mask.shape).masked_scatter(attention_mask.bool(), values[0])


def row_lengths(batch: TrainBatch) -> list[int]:
    """Real tokens per row (right padding excluded)."""
    return batch.attention_mask.sum(dim=1).tolist()


class ValueModel(nn.Module):
    """Critic: a sequence-classification model's backbone + its 1-output head applied at every token."""

    def __init__(self, seq_model: nn.Module):
        super().__init__()
        self.seq_model = seq_model

    @property
    def head(self) -> nn.Module:
        for name in ("score", "classifier", "v_head"):
            if isinstance(getattr(self.seq_model, name, None), nn.Module):
                return getattr(self.seq_model, name)
        raise ValueError(f"critic: {type(self.seq_model).__name__} has no score/classifier head")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **packed: Any,
    ) -> torch.Tensor:
        hidden = self.seq_model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **packed,
        ).last_hidden_state
        values = self.head(hidden).squeeze(-1).float()
        values = F.pad(values[:, :-1], (1, 0))  # values[:, t] comes from hidden[:, t - 1]
        if position_ids is not None:  # packed: a sequence's first token has no state before it
            values = values.masked_fill(position_ids == 0, 0.0)
        return values
