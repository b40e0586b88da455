"""FP8 weights as vLLM's online FP8 linear methods hold them, computed from a bf16/fp32 weight.

An engine built with `rollout.quantization: fp8` quantizes every linear layer when it loads weights
(vLLM "online" FP8) and again after every push (`rlhf.sync.engine_extension`: vLLM's layer-wise
reload reruns the layer's `process_weights_after_loading`). `quantize_fp8` computes the same tensors
outside vLLM, for three reasons: tests check the engine's weights against it bit for bit, the audit
can tell quantization error from sync error, and a learner that wants to send FP8 (half the bytes)
has the exact layout to produce.

Layouts (vLLM 0.32 `model_executor/layers/quantization/online/fp8.py`; vLLM 0.26's `Fp8LinearMethod`
on a bf16 checkpoint does the per-tensor one):

| layout | vLLM method | weight held | scale held |
| --- | --- | --- | --- |
| `tensor` | `fp8_per_tensor` (0.26: `fp8`) | `[in, out]` (the quantized `[out, in]` transposed) | `weight_scale` `[1]` |
| `channel` | `fp8_per_channel` | `[in, out]` (transposed) | `weight_scale` `[out, 1]` |
| `block` | `fp8_per_block` | `[out, in]` | `weight_scale_inv` `[ceil(out/128), ceil(in/128)]` |

A fused layer (q/k/v in `qkv_proj`, gate/up in `gate_up_proj`) is quantized as one weight: the
online methods take one per-tensor scale over the whole fused weight, not one per logical shard
(per-shard scales exist only for FP8 checkpoints, and vLLM folds them into one). The layout is the
quantization method's own; some GPU kernels transform it further in their own post-load step (the
Marlin kernel of GPUs without FP8 units repacks it), which this module does not reproduce.
"""

from __future__ import annotations

import dataclasses

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
LAYOUTS = ("tensor", "channel", "block")
BLOCK = (128, 128)
# vLLM's online-quantization names for each layout, and the name vLLM before the online shorthands
# (0.26) gives its per-tensor online quantization.
VLLM_METHODS = {"tensor": "fp8_per_tensor", "channel": "fp8_per_channel", "block": "fp8_per_block"}
# What `model_config.quantization` reads in an engine that quantizes a bf16 checkpoint to FP8 itself.
FP8_ONLINE_METHODS = ("fp8", *VLLM_METHODS.values())
SCALE_NAMES = {"tensor": "weight_scale", "channel": "weight_scale", "block": "weight_scale_inv"}
# Smallest per-channel scale vLLM allows (an all-zero row would otherwise divide by zero).
_MIN_CHANNEL_SCALE = 1.0 / (FP8_MAX * 512)
_MIN_BLOCK_AMAX = 1e-4


@dataclasses.dataclass
class Fp8Weight:
    """One linear layer's FP8 weight and scale, in the shapes, dtypes and names vLLM holds them."""

    weight: torch.Tensor  # float8_e4m3fn
    scale: torch.Tensor  # float32
    layout: str
    scale_name: str

    def dequantize(self) -> torch.Tensor:
        """The float32 weight `[out, in]` the engine computes with (weight x scale)."""
        return dequantize_fp8(self.weight, self.scale, self.layout)


def _check(weight: torch.Tensor, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"fp8 layout: expected one of {LAYOUTS}, got {layout!r}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"fp8: expected a 2-d floating-point weight [out, in], got {tuple(weight.shape)}")


def quantize_fp8(weight: torch.Tensor, layout: str = "tensor", block: tuple[int, int] = BLOCK) -> Fp8Weight:
    """`weight` `[out, in]` (bf16/fp16/fp32) quantized to float8_e4m3fn as vLLM's online FP8 does.

    tensor: scale = max|w| / 448 (float32), w * (1 / scale) clamped to +-448 (vLLM's static
    `scaled_fp8_quant` kernel multiplies by the reciprocal). channel: scale per output row,
    max|w_row| / 448 floored at 1 / (448 * 512), true division. block: the weight zero-padded to whole
    blocks, scale per block max(max|w_block|, 1e-4) / 448, w * (1 / scale)."""
    _check(weight, layout)
    weight = weight.detach()
    if layout == "tensor":
        lo, hi = weight.aminmax()
        amax = torch.maximum(lo.abs(), hi.abs()).to(torch.float32).reshape(1)
        scale = amax / torch.tensor(FP8_MAX, dtype=torch.float32, device=weight.device)
        # an all-zero weight: vLLM would divide by 0; any positive scale gives the zeros back
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (weight.float() * (1.0 / safe)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return Fp8Weight(q.t(), scale, layout, SCALE_NAMES[layout])
    if layout == "channel":
        lo, hi = weight.aminmax(dim=-1, keepdim=True)
        amax = torch.maximum(lo.abs(), hi.abs()).to(torch.float32)
        scale = (amax / torch.tensor(FP8_MAX, dtype=torch.float32, device=weight.device)).clamp_min(
            _MIN_CHANNEL_SCALE
        )
        q = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return Fp8Weight(q.t(), scale, layout, SCALE_NAMES[layout])
    rows, cols = weight.shape
    bm, bn = block
    padded = torch.zeros((-(-rows // bm) * bm, -(-cols // bn) * bn), dtype=weight.dtype, device=weight.device)
    padded[:rows, :cols] = weight
    view = padded.view(-1, bm, padded.shape[1] // bn, bn)
    amax = view.abs().float().amax(dim=(1, 3), keepdim=True).clamp(_MIN_BLOCK_AMAX)
    scale = amax / FP8_MAX
    q = (view * (1.0 / scale)).to(FP8_DTYPE).view_as(padded)[:rows, :cols].contiguous()
    return Fp8Weight(q, scale.view(view.shape[0], view.shape[2]), layout, SCALE_NAMES[layout])


def dequantize_fp8(
    weight: torch.Tensor, scale: torch.Tensor, layout: str, block: tuple[int, int] = BLOCK
) -> torch.Tensor:
    """The float32 `[out, in]` weight an FP8 layer (as `quantize_fp8` returns it) stands for."""
    if layout not in LAYOUTS:
        raise ValueError(f"fp8 layout: expected one of {LAYOUTS}, got {layout!r}")
    w = weight.float()
    if layout in ("tensor", "channel"):  # held [in, out]; scale [1] or [out, 1]
        return w.t() * scale.float()
    rows, cols = w.shape
    expand = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return w * expand[:rows, :cols]


def vllm_quantization(layout: str = "tensor") -> str:
    """The `quantization=` argument that makes this vLLM quantize a bf16 checkpoint online in `layout`.

    vLLM 0.32 refuses `fp8` on a bf16 checkpoint ("no longer supports online quantization") and
    names the online methods `fp8_per_tensor` / `fp8_per_channel` / `fp8_per_block`; earlier
    versions (0.26) quantize online with `fp8`, per tensor only."""
    if layout not in LAYOUTS:
        raise ValueError(f"fp8 layout: expected one of {LAYOUTS}, got {layout!r}")
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    if VLLM_METHODS[layout] in QUANTIZATION_METHODS:
        return VLLM_METHODS[layout]
    if layout == "tensor":
        return "fp8"
    raise ValueError(f"fp8 layout {layout!r}: this vLLM has no online {VLLM_METHODS[layout]} quantization")
