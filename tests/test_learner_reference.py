"""Our `Learner` against plain PyTorch, and what DeepSpeed keeps in fp32 (what the TRL comparison needed guarded).

The learners run in this process, without Ray (as `experiments/bench/bench_step.py::learner_alone`
does): rank 0 of a world of one on gloo, on the tiny random llama of `tiny_model_dir`.

* fp32, ZeRO 0 and 2: three optimizer steps of the learner (several micro-batches, global
  normalisers) give the same losses, gradient norms, learning rates and weights as a hand-written
  loop: the same HF model loaded fresh, `policy_loss` on plain log_softmax log-probs of the whole
  batch, `torch.nn.utils.clip_grad_norm_` and `torch.optim.AdamW` with the trainer's settings.
* bf16, ZeRO 0, 1 and 2: the module trains in bf16 while the optimizer steps fp32 master weights
  with fp32 Adam moments (docs/trainer.md, "Precision: what DeepSpeed keeps in fp32"), and takes no
  optimizer step of its own before ours (DeepSpeed 0.19's own half-precision ZeRO-0 wrapper does,
  in its constructor: trainer/ds_config.py runs bf16 ZeRO-0 as ZeRO-1 for that reason).
"""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from rlhf.algorithms.losses import loss_normalizers, policy_loss
from rlhf.config.schema import RunConfig
from rlhf.testing import random_token_rows, whole_batch_step
from rlhf.types import TrainBatch

pytestmark = pytest.mark.skipif(
    os.environ.get("DS_ACCELERATOR") != "cpu",
    reason="in-process CPU learners need DS_ACCELERATOR=cpu before DeepSpeed is imported (scripts/test.sh)",
)

STEPS = 3
TEMPERATURE = 0.7
MAX_GRAD_NORM = 1.0  # below the first steps' gradient norms: clipping is part of what is compared
LR_FACTORS = [0.5, 1.0, 1.0]  # warm-up over 2 steps, then cosine from step 2 of 3: still at 1


# ---------------------------------------------------------------------------------------------- helpers
def make_learner(cfg: RunConfig, model_dir: str):
    from rlhf.trainer.learner import Learner

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Learner(cfg, model_dir, "policy", "cpu", 0, 1, "127.0.0.1", port)


def make_cfg(zero_stage: int, dtype: str = "float32") -> RunConfig:
    cfg = RunConfig()
    cfg.steps = STEPS  # the LR schedule's length: steps x ppo_epochs x mini_batches
    cfg.model.dtype = dtype
    cfg.placement.device = "cpu"
    cfg.rollout.sampling.temperature = TEMPERATURE
    t = cfg.trainer
    t.zero_stage = zero_stage
    t.lr, t.warmup_steps, t.min_lr_ratio = 1e-3, 2, 0.1
    t.weight_decay, t.adam_betas = 0.1, (0.9, 0.95)  # not the defaults: both must reach the optimizer
    t.max_grad_norm = MAX_GRAD_NORM
    t.micro_batch_tokens = 40  # several micro-batches per step
    cfg.algorithm.kl_coef = 0.05  # the KL term is in the loss too
    return cfg


