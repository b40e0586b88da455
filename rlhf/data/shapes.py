"""Model shapes the benchmark builds with random weights and the planner sizes without a checkpoint.

Each shape is the architecture of a released model (its `config.json` fields that set the size);
`rlhf plan` and `rlhf validate` accept a shape name as `model.path` to plan memory for that model
before it is downloaded, and `experiments/bench/bench_step.py --shape` builds one on the spot.
"""

from __future__ import annotations

from typing import Any

MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # Qwen2.5: q/k/v projections carry biases; the small ones tie input and output embeddings.
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
        attention_bias=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_word_embeddings=True,
        attention_bias=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
    "qwen2.5-3b": dict(
        hidden_size=2048,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        intermediate_size=11008,
        vocab_size=151936,
        tie_word_embeddings=True,
        attention_bias=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        tie_word_embeddings=False,
        attention_bias=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
        attention_bias=False,
        rope_theta=5e5,
        rms_norm_eps=1e-5,
    ),
}


def shape_config(name: str) -> dict[str, Any]:
    """The config fields of shape `name`; a ValueError naming the known shapes otherwise."""
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(MODEL_SHAPES)}")
    return dict(MODEL_SHAPES[name])
