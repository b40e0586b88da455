"""Learner groups on CPU: real DeepSpeed engines (gloo) in Ray actors on a tiny random model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from rlhf.trainer.ds_config import lr_lambda, make_ds_config
from rlhf.trainer.group import chunk, combine_stats, plan_steps, split_rows
from rlhf.trainer.packing import pack_micro_batches

from rlhf.config.schema import RunConfig
from rlhf.testing import random_token_rows
from rlhf.types import TrainBatch

CPU = {"num_cpus": 0.5}


# ---------------------------------------------------------------------------------------------- pure parts
def test_pack_micro_batches_respects_budget_and_covers_rows():
    lengths = [10, 3, 7, 7, 2, 12, 5]
    micro = pack_micro_batches(lengths, token_budget=14)
    assert sorted(i for mb in micro for i in mb) == list(range(len(lengths)))
    # Longest first: 12 alone (2 x 12 > 14), 10 alone, 7+7 (2 x 7 = 14), 5+3 (2 x 5), 2 (3 x 5 = 15 > 14).
    assert micro == [[5], [0], [2, 3], [6, 1], [4]]
    for mb in micro:
        assert len(mb) == 1 or max(lengths[i] for i in mb) * len(mb) <= 14
    assert pack_micro_batches([50], 8) == [[0]]  # an over-long row still gets its own micro-batch


def test_split_rows_balances_tokens():
    shards = split_rows([10, 9, 1, 1, 1], world_size=2)
    assert shards == [[0, 3], [1, 2, 4]]  # tokens 11 vs 11
    assert split_rows([5], world_size=3) == [[0], [], []]


def test_chunk_and_combine_stats():
    assert chunk([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert chunk([0], 3) == [[0], [], []]
    # Two ranks, two steps: loss shares add up per step; stats are token-weighted; steps are averaged.
    rank0 = [
        {"loss": 0.25, "num_tokens": 3.0, "weighted": {"clip_frac": 0.3}, "grad_norm": 2.0, "lr": 0.1},
        {"loss": 0.5, "num_tokens": 2.0, "weighted": {"clip_frac": 0.0}, "grad_norm": 4.0, "lr": 0.2},
    ]
    rank1 = [
        {"loss": 0.75, "num_tokens": 1.0, "weighted": {"clip_frac": 0.5}, "grad_norm": 2.0, "lr": 0.1},
        {"loss": 0.5, "num_tokens": 2.0, "weighted": {"clip_frac": 1.0}, "grad_norm": 4.0, "lr": 0.2},
    ]
    out = combine_stats([rank0, rank1])
    assert out["loss"] == pytest.approx(1.0)  # (0.25 + 0.75 + 0.5 + 0.5) / 2 steps
    assert out["clip_frac"] == pytest.approx((0.8 / 4 + 1.0 / 4) / 2)
    assert out["grad_norm"] == pytest.approx(3.0)
    assert out["lr"] == 0.2 and out["num_tokens"] == 8.0 and out["optimizer_steps"] == 2.0
    assert out["skipped_steps"] == 0.0
    # A step DeepSpeed skipped (non-finite gradients) is counted, not averaged away.
    rank0[1].update(grad_norm=float("inf"), skipped=1.0)
    assert combine_stats([rank0, rank1])["skipped_steps"] == 1.0


def test_plan_covers_every_row_once_per_epoch_with_global_normalisers():
    batch = make_batch(rows=7, seed=7)
    batch.loss_mask[6] = 0  # a row without loss tokens is not a sequence of the loss
    rows_per_rank, shards, steps = plan_steps(
        batch, 2, micro_batch_tokens=40, ppo_epochs=2, mini_batches=2, seed=0
    )
    assert sorted(r for rows in rows_per_rank for r in rows) == list(range(7))
    assert len(steps[0]) == len(steps[1]) == 4  # 2 epochs x 2 mini-batches
    for epoch in range(2):
        seen = []
        for k in range(2 * epoch, 2 * epoch + 2):
            step_rows = [
                rows_per_rank[r][i] for r in range(2) for mb in steps[r][k]["micro_batches"] for i in mb
            ]
            seen += step_rows
            mask = batch.loss_mask[step_rows]
            assert steps[0][k]["global_num_tokens"] == steps[1][k]["global_num_tokens"] == float(mask.sum())
            assert steps[0][k]["global_num_sequences"] == float((mask.sum(1) > 0).sum())
            assert steps[0][k]["num_micro"] == steps[1][k]["num_micro"]
            assert steps[0][k]["num_micro"] == max(len(steps[r][k]["micro_batches"]) for r in range(2))
        assert sorted(seen) == list(range(7))
    for r, shard in enumerate(shards):
        torch.testing.assert_close(shard.input_ids, batch.select(rows_per_rank[r]).input_ids)
    # More ranks than rows: the idle rank trains on a loss-masked filler row.
    _, shards, steps = plan_steps(batch.select([0]), 2, micro_batch_tokens=40)
    assert (
        shards[1].loss_mask.sum() == 0
        and steps[1][0]["micro_batches"] == []
        and steps[1][0]["num_micro"] == 1
    )


def test_ds_config_and_lr_schedule():
    cfg = RunConfig().trainer
    cfg.zero_stage, cfg.max_grad_norm = 3, 0.5
    ds = make_ds_config(cfg, "cuda", torch.bfloat16, world_size=4)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["train_batch_size"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert not make_ds_config(cfg, "cpu", torch.float32, 1)["bf16"]["enabled"]
    with pytest.raises(ValueError, match="float32"):
        make_ds_config(cfg, "cpu", torch.bfloat16, 1)
    cfg.offload_optimizer = True
    assert (
        make_ds_config(cfg, "cuda", torch.bfloat16, 1)["zero_optimization"]["offload_optimizer"]["device"]
        == "cpu"
    )
    # Warm-up 2 steps, then cosine from 1 to 0.1 over steps 2..12.
    f = lr_lambda(warmup_steps=2, total_steps=12, min_lr_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(7) == pytest.approx(0.55) and f(12) == pytest.approx(0.1)
    assert lr_lambda(0, 12, 1.0)(5) == 1.0  # min_lr_ratio 1: constant


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from rlhf.testing import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")), hidden_size=64, heads=2)


def make_cfg(zero_stage: int, replicas: int = 1, **trainer) -> RunConfig:
    cfg = RunConfig()
    cfg.trainer.zero_stage = zero_stage
    cfg.trainer.lr = 1e-3
    cfg.trainer.max_grad_norm = 1e6  # no clipping: the tests compare raw gradients
    for key, value in trainer.items():
        setattr(cfg.trainer, key, value)
    cfg.rollout.sampling.temperature = 0.7
    cfg.placement.learner.replicas = cfg.placement.reference.replicas = cfg.placement.critic.replicas = (
        replicas
    )
    return cfg


def make_batch(rows: int = 6, width: int = 24, prompt: int = 5, seed: int = 0) -> TrainBatch:
    """Random token rows of different lengths; response = everything after the first `prompt` tokens."""
    g = torch.Generator().manual_seed(seed)
    input_ids, attention, loss_mask = random_token_rows(rows, width, prompt, g)
    advantages = torch.randn(rows, 1, generator=g).expand(rows, width) * loss_mask
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=loss_mask,
        rollout_logprobs=torch.zeros(rows, width),
        advantages=advantages.contiguous(),
        rewards=torch.zeros(rows),
    )


def hf_logprobs(model_path: str, batch: TrainBatch, temperature: float) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from rlhf.algorithms.losses import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return token_logprobs(logits, batch.input_ids, temperature=temperature) * batch.attention_mask


def hf_state(model_path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_state(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        diff = float((a[name] - b[name]).abs().max()) if a[name].numel() else 0.0
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=f"{name}: max |diff| {diff:.3g}")


@pytest.fixture(scope="module")
def policy(ray_cluster, tiny_model, tmp_path_factory):
    """One rank, ZeRO-1, fp32; `initial` is a checkpoint of the untrained model to reset from."""
    from rlhf.trainer import LearnerGroup

    group = LearnerGroup(make_cfg(1), tiny_model, "policy", "cpu", [CPU])
    initial = str(tmp_path_factory.mktemp("initial"))
    group.save(initial)
    yield group, initial
    group.shutdown()


def on_policy(group, batch: TrainBatch) -> TrainBatch:
    batch = copy.copy(batch)
    batch.rollout_logprobs = group.logprobs(batch)
    return batch


# ---------------------------------------------------------------------------------------------- learners
@pytest.mark.slow
def test_logprobs_match_plain_hf_forward(policy, tiny_model):
    group, _ = policy
    batch = make_batch()
    expected = hf_logprobs(tiny_model, batch, temperature=0.7)
    group.micro_batch_tokens = 40  # several micro-batches of different widths
    try:
        got = group.logprobs(batch)
    finally:
        group.micro_batch_tokens = 4096
    assert got.shape == batch.input_ids.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got[batch.attention_mask == 0] == 0).all() and (got[:, 0] == 0).all()


@pytest.mark.slow
def test_micro_batching_gives_the_same_step_as_one_big_batch(policy, tiny_model):
    group, initial = policy
    batch = on_policy(group, make_batch(rows=8, seed=1))
    results = []
    for budget in (30, 100_000):  # ~8 micro-batches vs one
        assert group.load(initial) == 0
        group.micro_batch_tokens = budget
        stats = group.train(batch)
        results.append((stats, group.full_state_dict()))
    group.micro_batch_tokens = 4096
    (small, w_small), (big, w_big) = results
    assert small["optimizer_steps"] == big["optimizer_steps"] == 1
    assert small["loss"] == pytest.approx(big["loss"], rel=1e-5)
    # The gradient norm proves the normalisation: a micro-batch-local mean would change it.
    assert small["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-4)
    assert small["num_tokens"] == big["num_tokens"] == float(batch.loss_mask.sum())
    # Adam's first step is ~lr * sign(g): compare the updates in bulk (entries with |g| ~ eps may differ).
    initial_state = hf_state(tiny_model)
    delta_small = torch.cat([(w_small[k] - initial_state[k]).flatten() for k in initial_state])
    delta_big = torch.cat([(w_big[k] - initial_state[k]).flatten() for k in initial_state])
    assert delta_big.abs().mean() > 1e-4  # the step did change the weights
    assert (delta_small - delta_big).abs().sum() / delta_big.abs().sum() < 1e-4


@pytest.mark.slow
def test_checkpoint_round_trip_restores_weights_and_step(policy, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    group, initial = policy
    assert group.load(initial) == 0
    assert_same_state(group.full_state_dict(), hf_state(tiny_model))
    batch = on_policy(group, make_batch(seed=2))
    group.train(batch)
    saved = group.full_state_dict()
    group.save(str(tmp_path / "ckpt"))
    group.train(batch)  # move on, then come back
    assert group.global_steps() == 2
    assert group.load(str(tmp_path / "ckpt")) == 1
    assert_same_state(group.full_state_dict(), saved)
    # The optimizer state came back too: the next step from the checkpoint is the same step again.
    after_resume = group.train(batch)
    group.load(str(tmp_path / "ckpt"))
    again = group.train(batch)
    assert after_resume["loss"] == pytest.approx(again["loss"], rel=1e-6)
    # And the HF export loads as a plain transformers model with the trained weights.
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt" / "hf"))
    assert_same_state({n: p.detach() for n, p in exported.named_parameters()}, saved)
    assert (tmp_path / "ckpt" / "hf" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_positive_advantages_raise_the_logprobs_of_their_tokens(policy):
    group, initial = policy
    group.load(initial)
    batch = make_batch(rows=4, seed=3)
    batch.advantages = batch.loss_mask.clone()  # every response token is good
    batch = on_policy(group, batch)
    # Four updates on one batch, as four epochs: pi_old stays the pre-update logprobs (the driver's
    # learner pass), so the clipped objective moves away from ratio 1 and the loss falls.
    batch.old_logprobs = batch.rollout_logprobs
    before = (batch.rollout_logprobs * batch.loss_mask).sum() / batch.loss_mask.sum()
    losses = [group.train(batch)["loss"] for _ in range(4)]
    after_lp = group.logprobs(batch)
    after = (after_lp * batch.loss_mask).sum() / batch.loss_mask.sum()
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.05
    assert after > before + 0.05


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_nonfinite_gradients_skip_the_step(zero_stage, policy, ray_cluster, tiny_model):
    """A NaN advantage must not reach the weights: the step is skipped (DeepSpeed's overflow check with
    ZeRO >= 1, ours with plain ZeRO-0) and counted in `skipped_steps`."""
    from rlhf.trainer import LearnerGroup

    group, initial = policy
    if zero_stage == 0:
        group = LearnerGroup(make_cfg(0), tiny_model, "policy", "cpu", [CPU])
    else:
        group.load(initial)
    try:
        batch = on_policy(group, make_batch(rows=4, seed=5))
        last = int(batch.attention_mask[1].sum()) - 1  # a response token of row 1
        batch.advantages[1, last] = float("nan")
        stats = group.train(batch)
        assert stats["skipped_steps"] == 1.0 and not math.isfinite(stats["grad_norm"])
        torch.testing.assert_close(group.logprobs(batch), batch.rollout_logprobs, atol=0.0, rtol=0.0)
    finally:
        if zero_stage == 0:
            group.shutdown()


def test_gradient_watch_names_nonfinite_parameters():
    from types import SimpleNamespace

    from rlhf.trainer.learner import Learner

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    fake_self = SimpleNamespace(engine=SimpleNamespace(module=model), device=torch.device("cpu"))
    names, flags = Learner._watch_gradients(fake_self)
    model(torch.ones(1, 3)).sum().backward()
    assert not flags.any()
    # An inf input: the weight gradients (input x upstream gradient) go non-finite, the biases' do not.
    model(torch.tensor([[float("inf"), 1.0, 1.0]])).sum().backward()
    assert [names[i] for i in flags.nonzero().flatten().tolist()] == ["0.weight", "1.weight"]


@pytest.mark.slow
def test_two_ranks_zero2_agree_with_one_rank(policy, ray_cluster, tiny_model):
    from rlhf.trainer import LearnerGroup

    single, initial = policy
    batch = on_policy(single, make_batch(rows=5, seed=4))
    single.load(initial)
    expected = single.train(batch)
    expected_state = single.full_state_dict()

    group = LearnerGroup(make_cfg(2, replicas=2), tiny_model, "policy", "cpu", [CPU, CPU])
    try:
        group.micro_batch_tokens = 40  # ranks get different micro-batch counts: fillers keep them in step
        stats = group.train(batch)
        rank0, rank1 = ray_cluster.get([a.full_state_dict.remote(all_ranks=True) for a in group.actors])
    finally:
        group.shutdown()
    assert_same_state(rank0, rank1)  # data parallelism keeps the replicas identical
    # Same global loss and gradient as one rank on the whole batch (the world-size scaling is right).
    assert stats["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    # Adam's first step is ~lr * g / (|g| + eps): for gradient entries near eps a float re-association
    # (different micro-batches, each run as one packed row) moves the update by a few 1e-5 of
    # lr=1e-3 (2.1e-5 seen); a wrong scaling would move every parameter by ~lr.
    assert_same_state(rank0, expected_state, atol=5e-5)


@pytest.mark.slow
def test_zero3_gathers_full_weights_and_sends_them(ray_cluster, tiny_model, tmp_path):
    from rlhf.trainer import LearnerGroup
    from transformers import AutoModelForCausalLM

    from rlhf.sync.wire import make_spec, unpack_bucket

    group = LearnerGroup(make_cfg(3, replicas=2), tiny_model, "policy", "cpu", [CPU, CPU])
    try:
        expected = hf_state(tiny_model)
        full = ray_cluster.get([a.full_state_dict.remote(bucket_bytes=64 * 1024) for a in group.actors])
        assert full[1] is None
        assert_same_state(full[0], expected)
        # The weight-sync sender: rank 0 returns the object-store payload, the other rank only gathers.
        spec = make_spec("object_store", 64 * 1024)
        payloads = ray_cluster.get(
            [a.send_weights.remote([spec] if r == 0 else []) for r, a in enumerate(group.actors)]
        )
        assert payloads[1] == [] and payloads[0][0].num_buckets > 1
        received = {}
        for ref in payloads[0][0].refs:
            received.update({n: t.clone() for n, t in unpack_bucket(ray_cluster.get(ref))})
        assert_same_state(received, expected)
        # Three rows on two ranks with small micro-batches: a ZeRO-3 step still lines up and trains.
        batch = on_policy(group, make_batch(rows=3, seed=5))
        torch.testing.assert_close(
            batch.rollout_logprobs, hf_logprobs(tiny_model, batch, 0.7), atol=1e-5, rtol=0
        )
        group.micro_batch_tokens = 30
        stats = group.train(batch)
        assert stats["optimizer_steps"] == 1 and stats["grad_norm"] > 0
        trained = group.full_state_dict()
        group.save(str(tmp_path / "zero3"))
        group.train(batch)
        assert group.load(str(tmp_path / "zero3")) == 1
        assert_same_state(group.full_state_dict(), trained)
        exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "zero3" / "hf"))
        assert_same_state({n: p.detach() for n, p in exported.named_parameters()}, trained)
    finally:
        group.shutdown()


@pytest.mark.slow
def test_reference_and_critic_roles(ray_cluster, tiny_model):
    from rlhf.trainer import LearnerGroup

    batch = make_batch(rows=4, seed=6)
    reference = LearnerGroup(make_cfg(3), tiny_model, "reference", "cpu", [CPU])
    try:
        torch.testing.assert_close(
            reference.logprobs(batch), hf_logprobs(tiny_model, batch, 0.7), atol=1e-5, rtol=0
        )
        with pytest.raises(ray_cluster.exceptions.RayTaskError, match="frozen"):
            ray_cluster.get(reference.actors[0].train.remote(batch, []))
    finally:
        reference.shutdown()

    cfg = make_cfg(2, gradient_checkpointing=True)
    cfg.trainer.critic.lr = 1e-2
    critic = LearnerGroup(cfg, tiny_model, "critic", "cpu", [CPU])
    try:
        values = critic.values(batch)
        assert values.shape == batch.input_ids.shape and (values == 0).all()  # a fresh head starts at V = 0
        batch.values, batch.returns = values, batch.loss_mask.clone()  # target: V = 1 on response tokens
        losses = [critic.train(batch)["loss"] for _ in range(5)]
        after = critic.values(batch)
        assert losses[-1] < losses[0]
        assert ((after * batch.loss_mask).sum() / batch.loss_mask.sum()) > 0.05
    finally:
        critic.shutdown()


def test_gpu_learners_that_offload_the_optimizer_get_cores_for_the_cpu_adam(monkeypatch):
    """Ray would give a num_cpus=1 actor OMP_NUM_THREADS=1: DeepSpeed's CPU Adam on one core."""
    import os
    from types import SimpleNamespace

    from rlhf.trainer.group import LearnerGroup

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("RLHF_CPU_THREADS", raising=False)
    cfg = RunConfig()
    cfg.trainer.offload_optimizer = True
    ranks = SimpleNamespace(cfg=cfg, role="policy", device="cuda", world_size=2)

    def threads(group) -> str | None:
        opts = LearnerGroup._actor_options(group, cfg.placement.learner, None)
        return opts["runtime_env"]["env_vars"].get("OMP_NUM_THREADS")

    assert threads(ranks) == "8"  # the machine's cores shared by the two ranks
    monkeypatch.setenv("RLHF_CPU_THREADS", "3")
    assert threads(ranks) == "3"
    assert threads(SimpleNamespace(cfg=cfg, role="reference", device="cuda", world_size=2)) is None
    cfg.trainer.offload_optimizer = False
    assert threads(ranks) is None  # nothing on the CPU to thread: Ray's default stands