def plain_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_t | tokens < t) at the sampling temperature, position 0 = 0: textbook autograd."""
    logp = torch.log_softmax(logits[:, :-1].float() / TEMPERATURE, dim=-1)
    return F.pad(logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1), (1, 0))


def load_hf(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


def make_batch(model_dir: str, rows: int = 6, width: int = 24, prompt: int = 5, seed: int = 0) -> TrainBatch:
    """Random right-padded rows; pi_old and pi_ref are the initial model's log-probs plus noise, so the
    ratios start away from 1 (some tokens clipped) and the KL term is not zero."""
    g = torch.Generator().manual_seed(seed)
    input_ids, attention, loss_mask = random_token_rows(rows, width, prompt, g)
    with torch.no_grad():
        logits = load_hf(model_dir)(input_ids=input_ids, attention_mask=attention).logits
    initial = plain_logprobs(logits, input_ids) * attention
    old = (initial + 0.3 * torch.randn(rows, width, generator=g)) * loss_mask
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=loss_mask,
        rollout_logprobs=old.clone(),  # = pi_old: no off-policy weight
        advantages=(torch.randn(rows, 1, generator=g) * loss_mask).contiguous(),
        rewards=torch.zeros(rows),
        ref_logprobs=(initial - 0.2 * torch.rand(rows, width, generator=g)) * loss_mask,
        old_logprobs=old,
    )


def reference_run(cfg: RunConfig, model_dir: str, batch: TrainBatch) -> list[dict]:
    """The same steps in plain PyTorch: one full-batch forward/backward per step, fp32."""
    model = load_hf(model_dir)
    model.train()
    t = cfg.trainer
    # trainer/ds_config.py::make_optimizer on CPU: torch.optim.AdamW(lr, betas, weight_decay); eps is
    # not configurable, so torch's default 1e-8 (FusedAdam's and DeepSpeedCPUAdam's default too).
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay, eps=1e-8
    )
    alg = dataclasses.replace(
        cfg.algorithm,
        loss_agg_constant=cfg.algorithm.loss_agg_constant or cfg.rollout.sampling.max_new_tokens,
    )
    num_tokens, num_sequences = loss_normalizers(batch.loss_mask)
    out = []
    for k in range(STEPS):
        lr = t.lr * LR_FACTORS[k]
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss, _ = policy_loss(
            plain_logprobs(logits, batch.input_ids),
            batch.old_logprobs,
            batch.advantages,
            batch.loss_mask,
            alg,
            ref_logprobs=batch.ref_logprobs,
            rollout_logprobs=batch.rollout_logprobs,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
        )
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        state = {name: p.detach().clone() for name, p in model.named_parameters()}
        out.append({"loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": lr, "state": state})
    return out


def learner_run_steps(learner, batch: TrainBatch, steps: int = STEPS) -> list[dict]:
    """`steps` optimizer steps of the learner on the whole batch (packed into micro-batches); each
    step's stats with the full weights after it in `state`."""
    step = whole_batch_step(batch, learner.cfg.trainer.micro_batch_tokens)
    assert len(step["micro_batches"]) > 1
    out = []
    for _ in range(steps):
        (stats,) = learner.train(batch, [step])
        out.append({**stats, "state": learner.full_state_dict()})
    return out


def weight_diffs(got: dict, expected: dict, initial: dict) -> tuple[float, float, float]:
    """(max |w - w_ref|, sum |w - w_ref| / sum |w_ref - w_0|, max |w_ref - w_0|) over all parameters:
    the largest difference, the difference relative to how far the reference moved, how far it moved."""
    assert got.keys() == expected.keys()
    diff = max(float((got[n] - expected[n]).abs().max()) for n in expected)
    l1 = sum(float((got[n] - expected[n]).abs().sum()) for n in expected)
    moved_l1 = sum(float((expected[n] - initial[n]).abs().sum()) for n in expected)
    moved = max(float((expected[n] - initial[n]).abs().max()) for n in expected)
    return diff, l1 / moved_l1, moved


