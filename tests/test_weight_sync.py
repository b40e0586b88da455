"""Weight sync: wire format and transports (unit), then real learner -> vLLM pushes (slow).

The slow tests run a small learner harness (a Ray actor holding the tiny HF model, feeding
`send_to_channels` like trainer/learner.py does) against one real CPU vLLM engine, and check that after a
push the engine's logprobs equal the learner model's own logprobs.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import replace
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from rlhf.config.schema import SamplingConfig, SyncConfig
from rlhf.sync import wire as ws
from rlhf.sync.driver_side import WeightSync
from rlhf.sync.engine_side import receive_buckets
from rlhf.sync.learner_side import send_buckets, send_to_channels

# ----------------------------------------------------------------------------------------------
# Wire format


def test_pack_unpack_roundtrip_mixed_dtypes():
    bucket = [
        ("w", torch.arange(6, dtype=torch.float32).reshape(2, 3)),
        ("half", torch.tensor([1.5, -2.25], dtype=torch.bfloat16)),
        ("ids", torch.tensor([7, 8, 9], dtype=torch.int64)),
        ("scalar", torch.tensor(3.0)),
        ("empty", torch.zeros(0, 4)),
        ("strided", torch.arange(12.0).reshape(3, 4).t()),  # non-contiguous input
    ]
    packed = ws.pack_bucket(bucket)
    # 24 B, 4 B, 24 B, 4 B, 0 B, 48 B, each starting on a 64-byte boundary
    assert [m.offset for m in packed.metas] == [0, 64, 128, 192, 256, 256]
    assert packed.nbytes == 320
    for (name, original), (name2, restored) in zip(bucket, ws.unpack_bucket(packed)):
        assert name == name2 and restored.dtype == original.dtype and restored.shape == original.shape
        assert torch.equal(restored, original)
    # a pickle-proof copy (what crosses vLLM's multiprocess RPC) decodes to the same tensors
    as_bytes = ws.bucket_to_bytes(packed)
    assert isinstance(as_bytes.buffer, bytes)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ws.unpack_bucket(as_bytes), bucket))


def test_pack_casts_only_floating_tensors():
    packed = ws.pack_bucket([("w", torch.tensor([1.0, 2.0])), ("ids", torch.tensor([3]))], dtype="bfloat16")
    (_, w), (_, ids) = ws.unpack_bucket(packed)
    assert w.dtype == torch.bfloat16 and torch.equal(w.float(), torch.tensor([1.0, 2.0]))
    assert ids.dtype == torch.int64


def test_iter_buckets_respects_size():
    tensors = [
        (f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 10, 40, 5])
    ]  # float32: 40/40/40/160/20 B
    buckets = list(ws.iter_buckets(tensors, bucket_bytes=100))
    # 40+40 fits, +40 would be 120 > 100; the 160-byte tensor travels alone
    assert [[name for name, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]


def test_make_spec_validation():
    spec = ws.make_spec("broadcast", 1024, host="127.0.0.1", port=1, num_engines=2, workers_per_engine=2)
    assert spec.world_size == 5
    with pytest.raises(ValueError, match="unknown transport"):
        ws.make_spec("carrier_pigeon", 1024)
    with pytest.raises(ValueError, match="host and port"):
        ws.make_spec("broadcast", 1024)
    assert ws.make_spec("cuda_ipc", 1024, host="h", port=1, num_engines=2).world_size == 3
    with pytest.raises(ValueError, match="bucket_mb"):
        ws.make_spec("object_store", 0)
    assert ws.make_spec("object_store", 8, dtype=torch.bfloat16).dtype == "bfloat16"


def test_logprob_diff():
    assert ws.logprob_diff([[-1.0, -2.0], [-0.5]], [[-1.5, -2.0], [-1.0]]) == pytest.approx(
        (0.5 + 0 + 0.5) / 3
    )
    with pytest.raises(ValueError):
        ws.logprob_diff([[-1.0]], [[-1.0, -2.0]])


def test_broadcast_transport_gloo_two_ranks():
    """Sender and receiver as two ranks (threads) of a real gloo group over a real TCPStore."""
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    spec = ws.make_spec("broadcast", 64, host="127.0.0.1", port=store.port, group="unit-bcast", timeout_s=60)
    weights = [(f"layer{i}.weight", torch.randn(4, 5)) for i in range(3)] + [("step", torch.tensor([7]))]
    received: list[tuple[str, torch.Tensor]] = []
    stats = {}

    def receiver(version: int) -> None:
        stats[version] = receive_buckets(
            replace(spec, version=version),
            None,
            lambda b: received.extend((n, t.clone()) for n, t in b),
            rank=1,
        )

    try:
        for version in range(2):  # a second push reuses the group and must not see stale keys
            received.clear()
            thread = threading.Thread(target=receiver, args=(version,))
            thread.start()
            payload = send_buckets(replace(spec, version=version), ws.iter_buckets(weights, 64))
            thread.join(timeout=60)
            assert not thread.is_alive()
            assert [n for n, _ in received] == [n for n, _ in weights]
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(received, weights))
            # 80-byte tensors exceed the 64-byte bucket: each goes alone, as does the 8-byte int
            assert payload.num_buckets == 4 and stats[version]["num_buckets"] == 4
            assert payload.num_bytes == stats[version]["num_bytes"] == 3 * 128 + 64
    finally:
        ws.destroy_groups()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ipc_transport():
    """Sender in this process, receiver in a spawned process on the same GPU."""
    import torch.multiprocessing as mp

    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=120)
    )
    spec = ws.make_spec(
        "cuda_ipc", 1 << 10, host="127.0.0.1", port=store.port, group="unit-ipc", timeout_s=120
    )
    weights = [(f"w{i}", torch.randn(16, 16, device="cuda")) for i in range(4)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_ipc_receiver, args=(spec, queue))
    proc.start()
    try:
        send_buckets(spec, ws.iter_buckets(weights, spec.bucket_bytes))
        sums = queue.get(timeout=120)
    finally:
        proc.join(timeout=60)
        ws.destroy_groups()
    assert sums == pytest.approx({name: float(t.double().sum()) for name, t in weights})


def _ipc_receiver(spec, queue) -> None:
    sums = {}
    receive_buckets(
        spec, None, lambda b: sums.update({n: float(t.double().sum()) for n, t in b}), device="cuda", rank=1
    )
    queue.put(sums)


# ----------------------------------------------------------------------------------------------
# Real pushes: learner harness actor -> CPU vLLM engine


class TinyLearner:
    """Test harness for the transport: a real HF model that ships its weights like a learner does."""

    def __init__(self, model_path: str):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    def perturb(self, seed: int, scale: float = 0.05) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale)

    def named_weight_buckets(self, bucket_bytes: int):
        return ws.iter_buckets(self.model.named_parameters(), bucket_bytes)

    def send_weights(
        self, specs: list[ws.SyncSpec], bucket_bytes: int, background: bool = False
    ) -> list[ws.SyncPayload]:
        assert not background, "this harness sends synchronously"
        return send_to_channels(specs, self.named_weight_buckets(bucket_bytes))

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.no_grad()
    def logprobs(self, seqs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        out = []
        for prompt, response in seqs:
            logits = self.model(torch.tensor([prompt + response])).logits[0]
            logp = torch.log_softmax(logits.float(), dim=-1)
            out.append([float(logp[len(prompt) - 1 + j, tok]) for j, tok in enumerate(response)])
        return out


@pytest.fixture(scope="module", params=["tiny_model_dir", "tiny_tied_dir"])
def cluster(request):
    """An engine and a harness learner on the tiny model, untied and with tied embeddings."""
    ray = pytest.importorskip("ray")
    from rlhf.rollout import RolloutGroup

    from rlhf.config.schema import RunConfig
    from rlhf.types import Prompt

    path = request.getfixturevalue(request.param)
    # The harness class lives in this test module, which Ray workers cannot import: ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rollout = None
    try:
        # The harness starts while vLLM loads.
        learner = ray.remote(num_cpus=1)(TinyLearner).remote(path)
        cfg = RunConfig()
        cfg.rollout.max_model_len = 512
        cfg.rollout.gpu_memory_utilization = 0.01
        cfg.rollout.engine_logprobs = True  # partial rollouts below check the engine's logprobs
        rollout = RolloutGroup(cfg, path, "cpu")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        prompts = [
            Prompt(i, t, tok(t)["input_ids"]) for i, t in enumerate(["Compute 1 + 2.", "What is the sum"])
        ]
        samples = rollout.generate(prompts, SamplingConfig(n=2, max_new_tokens=24))
        seqs = [(s.prompt.token_ids, s.response_ids) for s in samples if s.response_ids]
        yield SimpleNamespace(rollout=rollout, learner=learner, seqs=seqs, ray=ray)
    finally:
        if rollout is not None:
            rollout.shutdown()
        ray.shutdown()


def _push_and_check(cluster, transport: str, seed: int) -> dict:
    ray, learner, rollout, seqs = cluster.ray, cluster.learner, cluster.rollout, cluster.seqs
    ray.get(learner.perturb.remote(seed))
    expected = ray.get(learner.logprobs.remote(seqs))
    # Before the push the engine still runs the old weights: the audit metric sees it.
    assert ws.logprob_diff(rollout.logprobs(seqs), expected) > 1e-2
    sync = WeightSync(
        SyncConfig(transport=transport, bucket_mb=0.05), SimpleNamespace(actors=[learner]), rollout, "cpu"
    )
    sync.setup()
    metrics = sync.push()
    assert ws.logprob_diff(rollout.logprobs(seqs), expected) < 1e-4
    assert metrics["sync/bytes"] == ray.get(learner.num_bytes.remote())  # fp32 in, fp32 out
    assert metrics["sync/buckets"] > 1 and metrics["sync/time_s"] > 0
    return {"sync": sync, "expected": expected}


@pytest.mark.slow
def test_object_store_push_matches_learner(cluster):
    _push_and_check(cluster, "object_store", seed=1)


@pytest.mark.slow
def test_broadcast_gloo_push_matches_learner(cluster):
    state = _push_and_check(cluster, "broadcast", seed=2)
    ray, learner, rollout, seqs = cluster.ray, cluster.learner, cluster.rollout, cluster.seqs
    # A second push through the same group (new store keys, group reused on both sides).
    ray.get(learner.perturb.remote(3))
    expected = ray.get(learner.logprobs.remote(seqs))
    assert ws.logprob_diff(expected, state["expected"]) > 1e-2
    state["sync"].push()
    assert ws.logprob_diff(rollout.logprobs(seqs), expected) < 1e-4
    # A skipped sync is detected: the learner moves on, the engine does not.
    ray.get(learner.perturb.remote(4))
    assert ws.logprob_diff(rollout.logprobs(seqs), ray.get(learner.logprobs.remote(seqs))) > 1e-2


@pytest.mark.slow
def test_partial_rollout_resumes_under_the_new_weights(cluster):
    """rollout.partial_rollouts: a response paused after its first chunk, given new weights and resumed
    samples the rest with the new weights; each token carries the version that sampled it, and its
    engine logprob is that policy's (the behaviour term of decoupled PPO)."""
    from rlhf.types import Prompt

    ray, learner, rollout = cluster.ray, cluster.learner, cluster.rollout
    engine = rollout.engines[0]
    sync = WeightSync(SyncConfig(transport="object_store"), SimpleNamespace(actors=[learner]), rollout, "cpu")
    sync.setup()
    sync.push()  # engine and learner agree first (an earlier test may have left them apart)
    prompt = Prompt(0, "p", list(cluster.seqs[0][0]))
    sampling = SamplingConfig(n=2, max_new_tokens=12, temperature=1.0, ignore_eos=True)
    first = ray.get(engine.generate.remote([prompt], replace(sampling, max_new_tokens=4), logprobs=True))
    assert [len(s.response_ids) for s in first] == [4, 4] and all(s.finish_reason == "length" for s in first)
    old = ray.get(learner.logprobs.remote([(prompt.token_ids, s.response_ids) for s in first]))

    ray.get(learner.perturb.remote(11))
    sync.push()
    resumed = ray.get(engine.continue_samples.remote(first, sampling, 8, None, True))
    new = ray.get(learner.logprobs.remote([(prompt.token_ids, s.response_ids) for s in resumed]))
    for before, after, old_lp, new_lp in zip(first, resumed, old, new):
        assert after.response_ids[:4] == before.response_ids and len(after.response_ids) == 12
        assert after.token_versions == [before.policy_version] * 4 + [sync.version] * 8
        assert after.policy_version == before.policy_version  # the staleness bound counts the oldest
        assert max(abs(a - b) for a, b in zip(after.logprobs[:4], old_lp)) < 1e-3
        assert max(abs(a - b) for a, b in zip(after.logprobs[4:], new_lp[4:])) < 1e-3
        assert max(abs(a - b) for a, b in zip(old_lp, new_lp[:4])) > 1e-2  # the push mattered
