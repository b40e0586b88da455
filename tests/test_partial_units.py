"""Pure parts of partial rollouts, the push's phase figures and the engine reload choice."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from rlhf.rollout.partial import generate_in_chunks, open_samples

from rlhf.config.schema import SamplingConfig
from rlhf.sync.driver_side import _sync_phases
from rlhf.sync.engine_extension import _layerwise_reload_api, reload_mode
from rlhf.sync.wire import SyncPayload
from rlhf.types import Prompt, Sample


class CountingEngine:
    """Emits token 7 per step; a response whose prompt index is odd stops at 3 tokens (an EOS)."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def __call__(self, method, *args, **kwargs):
        if method == "generate":
            prompts, sampling, n, _, _, groups = args
            self.calls.append((method, sampling.max_new_tokens))
            return [
                self._grow(Sample(g, p, [], "", None, "length"), sampling.max_new_tokens)
                for p, g in zip(prompts, groups)
                for _ in range(n)
            ]
        samples, _, max_tokens, _, _ = args
        self.calls.append((method, max_tokens))
        return [self._grow(s, max_tokens) for s in samples]

    @staticmethod
    def _grow(sample: Sample, tokens: int) -> Sample:
        ids = list(sample.response_ids)
        for _ in range(tokens):
            ids.append(7)
            if sample.prompt.index % 2 and len(ids) == 3:
                return dataclasses.replace(sample, response_ids=ids, finish_reason="stop")
        return dataclasses.replace(sample, response_ids=ids, finish_reason="length")


def test_chunks_respect_the_budget_and_stop_early_finishers():
    engine = CountingEngine()
    prompts = [Prompt(0, "a", [1]), Prompt(1, "b", [1])]
    out = generate_in_chunks(
        engine, prompts, [0, 1], SamplingConfig(n=2, max_new_tokens=10), 2, None, False, 4
    )
    assert engine.calls == [("generate", 4), ("continue_samples", 4), ("continue_samples", 2)]
    assert [len(s.response_ids) for s in out] == [10, 10, 3, 3]
    assert [s.finish_reason for s in out] == ["length", "length", "stop", "stop"]
    assert open_samples(out, 10) == []  # cut by the whole budget: a real truncation, not a chunk end
    with pytest.raises(ValueError, match="partial_chunk_tokens"):
        generate_in_chunks(engine, prompts, [0, 1], SamplingConfig(), 1, None, False, 0)


def test_sync_phases_take_the_slowest_rank_and_engine():
    a, b = SyncPayload("broadcast"), SyncPayload("broadcast")
    a.add_time("pack", 0.01)
    a.add_time("pack", 0.02)
    b.add_time("pack", 0.05)
    b.add_time("send", 0.5)
    loaded = [{"load_s": 0.2, "wait_s": 0.1, "reload_direct": 1}, {"load_s": 0.3, "reload_direct": 0}]
    phases = _sync_phases([a, b], loaded)
    assert phases["sync/learner_pack_s"] == pytest.approx(0.05)
    assert phases["sync/learner_send_s"] == pytest.approx(0.5)
    assert phases["sync/engine_load_s"] == pytest.approx(0.3) and phases[
        "sync/engine_wait_s"
    ] == pytest.approx(0.1)
    assert phases["sync/engine_direct"] == 0.0  # one engine fell back: not every engine wrote directly


def test_reload_mode_choice():
    cpu_model = torch.nn.Linear(2, 2)
    # on a CPU engine the weights were repacked at load: layer-wise, where vLLM has that API
    assert reload_mode(cpu_model, "auto") == ("layerwise" if _layerwise_reload_api() else "direct")
    assert reload_mode(cpu_model, "direct") == "direct"
    assert reload_mode(cpu_model, "layerwise") == "layerwise"
    with pytest.raises(ValueError, match="sync.engine_reload"):
        reload_mode(cpu_model, "fast")
