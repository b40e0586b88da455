"""`rollout.quantization` / `rollout.kv_cache_dtype`: validation, the engine's vLLM arguments, and the
off-policy correction FP8 engines turn on by default (config level: no engine, no GPU)."""

from __future__ import annotations

import json

import pytest
from rlhf.rollout.engine import quantization_kwargs

from rlhf.algorithms.losses import QUANTIZED_TIS_CAP, off_policy_correction, resolved_algorithm
from rlhf.algorithms.old_logprobs import engines_return_logprobs
from rlhf.config.loader import ConfigError, from_dict

GPU = {"placement": {"device": "cuda"}}


def fp8(**extra) -> dict:
    tree = {"rollout": {"quantization": "fp8"}, **GPU}
    for key, value in extra.items():
        tree.setdefault(key, {}).update(value)
    return tree


def test_defaults_leave_engines_alone():
    cfg = from_dict({})
    assert cfg.rollout.quantization == "none" and cfg.rollout.kv_cache_dtype == "auto"
    assert quantization_kwargs(cfg.rollout, "cpu") == {}
    assert off_policy_correction(cfg.algorithm) == "none"


def test_fp8_turns_tis_on_with_engine_logprobs():
    cfg = from_dict(fp8())
    resolved = resolved_algorithm(cfg)
    assert resolved.off_policy_correction == "tis" and resolved.tis_cap == QUANTIZED_TIS_CAP
    assert engines_return_logprobs(cfg)
    # the same run with bf16 engines asks for neither
    plain = from_dict(GPU)
    assert (
        resolved_algorithm(plain).off_policy_correction == "none"
        and resolved_algorithm(plain).tis_cap is None
    )
    assert not engines_return_logprobs(plain)


def test_fp8_keeps_what_the_run_chose():
    cfg = from_dict(fp8(algorithm={"tis_cap": 5.0}))
    assert resolved_algorithm(cfg).off_policy_correction == "tis" and resolved_algorithm(cfg).tis_cap == 5.0
    cfg = from_dict(fp8(algorithm={"off_policy_correction": "none"}))
    assert resolved_algorithm(cfg).off_policy_correction == "none" and resolved_algorithm(cfg).tis_cap is None
    assert not engines_return_logprobs(cfg)
    cfg = from_dict(fp8(rollout={"engine_logprobs": False}, algorithm={"off_policy_correction": "none"}))
    assert not engines_return_logprobs(cfg)
    # asynchronous runs keep decoupled PPO, which corrects the FP8 gap too (pi_old / pi_engine)
    cfg = from_dict(fp8(rollout={"max_staleness": 1}))
    assert resolved_algorithm(cfg).off_policy_correction == "decoupled_ppo"


def test_validation_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout\.quantization.*GPU engines"):
        from_dict({"rollout": {"quantization": "fp8"}, "placement": {"device": "cpu"}})
    with pytest.raises(ConfigError, match=r"rollout\.quantization"):
        from_dict({"rollout": {"quantization": "int4"}, **GPU})
    with pytest.raises(ConfigError, match=r"rollout\.engine_logprobs.*FP8 engines turn tis on"):
        from_dict(fp8(rollout={"engine_logprobs": False}))
    with pytest.raises(ConfigError, match=r"rollout\.kv_cache_dtype"):
        from_dict({"rollout": {"kv_cache_dtype": "int8"}})
    with pytest.raises(ConfigError, match=r"rollout\.quantization.*vllm_kwargs\.quantization"):
        from_dict(fp8(rollout={"vllm_kwargs": {"quantization": "fp8"}}))
    quantized = tmp_path / "model"
    quantized.mkdir()
    (quantized / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ConfigError, match=r"rollout\.quantization.*already quantized \(gptq"):
        from_dict(fp8(model={"path": str(quantized)}))
    (quantized / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert from_dict(fp8(model={"path": str(quantized)})).rollout.quantization == "fp8"


def test_engine_arguments():
    cfg = from_dict({"rollout": {"kv_cache_dtype": "fp8_e5m2"}})
    assert quantization_kwargs(cfg.rollout, "cpu") == {"kv_cache_dtype": "fp8_e5m2"}
    with pytest.raises(ValueError, match=r"rollout\.quantization: fp8 needs GPU engines"):
        quantization_kwargs(from_dict(fp8()).rollout, "cpu")
