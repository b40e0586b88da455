"""Plain data that crosses actor boundaries: no framework objects, only lists and tensors.

Alignment convention for every per-token tensor of a `TrainBatch`: position t holds the quantity
for token `input_ids[:, t]` (e.g. its log-probability given tokens < t). Position 0 is never a
response token, so it is always masked out by `loss_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class Prompt:
    """One prompt as the data pipeline hands it to the rollout."""

    index: int  # position in the dataset (stable across resumes)
    text: str  # after chat-template application
    token_ids: list[int]
    label: Any = None  # what the task checker compares against (e.g. the answer)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """One sampled response. `group` ties together the n samples of one prompt."""

    group: int
    prompt: Prompt
    response_ids: list[int]
    response_text: str
    logprobs: list[float] | None  # rollout-engine logprob of each response token (None: not asked for)
    finish_reason: str  # "stop" | "length" | ...
    reward: float = 0.0
    reward_parts: dict[str, float] = field(default_factory=dict)  # per reward source, unweighted
    # Weight pushes the engine had received when it generated this sample (0: the initial weights). A
    # generate call never spans a push (the engine actor runs one call at a time), so without partial
    # rollouts every token of a response comes from this one version.
    policy_version: int = 0
    # Partial rollouts (rollout.partial_rollouts): the version of each response token, where a response
    # was paused, given new weights and resumed; `policy_version` stays the first (oldest) version,
    # which the staleness bound counts. None: every token from `policy_version`.
    token_versions: list[int] | None = None
    # Multi-turn episodes (rollout/episodes.py): response_ids interleave the policy's tokens with
    # environment/tool tokens; response_mask[i] is 1 where response_ids[i] was sampled by the policy
    # (only those enter the loss and the audit). None: every response token is the policy's.
    response_mask: list[int] | None = None
    # The episode's record (turns, environment reward, per-turn rewards, error); None: single-turn.
    episode: dict[str, Any] | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class TrainBatch:
    """Padded (right-padded) tensors for the learners; shape [B, T] unless noted."""

    input_ids: torch.Tensor  # long
    attention_mask: torch.Tensor  # long, 1 on real tokens
    loss_mask: torch.Tensor  # float, 1 on response tokens that enter the loss
    rollout_logprobs: (
        torch.Tensor | None
    )  # float, engine (behaviour) logprobs, 0 off the response; None: not returned
    advantages: torch.Tensor  # float, per token (sequence advantages are broadcast)
    rewards: torch.Tensor  # float [B], final scalar reward per sample
    ref_logprobs: torch.Tensor | None = None  # reference-model logprobs (KL)
    old_logprobs: torch.Tensor | None = None  # learner logprobs before the update (recompute_old_logprobs)
    values: torch.Tensor | None = None  # critic values (PPO/GAE)
    returns: torch.Tensor | None = None  # critic targets (PPO/GAE)
    group: torch.Tensor | None = None  # long [B]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def select(self, idx: list[int] | torch.Tensor) -> TrainBatch:
        """Rows `idx`, trimmed to the longest remaining sequence."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx] if isinstance(v, torch.Tensor) else v
        batch = TrainBatch(**out)
        width = int(batch.attention_mask.sum(dim=1).max()) if len(idx) else 0
        return batch.truncate(width)

    def truncate(self, width: int) -> TrainBatch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[:, :width] if isinstance(v, torch.Tensor) and v.dim() == 2 else v
        return TrainBatch(**out)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TrainBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TrainBatch:
        """Page-locked copies, so a later `.to("cuda", non_blocking=True)` does not stall the host."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> TrainBatch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = fn(v) if isinstance(v, torch.Tensor) else v
        return TrainBatch(**out)
