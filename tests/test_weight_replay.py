"""`sync.engine_reload=replay`: record vLLM's weight-loader copies once, replay them afterwards.

The main test drives vLLM's own model classes (Qwen2 with tied embeddings and padded vocabulary,
Llama with a separate lm_head), built on CPU with their real loaders, in a subprocess (vLLM's
parallel state is per process): pushes through the replay must leave every parameter equal to a
second model loaded through `load_weights`. The units cover what makes a recording unusable.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from rlhf.sync.engine_replay import WeightReplay, bucket_layout
from rlhf.sync.wire import pack_bucket, unpack_bucket

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def push(replay: WeightReplay, tensors, load_weights, bucket_dtype=None, buckets: int = 2):
    """Pack `tensors` into `buckets` buckets and write each through `replay`; returns replay flags."""
    size = -(-len(tensors) // buckets)
    flags = []
    for start in range(0, len(tensors), size):
        packed = pack_bucket(tensors[start : start + size], bucket_dtype)
        flags.append(
            replay.load(bucket_layout(packed.metas), packed.buffer, unpack_bucket(packed), load_weights)
        )
    return flags


def check_against_vllm(model_dir: str) -> None:
    """Run in a subprocess: replayed pushes equal `load_weights` pushes, bit for bit."""
    from safetensors.torch import load_file
    from vllm.config import set_current_vllm_config

    from rlhf.testing import vllm_model_on_cpu

    model, config = vllm_model_on_cpu(model_dir)
    reference, _ = vllm_model_on_cpu(model_dir)
    weights = list(load_file(os.path.join(model_dir, "model.safetensors")).items())
    replay = WeightReplay(model)
    generator = torch.Generator().manual_seed(0)
    with set_current_vllm_config(config), torch.no_grad():
        for push_index, bucket_dtype in enumerate([None, None, "bfloat16", "bfloat16"]):
            new = [(n, t + torch.randn(t.shape, generator=generator)) for n, t in weights]
            flags = push(replay, new, model.load_weights, bucket_dtype)
            push(WeightReplay(reference), new, reference.load_weights, bucket_dtype)  # never replays
            # the first push of each layout records (bf16 buckets are a new layout), the second replays
            assert flags == [push_index % 2 == 1] * 2, (push_index, flags)
            for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
                assert torch.equal(a, b), (push_index, name)
    assert replay.replayed == 4 and replay.loaded == 4
    assert all(plan for plan in replay.plans.values())
    # a replayed push reports the engine's parameters, as load_weights does (the sync's coverage check)
    written = set().union(*(replay.params_written(layout) for layout in replay.plans))
    assert written == {name for name, _ in model.named_parameters()}
    print("replay matches load_weights")


def test_replay_equals_vllm_load_weights(tmp_path):
    from rlhf.testing import build_tiny_model

    dirs = [
        build_tiny_model(str(tmp_path / "qwen"), arch="qwen2", vocab_size=500, tie_word_embeddings=True),
        build_tiny_model(str(tmp_path / "llama"), arch="llama"),
    ]
    code = f"import sys; sys.path.insert(0, {HERE!r}); import test_weight_replay as t\n"
    code += "".join(f"t.check_against_vllm({d!r})\n" for d in dirs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("replay matches load_weights") == 2


# ----------------------------------------------------------------------------------------------
# What a recording must explain


class Stacked(torch.nn.Module):
    """A vLLM-like fused parameter: `a` and `b` land in halves of one `ab` through narrowed copies."""

    def __init__(self):
        super().__init__()
        self.ab = torch.nn.Parameter(torch.zeros(4, 3), requires_grad=False)
        self.norm = torch.nn.Parameter(torch.zeros(3), requires_grad=False)

    def load_weights(self, named):
        for name, t in named:
            if name == "norm":
                self.norm.data.copy_(t)
            else:
                self.ab.data.narrow(0, 0 if name == "a" else 2, 2).copy_(t.t())  # transposed view


def weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [
        ("a", torch.randn(3, 2, generator=g)),
        ("b", torch.randn(3, 2, generator=g)),
        ("norm", torch.randn(3, generator=g)),
    ]


def test_replay_follows_views_and_casts():
    model, reference = Stacked(), Stacked()
    replay = WeightReplay(model)
    for seed, bucket_dtype in [(0, None), (1, None), (2, "bfloat16"), (3, "bfloat16")]:
        new = weights(seed)
        flags = push(replay, new, model.load_weights, bucket_dtype, buckets=1)
        push(WeightReplay(reference), new, reference.load_weights, bucket_dtype, buckets=1)
        assert flags == [seed % 2 == 1]
        assert torch.equal(model.ab, reference.ab) and torch.equal(model.norm, reference.norm)
    expected = torch.cat([weights(3)[0][1].t(), weights(3)[1][1].t()]).to(torch.bfloat16).float()
    assert torch.equal(model.ab, expected)


class Computed(Stacked):
    def load_weights(self, named):
        parts = dict(named)
        self.ab.data.copy_(torch.cat([parts["a"].t(), parts["b"].t()]))  # a computed source
        self.norm.data.copy_(parts["norm"])


class Scaled(Stacked):
    def load_weights(self, named):
        super().load_weights(named)
        self.norm.data.mul_(2.0)  # a write that is not a copy


class Reallocated(Stacked):
    def load_weights(self, named):
        super().load_weights(named)
        self.norm.data = self.norm.data.clone()


class Overlapping(Stacked):
    def load_weights(self, named):
        super().load_weights(named)
        self.ab.data[1:3].copy_(torch.ones(2, 3))  # from a computed tensor as well: either check fires


def test_unexplained_loads_keep_load_weights(caplog):
    for cls, reason in [
        (Computed, "computed tensor"),
        (Scaled, "mul_ writes into norm"),
        (Reallocated, "reallocated"),
        (Overlapping, "computed tensor"),
    ]:
        model, reference = cls(), cls()
        replay = WeightReplay(model)
        caplog.clear()
        for seed in range(3):
            assert push(replay, weights(seed), model.load_weights, buckets=1) == [False]
            reference.load_weights(weights(seed))
            assert torch.equal(model.ab, reference.ab) and torch.equal(model.norm, reference.norm)
        assert replay.loaded == 3 and replay.replayed == 0
        assert reason in caplog.text and caplog.text.count("not possible") == 1, (cls, caplog.text)


def test_overlapping_copies_are_refused():
    class Twice(Stacked):
        def load_weights(self, named):
            super().load_weights(named)
            parts = dict(named)
            self.ab.data.narrow(0, 1, 2).copy_(parts["b"].t())  # overlaps rows of a and b

    replay = WeightReplay(Twice())
    push(replay, weights(0), replay.model.load_weights, buckets=1)
    assert list(replay.plans.values()) == [None]
    assert push(replay, weights(1), replay.model.load_weights, buckets=1) == [False]


def test_a_new_layout_is_recorded_again():
    model = Stacked()
    replay = WeightReplay(model)
    assert push(replay, weights(0), model.load_weights, buckets=1) == [False]
    assert push(replay, weights(1), model.load_weights, buckets=1) == [True]
    assert push(replay, weights(2)[::-1], model.load_weights, buckets=1) == [False]  # other order
    assert push(replay, weights(3)[::-1], model.load_weights, buckets=1) == [True]
    assert len(replay.plans) == 2