# ---------------------------------------------------------------------------------------------- fp32
@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,offload_ratio", [(0, None), (2, None), (3, 0.5)])
def test_learner_steps_match_plain_pytorch(zero_stage, offload_ratio, in_process, tiny_model_dir):
    """(3, 0.5): ZeRO-3 with half the optimizer states offloaded (DeepSpeed's CPU Adam steps that half,
    torch's AdamW the other) makes the same steps."""
    cfg = make_cfg(zero_stage)
    if offload_ratio is not None:
        cfg.trainer.offload_optimizer, cfg.trainer.offload_ratio = True, offload_ratio
    batch = make_batch(tiny_model_dir)
    initial = {name: p.detach().clone() for name, p in load_hf(tiny_model_dir).named_parameters()}
    expected = reference_run(cfg, tiny_model_dir, batch)
    learner = make_learner(cfg, tiny_model_dir)
    if offload_ratio is not None:  # ~20 sub-groups, half of them stepped by the CPU Adam
        split = list(learner.optimizer.subgroup_to_device)
        assert len(split) > 10 and len(learner.optimizer.fp16_partitioned_groups_flat) == len(split)
    got = learner_run_steps(learner, batch)

    # The comparison exercises clipping (the first step's norm is above max_grad_norm) ...
    assert expected[0]["grad_norm"] > MAX_GRAD_NORM
    for k, (g, e) in enumerate(zip(got, expected)):
        diff, rel_update, moved = weight_diffs(g["state"], e["state"], initial)
        print(
            f"ZeRO-{zero_stage} step {k}: loss {g['loss']:.9g} vs {e['loss']:.9g}, grad_norm "
            f"{g['grad_norm']:.9g} vs {e['grad_norm']:.9g}, lr {g['lr']:.3g} vs {e['lr']:.3g}, "
            f"max |dw| {diff:.3g}, update rel. L1 {rel_update:.3g} (moved up to {moved:.3g})"
        )
        assert g["skipped"] == 0.0
        assert g["lr"] == pytest.approx(e["lr"], rel=1e-12), f"step {k}: LR schedule"
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-5, abs=1e-7), f"step {k}: loss"
        assert g["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-5), f"step {k}: grad norm"
        # ... and the steps moved weights by up to ~lr per entry (weights are O(1): norm gains are 1).
        assert moved > 1e-4
        # Identical up to float re-association (micro-batches vs one batch: gradients differ by <1e-6
        # relative). Adam's lr * g / (|g| + eps) magnifies that only where |g| ~ eps = 1e-8: one lm_head
        # entry (g ~ -1.3e-8, 1.5% apart) moves ~4e-6 differently; everywhere else < 1e-6.
        assert diff < 1e-5, f"step {k}: weights differ by up to {diff:.3g}"
        # In bulk the updates agree to ~2e-7. A missing clip (1e-4 at step 0, 2e-2 after), no weight
        # decay (2e-3), beta2 0.999 (4e-3 at step 1) or eps 1e-6 (1e-2) would all show here.
        assert rel_update < 1e-5, f"step {k}: updates differ by {rel_update:.3g} (relative L1)"


# ---------------------------------------------------------------------------------------------- bf16
def master_copies(optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(bf16 tensor the module computes with, fp32 master the optimizer steps) pairs of a DeepSpeed
    optimizer wrapper, for one rank.

    ZeRO-0 + bf16 is DeepSpeed's "DDP_BFLOAT16" path (engine.py `_do_optimizer_sanity_check`):
    `FP16_UnfusedOptimizer` (fp16/unfused_optimizer.py) around our torch AdamW, one fp32 clone per
    parameter in `fp32_groups` (with DeepSpeed's FusedAdam on GPU: `FP16_Optimizer`, fp16/fused_optimizer.py,
    flat `fp32_groups_flat`). ZeRO-1/2: `DeepSpeedZeroOptimizer` (zero/stage_1_and_2.py), this rank's
    flat fp32 partition in `single_partition_of_fp32_groups`. `BF16_Optimizer` (bf16_optimizer.py) is
    only chosen for ZeRO-1 with `data_types.grad_accum_dtype: fp32`, which we do not set.
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        return [
            (p, m) for ps, ms in zip(optimizer.fp16_groups, optimizer.fp32_groups) for p, m in zip(ps, ms)
        ]
    assert isinstance(optimizer, DeepSpeedZeroOptimizer), type(optimizer).__name__
    rank = 0  # world size 1: this rank's partition is the whole flat group
    return [
        (partitions[rank], master)
        for partitions, master in zip(
            optimizer.parallel_partitioned_bit16_groups, optimizer.single_partition_of_fp32_groups
        )
    ]


def bf16_learner(zero_stage: int, model_dir: str, monkeypatch, masters_from_checkpoint: bool = True):
    """A bf16 learner on the CPU: DeepSpeed runs its bf16 path here (every stage); it is our
    make_ds_config that refuses bf16 for CPU learners, so hand it the config a GPU learner gets."""
    import rlhf.trainer.ds_config as ds_config

    make_gpu_config = ds_config.make_ds_config
    monkeypatch.setattr(
        ds_config,
        "make_ds_config",
        lambda tc, device, dtype, ws, **kw: make_gpu_config(tc, "cuda", dtype, ws, **kw),
    )
    cfg = make_cfg(zero_stage, dtype="bfloat16")
    cfg.trainer.masters_from_checkpoint = masters_from_checkpoint
    return make_learner(cfg, model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_bf16_learner_steps_fp32_master_weights_and_adam_state(
    zero_stage, in_process, tiny_model_dir, monkeypatch
):
    """bf16 module, fp32 master weights, fp32 gradients at the Adam step, fp32 exp_avg/exp_avg_sq."""
    learner = bf16_learner(zero_stage, tiny_model_dir, monkeypatch)
    engine, wrapper, adam = learner.engine, learner.optimizer, learner.engine.basic_optimizer
    assert isinstance(adam, torch.optim.AdamW)  # trainer/ds_config.py make_optimizer on CPU
    module_params = list(engine.module.parameters())
    assert {p.dtype for p in module_params} == {torch.bfloat16}
    pairs = master_copies(wrapper)
    masters = [m for _, m in pairs]
    assert {m.dtype for m in masters} == {torch.float32}
    # Adam steps the masters (every element of the model once), not the module's bf16 parameters.
    assert [id(p) for g in adam.param_groups for p in g["params"]] == [id(m) for m in masters]
    assert sum(m.numel() for m in masters) == sum(p.numel() for p in module_params)

    # Gradients: what DeepSpeed has accumulated over the micro-batches when its step starts, and
    # what the Adam step itself gets.
    seen: dict[str, set] = {}
    wrapper_step = wrapper.step

    def before_deepspeed_step(*args, **kwargs):
        # reduced into this rank's flat partition (ZeRO-0 in half precision runs as ZeRO-1, see ds_config)
        seen["accumulated"] = {g.dtype for grads in wrapper.averaged_gradients.values() for g in grads}
        return wrapper_step(*args, **kwargs)

    monkeypatch.setattr(wrapper, "step", before_deepspeed_step)
    handle = adam.register_step_pre_hook(
        lambda opt, args, kwargs: seen.update(
            adam_grads={p.grad.dtype for g in opt.param_groups for p in g["params"]}
        )
    )
    try:
        (stats,) = learner_run_steps(learner, make_batch(tiny_model_dir), 1)
    finally:
        handle.remove()
    assert stats["skipped"] == 0.0 and stats["grad_norm"] > 0
    # DeepSpeed's grad_accum_dtype defaults to the model dtype (engine.py get_data_types): bf16.
    assert engine.get_data_types() == (torch.bfloat16, torch.bfloat16)
    assert seen == {"accumulated": {torch.bfloat16}, "adam_grads": {torch.float32}}

    # Adam's state lives on the fp32 masters, in fp32.
    assert {id(p) for p in adam.state} == {id(m) for m in masters}
    for m in masters:
        state = adam.state[m]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == m.shape
    # The step updated the masters in fp32 and copied them, rounded, into the module's bf16 weights:
    # the masters hold what bf16 cannot (after one step almost no entry is a bf16 number).
    for weights, master in pairs:
        assert torch.equal(weights, master.to(torch.bfloat16))
    not_bf16 = sum(int((m != m.to(torch.bfloat16).float()).sum()) for m in masters)
    assert not_bf16 > 0.9 * sum(m.numel() for m in masters)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_bf16_optimizer_takes_no_step_before_the_first_train_step(
    zero_stage, in_process, tiny_model_dir, monkeypatch
):
    """Adam's state must count our optimizer steps only, and the masters must start as the loaded
    weights: an extra step shrinks the first updates and applies weight decay once more."""
    learner = bf16_learner(zero_stage, tiny_model_dir, monkeypatch, masters_from_checkpoint=False)
    adam = learner.engine.basic_optimizer
    pairs = master_copies(learner.optimizer)
    assert {int(s["step"]) for s in adam.state.values()} <= {0}, "Adam stepped before any training"
    for weights, master in pairs:
        assert torch.equal(master, weights.float()), "the masters are not the loaded weights"
    learner_run_steps(learner, make_batch(tiny_model_dir), 1)
    assert {int(s["step"]) for s in adam.state.values()} == {1}
    assert learner.engine.zero_optimization_stage() == max(
        zero_stage, 1
    )  # half-precision ZeRO-0 runs as ZeRO-1


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_bf16_masters_start_from_the_fp32_checkpoint(zero_stage, in_process, tiny_model_dir, monkeypatch):
    """The fp32 masters hold the checkpoint's own fp32 values, not their bf16 roundings, so that an
    update far below a bf16 step still moves the rounded weights on average (trainer/masters.py)."""
    from deepspeed.utils import safe_get_full_fp32_param
    from rlhf.trainer.masters import fp32_checkpoint_tensors
    from safetensors.torch import load_file

    stored = fp32_checkpoint_tensors(tiny_model_dir)
    checkpoint = {}
    for path in set(stored.values()):
        checkpoint.update(load_file(path))
    learner = bf16_learner(zero_stage, tiny_model_dir, monkeypatch)
    params = dict(learner.engine.module.named_parameters())
    assert learner.masters_restored == len(params) and set(params) <= set(stored)
    off_grid = 0
    for name, param in params.items():
        master = safe_get_full_fp32_param(param)
        assert torch.equal(master, checkpoint[name]), name  # the fp32 value itself
        assert torch.equal(param.data, checkpoint[name].to(torch.bfloat16)), name  # the module: its rounding
        off_grid += int((master != param.data.float()).sum())
    assert off_grid > 0.9 * sum(
        p.numel() for p in params.values()
    )  # random fp32 weights: few are bf16 numbers
    # one optimizer step of lr 1e-3 on top: the rounded module still equals the rounded masters
    learner_run_steps(learner, make_batch(tiny_model_dir), 1)
    for name, param in params.items():
        assert torch.equal(param.data, safe_get_full_fp32_param(param).to(torch.bfloat16)), name


def test_zero3_partition_of_a_tensor_the_ranks_do_not_divide():
    from rlhf.trainer.masters import zero3_partition

    value = torch.arange(7.0).reshape(7, 1)
    assert zero3_partition(value, 0, 4).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert zero3_partition(value, 1, 4).tolist() == [4.0, 5.0, 6.0, 0.0]  # the last part padded


def test_bf16_zero3_learner_scores_the_checkpoint_model(in_process, tiny_model_dir, monkeypatch):
    """ZeRO-3 builds the model inside zero.Init, which made the rotary frequencies bf16: the learner
    then scored another model than the checkpoint (3.7e-4 mean here at 200 positions; 0.33 on the
    7B shape against vLLM). With them recomputed in fp32 it scores the plain bf16 model's logprobs."""
    from transformers import AutoModelForCausalLM

    # Before the learner: a live ZeRO-3 config makes every later from_pretrained use zero.Init too.
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    learner = bf16_learner(3, tiny_model_dir, monkeypatch)
    assert learner.rotary_restored == 1
    assert all(b.dtype == torch.float32 for n, b in learner.engine.module.named_buffers() if "inv_freq" in n)

    ids = torch.randint(3, 500, (2, 200), generator=torch.Generator().manual_seed(0))
    ones = torch.ones(2, 200)
    batch = TrainBatch(ids, ones.long(), ones, None, torch.zeros(2, 200), torch.zeros(2))
    got = learner.logprobs(batch, temperature=1.0)[:, 1:]
    with torch.no_grad():
        logits = plain(ids).logits.float()[:, :-1]
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert float((got - want).abs().mean()) < 1e-5


@pytest.mark.slow
def test_bf16_zero3_masters_start_from_the_fp32_checkpoint(in_process, tiny_model_dir, monkeypatch):
    """ZeRO-3: each rank's fp32 master partition holds its part of the checkpoint's fp32 values."""
    from deepspeed.utils import safe_get_local_fp32_param
    from rlhf.trainer.masters import fp32_checkpoint_tensors
    from safetensors.torch import load_file

    checkpoint = {}
    for path in set(fp32_checkpoint_tensors(tiny_model_dir).values()):
        checkpoint.update(load_file(path))
    learner = bf16_learner(3, tiny_model_dir, monkeypatch)
    params = dict(learner.engine.module.named_parameters())
    assert learner.masters_restored == len(params)
    off_grid = 0
    for name, param in params.items():
        local = safe_get_local_fp32_param(param).flatten().cpu()
        expected = checkpoint[name].flatten()  # world size 1: one partition, padded at most
        assert torch.equal(local[: expected.numel()], expected), name
        assert not local[expected.numel() :].any(), name
        off_grid += int((expected != expected.to(torch.bfloat16).float()).sum())
    assert off_grid > 0.9 * sum(c.numel() for c in checkpoint.values() if c.dtype == torch.float32)
