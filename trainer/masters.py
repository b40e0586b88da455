"""fp32 master weights from the checkpoint itself, not from the bf16 copy of it.

A half-precision learner loads its module in bf16, and DeepSpeed builds the fp32 master weights (the
ones Adam steps) from that module: every master starts exactly on a bf16 value. An update of lr 1e-5
is far below half a bf16 step for most weights, so for many steps neither the learner's bf16 weights
nor the engines' (both rounded from the masters) move: on SmolLM2-135M, after one step 1.8 % of the
bf16 weights changed, and the rounded weights showed 2 % of the intended update (34 % after 20
identical steps). Started from the checkpoint's own fp32 values, which lie between bf16 values, the
rounded weights follow the masters' drift on average from the first step, as a learner that keeps
fp32 weights under autocast does (TRL). See experiments/results/learning/README.md.

Only tensors the checkpoint stores in fp32 are restored: a bf16 checkpoint's values are bf16 numbers
already, and the masters built from them are exact.
"""

from __future__ import annotations

import glob
import os

import torch
from torch import nn


def fp32_checkpoint_tensors(model_path: str) -> dict[str, str]:
    """{tensor name: safetensors file} of the tensors `model_path` stores in float32."""
    from safetensors import safe_open

    found: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(model_path, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                if f.get_slice(name).get_dtype() == "F32":
                    found[name] = path
    return found


def restore_fp32_masters(module: nn.Module, model_path: str, prefix: str = "") -> int:
    """Set each DeepSpeed fp32 master of `module` to the checkpoint's fp32 value of that parameter.

    Call on every rank right after `deepspeed.initialize`: each rank writes its own part (ZeRO 1 and 2
    through DeepSpeed's fragment mapping, ZeRO-3 its local partition).
    `prefix` is prepended to the module's parameter names to find them in the checkpoint. Returns
    the number of parameters restored; parameters the checkpoint lacks or stores in half precision
    keep the masters DeepSpeed built."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param
    from safetensors import safe_open

    stored = fp32_checkpoint_tensors(model_path)
    restored = 0
    files: dict[str, object] = {}
    for name, param in module.named_parameters():
        path = stored.get(prefix + name)
        zero3 = getattr(param, "_z3_optimizer", None) is not None
        has_master = zero3 or getattr(param, "_hp_mapping", None) is not None
        if path is None or not param.requires_grad or not has_master:
            continue
        if path not in files:
            files[path] = safe_open(path, framework="pt")
        value = files[path].get_tensor(prefix + name)
        if tuple(value.shape) != tuple(param.ds_shape if zero3 else param.shape):
            continue
        if zero3:
            # Not set_full_hp_param: DeepSpeed 0.19's stage-3 version slices past the end of a
            # parameter whose size the ranks do not divide (the last partition is padded).
            rank = param._z3_optimizer._get_param_partition_rank(param)
            safe_set_local_fp32_param(param, zero3_partition(value.float(), rank, param.ds_tensor.numel()))
        else:
            safe_set_full_fp32_param(param, value.float())
        restored += 1
    return restored


def zero3_partition(value: torch.Tensor, rank: int, partition_numel: int) -> torch.Tensor:
    """`rank`'s ZeRO-3 partition of `value`: the flattened tensor cut into equal parts of
    `partition_numel` elements, the last part padded with zeros."""
    part = value.flatten()[rank * partition_numel : (rank + 1) * partition_numel]
    if part.numel() < partition_numel:
        part = torch.cat([part, part.new_zeros(partition_numel - part.numel())])
    return part
