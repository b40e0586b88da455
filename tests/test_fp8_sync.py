"""FP8 engines: `rlhf.sync.fp8.quantize_fp8` against hand-computed values and against vLLM itself.

The vLLM test builds vLLM's own Llama and Qwen2 classes with online FP8 quantization on CPU (in a
subprocess: vLLM's parallel state is per process), loads a checkpoint, then pushes new weights the
way an FP8 engine receives them (vLLM's layer-wise reload around `load_weights`, which reruns each
layer's quantization; the second push through the engine's own receiving end,
`WeightUpdateExtension.receive_weights`, asked for `replay`, which a quantized engine replaces): after either, every linear layer (the fused `qkv_proj` and `gate_up_proj`
included) holds exactly what `quantize_fp8` computes from the fused bf16 weight, bit for bit.
That runs for the `channel` and `block` layouts, whose quantization is plain torch. vLLM's per-tensor
method (`fp8_per_tensor`, what `rollout.quantization: fp8` builds) quantizes with the custom op
`static_scaled_fp8_quant`, which the CPU build of vLLM does not have: its layout (weight `[in, out]`,
scale `[1]` over the whole fused weight) is taken from vLLM's code
(`Fp8PerTensorOnlineLinearMethod.process_weights_after_loading`) and its values are checked against
the hand computation below.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

from rlhf.sync.fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8, quantize_fp8

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_per_tensor_by_hand():
    w = torch.tensor([[896.0, -1.0, 0.5], [2.0, -3.0, 0.0]], dtype=torch.bfloat16)
    q = quantize_fp8(w, "tensor")
    # amax 896 -> scale 2; every w / 2 is an e4m3 number, so the round trip is exact
    assert q.scale_name == "weight_scale" and q.scale.dtype == torch.float32
    assert q.scale.shape == (1,) and q.scale.item() == 2.0
    assert q.weight.dtype == FP8_DTYPE and q.weight.shape == (3, 2)  # held transposed: [in, out]
    assert torch.equal(q.weight.float(), torch.tensor([[448.0, 1.0], [-0.5, -1.5], [0.25, 0.0]]))
    assert torch.equal(q.dequantize(), w.float())


def test_per_channel_by_hand():
    w = torch.tensor([[4.48, -2.24], [-0.0448, 0.0224], [0.0, 0.0]])
    q = quantize_fp8(w, "channel")
    assert q.weight.shape == (2, 3) and q.scale.shape == (3, 1)
    # row scales max|row| / 448; an all-zero row gets vLLM's floor 1 / (448 * 512)
    expected = torch.tensor([[4.48], [0.0448], [0.0]]) / FP8_MAX
    expected[2] = 1.0 / (FP8_MAX * 512)
    torch.testing.assert_close(q.scale, expected, rtol=1e-6, atol=0)
    assert torch.equal(q.weight.t()[:, 0].float(), torch.tensor([448.0, -448.0, 0.0]))
    assert torch.equal(q.weight.t()[:, 1].float(), torch.tensor([-224.0, 224.0, 0.0]))


def test_per_block_by_hand():
    # 3 x 5 weight, blocks of 2 x 4: scales [2, 2]; the padding never reaches the weight
    w = torch.arange(15, dtype=torch.float32).reshape(3, 5) - 7.0
    q = quantize_fp8(w, "block", block=(2, 4))
    assert q.scale_name == "weight_scale_inv"
    assert q.weight.shape == (3, 5) and q.scale.shape == (2, 2)
    blocks = [w[0:2, 0:4], w[0:2, 4:5], w[2:3, 0:4], w[2:3, 4:5]]
    amax = torch.tensor([b.abs().max().item() for b in blocks]).reshape(2, 2)
    torch.testing.assert_close(q.scale, amax / FP8_MAX, rtol=1e-6, atol=0)
    # each block's largest value lands on +-448
    assert q.weight.float().abs().amax() == FP8_MAX
    torch.testing.assert_close(dequantize_fp8(q.weight, q.scale, "block", (2, 4)), w, rtol=2**-4, atol=0)


@pytest.mark.parametrize("layout", ["tensor", "channel", "block"])
def test_round_trip_error_bound(layout):
    """e4m3 keeps 3 mantissa bits: a normal value comes back within half a step (2^-4 relative); below
    the normal range the step is scale * 2^-9."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 260, generator=g) * torch.logspace(-3, 0, 260)).to(torch.bfloat16)
    q = quantize_fp8(w, layout)
    scale = q.scale.float()
    if layout == "block":
        scale = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :260]
    err = (q.dequantize() - w.float()).abs()
    bound = torch.maximum(w.float().abs() * 2**-4, scale * 2**-10) * (1 + 1e-5)
    assert (err <= bound).all(), float((err - bound).max())
    assert err.mean() < w.float().abs().mean() * 0.05  # and a few percent on average


def test_bad_input():
    with pytest.raises(ValueError, match="fp8 layout"):
        quantize_fp8(torch.ones(2, 2), "row")
    with pytest.raises(ValueError, match="2-d"):
        quantize_fp8(torch.ones(4), "tensor")


