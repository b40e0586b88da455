"""`restore_rotary_fp32`: rotary frequencies a ZeRO-3 build left in bf16 come back as the config's fp32 values."""

from __future__ import annotations

import torch
from rlhf.trainer.rotary import restore_rotary_fp32
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


def test_bf16_frequencies_are_recomputed_in_fp32():
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=1e6)
    exact = LlamaRotaryEmbedding(config).inv_freq.clone()
    model = nn.Sequential(LlamaRotaryEmbedding(config))
    model[0].inv_freq = model[0].inv_freq.to(torch.bfloat16)  # what zero.Init made of it
    model[0].original_inv_freq = model[0].original_inv_freq.to(torch.bfloat16)
    assert not torch.equal(model[0].inv_freq.float(), exact)  # bf16 rounding moved them

    assert restore_rotary_fp32(model) == 1
    assert model[0].inv_freq.dtype == torch.float32 and torch.equal(model[0].inv_freq, exact)
    assert torch.equal(model[0].original_inv_freq, exact)
    assert restore_rotary_fp32(model) == 0  # fp32 already: nothing to do


def test_a_rotary_module_that_cannot_be_rebuilt_is_left_alone():
    class Custom(nn.Module):
        def __init__(self, config, scale):
            super().__init__()
            self.config = config
            self.register_buffer("inv_freq", torch.ones(4, dtype=torch.bfloat16), persistent=False)

    model = Custom(LlamaConfig(), scale=2.0)
    assert restore_rotary_fp32(model) == 0
    assert model.inv_freq.dtype == torch.bfloat16
