"""Partial rollouts (`rollout.partial_rollouts`): generate in chunks so weight pushes land mid-response.

An engine actor runs one call at a time, so a weight push sent while it generates waits for the call
to end. Asynchronous runs would then load new weights only between whole batches. Here each engine's
share is generated `rollout.partial_chunk_tokens` tokens at a time: the first call samples the first
chunk of every response, each later call extends the unfinished ones (prompt + response so far, one
request per response). A push queued meanwhile is loaded between two chunks, so the rest of every
response in flight is sampled by the new weights (paused, updated, resumed). Each token records the
version that sampled it (`Sample.token_versions`); the engine's logprobs of each chunk are those of the
policy that sampled it, which is what decoupled PPO's behaviour term needs.

Costs and limits: each chunk re-reads the prompt and the response so far (the prefix cache serves it
unless new weights arrived, which reset the cache: the resumed part is then recomputed under the new
weights); a stop string that straddles a chunk boundary is not caught (end-of-sequence tokens are).
"""

from __future__ import annotations

import dataclasses

from rlhf.config.schema import SamplingConfig
from rlhf.types import Prompt, Sample


def open_samples(samples: list[Sample], max_new_tokens: int) -> list[int]:
    """Indices of responses cut by the chunk limit (not by a stop, nor by the whole budget)."""
    return [
        i
        for i, s in enumerate(samples)
        if s.finish_reason == "length" and len(s.response_ids) < max_new_tokens
    ]


def generate_in_chunks(
    call,
    prompts: list[Prompt],
    groups: list[int],
    sampling: SamplingConfig,
    n: int | None,
    temperature: float | None,
    logprobs: bool,
    chunk_tokens: int,
) -> list[Sample]:
    """One engine's share in chunks; `call(method, *args, **kwargs)` runs a method of that engine and
    returns its result (one Ray call each, so pushes queued on the engine run in between)."""
    if chunk_tokens < 1:
        raise ValueError(f"rollout.partial_chunk_tokens must be >= 1, got {chunk_tokens}")
    budget = sampling.max_new_tokens
    first = dataclasses.replace(sampling, max_new_tokens=min(chunk_tokens, budget))
    samples = call("generate", prompts, first, n, temperature, 0, groups, logprobs=logprobs)
    while todo := open_samples(samples, budget):
        done_so_far = len(samples[todo[0]].response_ids)  # every open response has the same length
        extended = call(
            "continue_samples",
            [samples[i] for i in todo],
            sampling,
            min(chunk_tokens, budget - done_so_far),
            temperature,
            logprobs,
        )
        for i, sample in zip(todo, extended):
            samples[i] = sample
    return samples
