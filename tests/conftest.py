"""Shared fixtures: tiny random models (real tokenizer + real architecture) built once per session."""

from __future__ import annotations

import pytest

from rlhf.testing import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer LlamaForCausalLM (vocab 512, hidden 64, head_dim 32) whose tokenizer adds BOS."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")), arch="llama")


@pytest.fixture(scope="session")
def tiny_tied_dir(tmp_path_factory) -> str:
    """The llama shape with tied input/output embeddings (lm_head is embed_tokens), like SmolLM2."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-tied")), arch="llama", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> str:
    """The same shape as a Qwen2ForCausalLM (attention biases, no BOS from the tokenizer)."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen2")), arch="qwen2")
