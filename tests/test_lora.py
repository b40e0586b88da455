"""LoRA on the policy learner (trainer/lora.py): adapters train, the base stays, the reference is the
base model, and the weights that leave the learner (merged, adapter-only, checkpoints) are right.

The learners run in this process on gloo, on the tiny random llama of `tiny_model_dir`."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from rlhf.config.schema import RunConfig
from rlhf.testing import random_train_batch, whole_batch_step
from rlhf.types import TrainBatch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("DS_ACCELERATOR") != "cpu",
    reason="in-process CPU learners need DS_ACCELERATOR=cpu before DeepSpeed is imported (scripts/test.sh)",
)


def lora_learner(model_dir: str, rank: int = 4, zero_stage: int = 2, targets=("all-linear",)):
    from rlhf.trainer.learner import Learner

    cfg = RunConfig()
    cfg.steps = 2
    cfg.model.dtype = "float32"
    cfg.placement.device = "cpu"
    cfg.trainer.zero_stage = zero_stage
    cfg.trainer.lr = 1e-2
    cfg.trainer.micro_batch_tokens = 64
    cfg.trainer.lora.rank = rank
    cfg.trainer.lora.target_modules = list(targets)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Learner(cfg, model_dir, "policy", "cpu", 0, 1, "127.0.0.1", port)


def batch(seed: int = 0) -> TrainBatch:
    return random_train_batch(6, 24, 4, torch.Generator().manual_seed(seed))


def hf_logprobs(model, b: TrainBatch, temperature: float) -> torch.Tensor:
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
    out = logp.gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(out, (1, 0)) * b.attention_mask


@pytest.mark.slow
def test_lora_learner_trains_adapters_only_and_its_base_is_the_reference(
    in_process, tiny_model_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    b = batch()
    lrn = lora_learner(tiny_model_dir)
    temperature = lrn.temperature
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        expected_base = hf_logprobs(base, b, temperature)
    # Only the adapters train: PEFT starts lora_B at 0, so the policy starts as the base model.
    trainable = [n for n, p in lrn.engine.module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    torch.testing.assert_close(lrn.logprobs(b), expected_base, rtol=1e-5, atol=1e-5)

    (stats,) = lrn.train(b, [whole_batch_step(b, 64)])
    assert stats["grad_norm"] > 0
    after = lrn.logprobs(b)
    assert (after - expected_base).abs().max() > 1e-4  # the adapters moved the policy ...
    # ... and with them switched off the learner is still the base model: the reference for free.
    torch.testing.assert_close(lrn.logprobs(b, base=True), expected_base, rtol=1e-5, atol=1e-5)

    # Merged weights: HF names, W + scale B A; a plain HF model loaded with them is the policy.
    merged = lrn.full_state_dict()
    assert set(merged) == set(base.state_dict())
    with torch.no_grad():
        base.load_state_dict(merged)
        torch.testing.assert_close(hf_logprobs(base, b, temperature), after, rtol=1e-4, atol=1e-4)

    # Adapter-only: just the lora_A/lora_B tensors, PEFT-named, a small fraction of the bytes.
    (adapter,) = list(lrn.named_weight_buckets(2**30, adapter_only=True))
    names = [n for n, _ in adapter]
    assert names and all(
        n.startswith("base_model.model.") and (".lora_A." in n or ".lora_B." in n) for n in names
    )
    adapter_bytes = sum(t.numel() * t.element_size() for _, t in adapter)
    full_bytes = sum(t.numel() * t.element_size() for t in merged.values())
    assert adapter_bytes < 0.2 * full_bytes
    config = lrn.adapter_config()
    assert config["r"] == 4 and config["lora_alpha"] == 8 and "q_proj" in config["target_modules"]
    json.dumps(config)

    # Checkpoint: the merged HF model in hf/, the adapter in PEFT's format in adapter/; PEFT loads it
    # on the base model and gives the policy's log-probs.
    lrn.save(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt/hf/config.json").is_file()
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "ckpt/adapter"))
    with torch.no_grad():
        torch.testing.assert_close(hf_logprobs(peft_model, b, temperature), after, rtol=1e-4, atol=1e-4)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt/hf"), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf_logprobs(exported, b, temperature), after, rtol=1e-4, atol=1e-4)

    # Without the merged export: the adapter alone, which `rlhf eval` merges on the fly; the DeepSpeed
    # checkpoint holds the adapters (not the frozen base) and a fresh learner resumes from it.
    from rlhf.cli.eval import resolve_model_dir

    lrn.cfg.checkpoint.export_merged = False
    lrn.save(str(tmp_path / "lean/policy"))
    assert not (tmp_path / "lean/policy/hf").exists()
    module_file = next((tmp_path / "lean/policy/deepspeed").rglob("*model_states.pt"))
    assert module_file.stat().st_size < 0.5 * sum(t.numel() * 4 for t in merged.values())
    os.environ["RLHF_CACHE"] = str(tmp_path / "cache")
    evaluated = AutoModelForCausalLM.from_pretrained(
        str(resolve_model_dir(tmp_path / "lean")), dtype=torch.float32
    )
    with torch.no_grad():
        torch.testing.assert_close(hf_logprobs(evaluated, b, temperature), after, rtol=1e-4, atol=1e-4)
    resumed = lora_learner(tiny_model_dir)
    assert resumed.load(str(tmp_path / "lean/policy")) == 1
    torch.testing.assert_close(resumed.logprobs(b), after, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resumed.logprobs(b, base=True), expected_base, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- config, plan
def test_bad_lora_keys_are_one_line_errors(tiny_model_dir):
    from rlhf.config.loader import ConfigError, load_config

    recipe = REPO / "configs/lora.yaml"
    cases = {
        "trainer.lora.rank=-1": "trainer.lora.rank: must be > 0 (or 0: no LoRA)",
        "trainer.lora.dropout=1.0": "trainer.lora.dropout: must be in [0, 1)",
        "trainer.lora.alpha=0": "trainer.lora.alpha: must be > 0",
        "trainer.lora.target_modules=[q_prj]": "has no linear layer named so; did you mean 'q_proj'?",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(recipe, [f"model.path={tiny_model_dir}", override])
        message = str(info.value)
        assert expected in message and "\n" not in message, message
    cfg = load_config(recipe, [f"model.path={tiny_model_dir}", "trainer.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.trainer.lora.rank == 16


def test_lora_plan_has_no_reference_and_fits_a_7b_model_without_offload(seven_b_on_one_gpu):
    from rlhf.config.loader import load_config
    from rlhf.data.shapes import MODEL_SHAPES
    from rlhf.placement import Inventory, Node, estimate_params, make_plan
    from rlhf.placement.memory import adapter_params

    overrides = [*seven_b_on_one_gpu, "algorithm.kl_coef=0.01"]
    h200 = Inventory([Node("h200", cpus=16, memory_gb=125, gpus=1, gpu_type="H200", gpu_memory_gb=141)], "x")
    cfg = load_config(REPO / "configs/lora.yaml", overrides + ["trainer.lora.rank=64"])
    plan = make_plan(cfg, h200)
    assert "reference" not in plan.roles
    assert any(
        n.startswith("LoRA: the reference is the policy with its adapters switched off") for n in plan.notes
    )
    # Rank 64 on every projection of 28 layers (h 3584, kv 512, i 18944):
    # 64 x 28 x (2h + (h+kv) x 2 + 2h + (h+i) x 2 + (i+h)) = 161.5M adapter parameters.
    shape_params = 64 * 28 * (4 * 3584 + 2 * (3584 + 512) + 3 * (3584 + 18944))
    assert adapter_params(7.6e9, MODEL_SHAPES["qwen2.5-7b"], cfg.trainer.lora) == shape_params
    learner = plan.assignments["learner"][0]
    params = estimate_params("qwen2.5-7b")
    assert learner.host_gb == pytest.approx(3.0)  # nothing offloaded
    assert (
        learner.memory_gb < 2 * params / 1e9 + 16 * shape_params / 1e9 + 25
    )  # frozen bf16 + adapter states + work
    # Full fine-tuning of the same model does not fit this GPU and host without partial offload.
    from rlhf.placement import PlacementError

    with pytest.raises(PlacementError):
        make_plan(load_config(REPO / "configs/lora.yaml", overrides + ["trainer.lora.rank=0"]), h200)


def test_validate_says_what_lora_pushes_send(tiny_model_dir, capsys):
    """`rlhf validate` names what a LoRA run's weight pushes send (`sync: auto` on CPU engines: merged
    weights, which they generate from faster); `sync: adapter` where the engines cannot serve the
    adapter (one on the output head) is one error line."""
    from rlhf.cli.main import main

    recipe = str(REPO / "configs/lora.yaml")
    assert main(["validate", recipe, f"model.path={tiny_model_dir}"]) == 0
    assert "checked: trainer.lora: weight pushes send merged weights: on CPU" in capsys.readouterr().err
    adapter = "trainer.lora.sync=adapter"
    assert main(["validate", recipe, f"model.path={tiny_model_dir}", adapter]) == 0
    assert "checked: trainer.lora: weight pushes send the rank-16 adapters alone" in capsys.readouterr().err
    head = "trainer.lora.target_modules=[q_proj,lm_head]"
    assert main(["validate", recipe, f"model.path={tiny_model_dir}", head]) == 0
    assert "send merged weights: the engines cannot serve LoRA" in capsys.readouterr().err
    assert main(["validate", recipe, f"model.path={tiny_model_dir}", head, adapter]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: trainer.lora.sync=adapter: the engines cannot serve LoRA")
