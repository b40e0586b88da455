"""The sync route planner: which learner rank feeds which engine worker, over which transport."""

from __future__ import annotations

import pytest

from rlhf.sync.routes import Route, SyncRouteError, colocated_layout, plan_routes


@pytest.mark.parametrize("num_gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("tp", [1, 2])
def test_colocated_every_worker_fed_over_cuda_ipc_by_the_rank_on_its_gpu(num_gpus, tp):
    if tp > num_gpus:
        pytest.skip("tensor parallel wider than the machine")
    engines = num_gpus // tp
    learner_gpus, worker_gpus = colocated_layout(num_gpus, num_gpus, engines, tp)
    channels, routes = plan_routes("auto", "cuda", learner_gpus, worker_gpus)
    # one CUDA IPC channel per GPU, each from the learner rank on that GPU to the one worker there
    assert [ch.transport for ch in channels] == ["cuda_ipc"] * num_gpus
    assert [ch.sender for ch in channels] == list(range(num_gpus))
    for e in range(engines):
        for w in range(tp):
            gpu = e * tp + w
            assert routes[e][w] == Route(channel=gpu, rank=1)
            assert channels[gpu].receivers == [(e, w)]
            assert learner_gpus[channels[gpu].sender] == worker_gpus[e][w]


def test_disaggregated_one_broadcast_from_rank_zero():
    learner_gpus = ["g0", "g1"]  # ZeRO-3 over two GPUs
    worker_gpus = [["g2", "g3"], ["g4", "g5"]]  # two TP-2 engines elsewhere
    channels, routes = plan_routes("auto", "cuda", learner_gpus, worker_gpus)
    assert len(channels) == 1 and channels[0].transport == "broadcast" and channels[0].sender == 0
    assert channels[0].receivers == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert routes == [[Route(0, 1), Route(0, 2)], [Route(0, 3), Route(0, 4)]]


def test_mixed_layout_ipc_where_a_rank_shares_the_gpu_broadcast_elsewhere():
    # one learner rank on GPU 0, engines on GPUs 0 and 1
    channels, routes = plan_routes("auto", "cuda", ["g0"], [["g0"], ["g1"]])
    assert [(ch.transport, ch.sender, ch.receivers) for ch in channels] == [
        ("cuda_ipc", 0, [(0, 0)]),
        ("broadcast", 0, [(1, 0)]),
    ]
    assert routes == [[Route(0, 1)], [Route(1, 1)]]


def test_more_learner_ranks_than_engine_gpus_leave_extra_ranks_silent():
    learner_gpus, worker_gpus = colocated_layout(4, 4, 1, 2)  # one TP-2 engine on GPUs 0-1
    channels, _ = plan_routes("auto", "cuda", learner_gpus, worker_gpus)
    assert [ch.sender for ch in channels] == [0, 1]


def test_cpu_uses_one_channel_object_store_by_default_or_gloo_broadcast():
    channels, routes = plan_routes("auto", "cpu", [None, None], [[None], [None]])
    assert [(ch.transport, ch.receivers) for ch in channels] == [("object_store", [(0, 0), (1, 0)])]
    assert routes == [[Route(0, 1)], [Route(0, 2)]]
    channels, _ = plan_routes("broadcast", "cpu", [None], [[None], [None]])
    assert channels[0].transport == "broadcast"


def test_impossible_requests_name_the_worker():
    # the 2-GPU colocated crash of old: NCCL broadcast with two ranks on one device
    with pytest.raises(SyncRouteError, match="engine 0 worker 0 and learner rank 0 share one GPU"):
        plan_routes("broadcast", "cuda", ["g0", "g1"], [["g0"], ["g1"]])
    with pytest.raises(SyncRouteError, match="engine 1 worker 0 shares its GPU with no learner"):
        plan_routes("cuda_ipc", "cuda", ["g0"], [["g0"], ["g1"]])
    with pytest.raises(SyncRouteError, match="needs device 'cuda'"):
        plan_routes("cuda_ipc", "cpu", [None], [[None]])
    with pytest.raises(SyncRouteError, match="unknown transport"):
        plan_routes("pigeon", "cpu", [None], [[None]])
    # two engines squeezed on one GPU that no learner shares: NCCL cannot reach both
    with pytest.raises(SyncRouteError, match="share one GPU"):
        plan_routes("auto", "cuda", ["g0"], [["g1"], ["g1"]])
    with pytest.raises(SyncRouteError, match="need 4 GPUs"):
        colocated_layout(2, 2, 2, 2)
