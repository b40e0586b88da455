"""DeepSpeed config, optimizer and LR schedule for one learner role.

We drive gradient accumulation ourselves (micro-batches are packed by token budget, so their number
varies per step), hence `train_micro_batch_size_per_gpu = gradient_accumulation_steps = 1`: DeepSpeed
never rescales the loss, and the learner marks the accumulation boundary on the last micro-batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhf.config.schema import TrainerConfig


def make_ds_config(
    trainer_cfg: TrainerConfig,
    device: str,
    dtype: torch.dtype,
    world_size: int,
    *,
    train: bool = True,
    num_params: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict. `train=False` (reference model) leaves out optimizer-only settings.

    Partial offload (`trainer.offload_ratio` < 1) assigns whole ZeRO-3 sub-groups to the host or the
    GPU, so the parameters (`num_params`) are cut into ~20 sub-groups: the ratio holds to ~5 %."""
    stage = int(trainer_cfg.zero_stage)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"trainer.zero_stage must be 0, 1, 2 or 3, got {trainer_cfg.zero_stage!r}")
    if device == "cpu" and dtype != torch.float32:
        raise ValueError(
            f"model.dtype: learners on CPU train in float32, got {dtype} (use dtype: auto or float32)"
        )
    if train and stage == 0 and dtype != torch.float32:
        # DeepSpeed 0.19's half-precision ZeRO-0 wrappers (FP16_UnfusedOptimizer / FP16_Optimizer) run
        # optimizer.step() on zero gradients when they are built: Adam's step count starts at 1 (the
        # first updates come out 0.74x) and the fp32 masters are weight-decayed once before training.
        # ZeRO-1 keeps the same fp32 masters and Adam state without that step (on one rank it is the
        # same memory; on several it partitions the optimizer state). tests/test_learner_reference.py.
        stage = 1
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # Let save_16bit_model / GatheredParameters produce full HF weights from the shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if train and trainer_cfg.offload_optimizer:
        if stage == 0:
            raise ValueError("trainer.offload_optimizer needs trainer.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device == "cuda"}
        ratio = float(trainer_cfg.offload_ratio)
        if ratio < 1:
            if stage != 3:
                raise ValueError("trainer.offload_ratio below 1 needs trainer.zero_stage=3")
            zero["offload_optimizer"]["ratio"] = ratio
            if num_params:
                zero["sub_group_size"] = max(int(num_params) // 20, 1)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        # We bring our own optimizer object (torch AdamW on CPU): DeepSpeed only "tests" its own.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train:
        config["gradient_clipping"] = float(trainer_cfg.max_grad_norm) if trainer_cfg.max_grad_norm else 0.0
    return config


def make_optimizer(params, trainer_cfg: TrainerConfig, device: str, lr: float) -> torch.optim.Optimizer:
    """AdamW: DeepSpeedCPUAdam with optimizer offload, DeepSpeed FusedAdam on GPU, torch AdamW on CPU.

    DeepSpeedCPUAdam / FusedAdam are JIT-compiled ops; on CPU torch's AdamW needs no compiler. If FusedAdam
    cannot be built on a GPU host (no CUDA toolkit), torch's fused AdamW is equivalent.
    """
    params = [p for p in params if p.requires_grad]
    kwargs = dict(lr=lr, betas=tuple(trainer_cfg.adam_betas), weight_decay=trainer_cfg.weight_decay)
    if trainer_cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    if device == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(params, adam_w_mode=True, **kwargs)
        except Exception as e:  # op build failed (no nvcc): torch's own fused kernel is as fast
            print(
                f"[trainer] FusedAdam unavailable ({type(e).__name__}: {e}); using torch.optim.AdamW(fused=True)"
            )
            return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def lr_lambda(warmup_steps: int, total_steps: int | None, min_lr_ratio: float):
    """Multiplier of the base LR after `step` optimizer steps: linear warm-up, then constant
    (min_lr_ratio == 1 or unknown length) or cosine decay to `min_lr_ratio` at `total_steps`."""
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"trainer.min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if min_lr_ratio >= 1.0 or not total_steps or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int | None, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, total_steps, min_lr_ratio))
