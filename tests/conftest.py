"""Shared fixtures: tiny random models (real tokenizer + real architecture) built once per session."""

from __future__ import annotations

import os
import sys

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


@pytest.fixture(scope="session")
def rm_path(tmp_path_factory) -> str:
    """A random-weight sequence classifier sharing the tiny causal model's config and tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    base = build_tiny_model(str(tmp_path_factory.mktemp("tiny_policy")), arch="llama")
    config = AutoConfig.from_pretrained(base)
    config.num_labels = 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    out = tmp_path_factory.mktemp("tiny_rm")
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = None  # like many RM tokenizers: the actor must pad with EOS and say so
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def in_process():
    """For learners built in the test process (rank 0 of a world of one on gloo): Learner.setup writes
    MASTER_ADDR/RANK/WORLD_SIZE/... into os.environ and joins a process group, kept for every learner
    of the module. Undo both when the module is done, through DeepSpeed so that it forgets the groups
    it cached too (the next module's learners then start clean)."""
    import os

    saved = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def seven_b_on_one_gpu() -> list[str]:
    """Overrides for the Qwen2.5-7B shape colocated on one GPU (16k-token micro-batches, checkpointed)."""
    return [
        "model.path=qwen2.5-7b",
        "placement.device=cuda",
        "placement.colocate=[[rollout,learner]]",
        "trainer.micro_batch_tokens=16384",
        "trainer.gradient_checkpointing=true",
    ]


# In-process vLLM engines, DeepSpeed learners and gloo groups leave native threads behind; their
# teardown at interpreter exit crashed once (SIGSEGV) after all 676 tests had passed and pytest had
# printed its summary, turning a green run into exit code 139. Once pytest has reported, leave with its
# exit status without tearing those libraries down.
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    session.config._rlhf_exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    status = getattr(config, "_rlhf_exit_status", None)
    if status is not None and os.environ.get("RLHF_TEST_HARD_EXIT", "1") != "0":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