# ----------------------------------------------------------------------------------------------
# Against vLLM's own online FP8 layers


def fused_reference(weights: dict, module: str) -> torch.Tensor:
    """The `[out, in]` weight of vLLM's linear layer `module`, from the checkpoint's tensors."""
    head, _, leaf = module.rpartition(".")
    parts = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    return torch.cat([weights[f"{head}.{p}.weight"] for p in parts.get(leaf, [leaf])])


def check_layers(model, weights: dict, layout: str) -> int:
    from vllm.model_executor.layers.linear import LinearBase

    checked = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase) or name == "lm_head":
            continue
        expected = quantize_fp8(fused_reference(weights, name), layout)
        if type(getattr(layer.quant_method, "fp8_linear", None)).__name__ == "CPUFp8BlockScaledMMKernel":
            # on CPUs with AMX the block kernel then repacks the weight for its GEMM (its own step)
            expected.weight = torch.ops._C.convert_weight_packed(expected.weight)
        held = getattr(layer, expected.scale_name)
        assert layer.weight.dtype == FP8_DTYPE and held.dtype == torch.float32, name
        assert layer.weight.shape == expected.weight.shape, (name, layer.weight.shape)
        assert held.shape == expected.scale.shape, (name, held.shape)
        assert torch.equal(layer.weight.float(), expected.weight.float()), name
        assert torch.equal(held, expected.scale), name
        checked += 1
    return checked


def check_against_vllm(model_dir: str, layout: str) -> None:
    """Run in a subprocess: vLLM's quantized layers equal `quantize_fp8`, after a load and a push."""
    from safetensors.torch import load_file
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    from rlhf.sync.engine_extension import WeightUpdateExtension, _layerwise_reload_api
    from rlhf.sync.wire import make_spec, pack_bucket

    class Worker(WeightUpdateExtension):
        """What vLLM's worker gives the extension: the model runner, the config, the TP rank."""

        def __init__(self, model, config):
            self.model_runner, self.vllm_config, self.rank = types.SimpleNamespace(model=model), config, 0

    from rlhf.sync.fp8 import VLLM_METHODS
    from rlhf.testing import vllm_model_on_cpu

    model, config = vllm_model_on_cpu(model_dir, "bfloat16", VLLM_METHODS[layout])
    # weights before biases, as the learner sends them (its parameter order): vLLM 0.32's online
    # quantization counts a layer's bias only once one of its weights has loaded, so a bias first (the
    # checkpoint's alphabetical order) leaves Qwen2's qkv_proj waiting for it, unquantized, on meta
    stored = load_file(os.path.join(model_dir, "model.safetensors"))
    weights = {n: stored[n].to(torch.bfloat16) for n in sorted(stored, key=lambda n: n.endswith(".bias"))}
    begin, finish = _layerwise_reload_api()
    generator = torch.Generator().manual_seed(0)
    with set_current_vllm_config(config), torch.no_grad():
        model.load_weights(
            list(weights.items())
        )  # the engine's start: vLLM's loader, then its post-load step
        process_weights_after_loading(model, config.model_config, torch.device("cpu"))
        layers = check_layers(model, weights, layout)
        storage = {n: p.data_ptr() for n, p in model.named_parameters()}
        worker = Worker(model, config)
        for push in range(2):  # pushes, in bf16 as the learner sends them
            weights = {
                n: (t.float() + 0.05 * torch.randn(t.shape, generator=generator)).to(torch.bfloat16)
                for n, t in weights.items()
            }
            if push == 0:  # vLLM's reload API by hand
                begin(model)
                model.load_weights(list(weights.items()))
                finish(model, config.model_config)
            else:  # the engine's receiving end, asked for `replay`, which a quantized engine replaces
                spec = make_spec("object_store", 1 << 20, engine_reload="replay")
                names = list(weights)
                buckets = [
                    pack_bucket([(n, weights[n]) for n in names[i : i + 5]]) for i in range(0, len(names), 5)
                ]
                stats = worker.receive_weights([(spec, 1)], buckets)
                assert stats["reload_direct"] == 0 and "buckets_replayed" not in stats, stats
            assert check_layers(model, weights, layout) == layers
        # re-quantized into the same storage (what CUDA graphs captured)
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == storage
    print(f"fp8 {layout} matches vllm: {layers} layers")


@pytest.mark.slow
def test_quantize_equals_vllm_online_fp8(tmp_path):
    from rlhf.testing import build_tiny_model

    dirs = [
        build_tiny_model(str(tmp_path / "qwen"), arch="qwen2", vocab_size=500, tie_word_embeddings=True),
        build_tiny_model(str(tmp_path / "llama"), arch="llama"),
    ]
    code = f"import sys; sys.path.insert(0, {HERE!r}); import test_fp8_sync as t\n"
    code += "".join(
        f"t.check_against_vllm({d!r}, {layout!r})\n" for d in dirs for layout in ("channel", "block")
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("matches vllm") == 4, result.stdout
