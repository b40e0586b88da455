"""Rollout engines: prompt splitting and options (unit), then one real CPU vLLM engine (slow).

The slow tests share a single engine (vLLM start-up dominates) and check its outputs against the
tiny model's own HF forward pass: sampled-token logprobs follow the documented temperature
convention, scoring logprobs are the raw model's, and greedy decoding equals HF's argmax.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from rlhf.rollout.engine import _token_logprobs, resolve_dtype, tensor_parallel_compilation
from rlhf.rollout.group import _engine_options, is_colocated

from rlhf.actor_group import balance, split_evenly
from rlhf.config.schema import RunConfig, SamplingConfig


def test_split_evenly():
    assert split_evenly(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_evenly(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert split_evenly(0, 2) == [(0, 0), (0, 0)]
    assert split_evenly(6, 1) == [(0, 6)]
    with pytest.raises(ValueError):
        split_evenly(3, 0)


def test_balance_by_cost_keeps_parts_even():
    # largest first to the least-loaded part: 9 | 8+1 | 5+3 (a tie goes to the part with fewer items)
    assert balance([5, 9, 1, 8, 3], 3) == [[1], [2, 3], [0, 4]]
    assert balance([1, 1, 1, 1], 2) == [[0, 2], [1, 3]]
    assert balance([], 2) == [[], []]
    with pytest.raises(ValueError):
        balance([1], 0)


def test_engine_options_cpu_and_gpu():
    cfg = RunConfig()
    cpu = _engine_options(cfg, "cpu", None)
    assert cpu["num_cpus"] == 1
    env = cpu["runtime_env"]["env_vars"]
    # roles take turns on a CPU machine, so an engine may use every core while it generates
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["OMP_NUM_THREADS"] == str(os.cpu_count())
    # placement options are kept; user env vars win over the defaults
    given = {"num_cpus": 2, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "3"}}, "scheduling_strategy": "x"}
    cpu2 = _engine_options(cfg, "cpu", given)
    assert cpu2["scheduling_strategy"] == "x" and cpu2["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "3"
    assert given["runtime_env"]["env_vars"] == {"OMP_NUM_THREADS": "3"}  # caller's dict untouched
    cfg.rollout.tensor_parallel = 2
    assert _engine_options(cfg, "cuda", None)["num_gpus"] == 2


def test_colocation_and_dtype():
    cfg = RunConfig()
    cfg.placement.colocate = [["rollout", "learner"]]
    assert is_colocated(cfg, "cuda") and not is_colocated(cfg, "cpu")
    cfg.placement.colocate = [["learner", "reference"]]
    assert not is_colocated(cfg, "cuda")
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("float16", "cuda") == "float16"


def test_tensor_parallel_engines_skip_the_multicast_allreduce_fusion(monkeypatch):
    """TP engines turn off vLLM's FlashInfer all-reduce + RMSNorm fusion (its default workspace maps
    NVLink multicast memory); the settings must be ones vLLM's CompilationConfig accepts."""
    from vllm.config import CompilationConfig

    monkeypatch.delenv("VLLM_FLASHINFER_ALLREDUCE_BACKEND", raising=False)
    settings = tensor_parallel_compilation()
    assert CompilationConfig(**settings).pass_config.fuse_allreduce_rms is False
    assert os.environ["VLLM_FLASHINFER_ALLREDUCE_BACKEND"] == "trtllm"


def test_engines_return_logprobs_only_where_the_run_asks():
    """vLLM's processed-logprobs mode costs a full-vocabulary log-softmax per decode step, asked for or
    not: engines get it only where a generate call will ask for sampled-token logprobs."""
    from rlhf.algorithms.old_logprobs import engines_return_logprobs

    cfg = RunConfig()  # GRPO, one update per batch, synchronous: pi_old from the training pass
    assert not engines_return_logprobs(cfg)
    cfg.rollout.max_staleness = 1  # asynchronous: decoupled PPO's behaviour policy
    assert engines_return_logprobs(cfg)
    cfg.algorithm.off_policy_correction = "none"
    assert not engines_return_logprobs(cfg)
    cfg.algorithm.recompute_old_logprobs = False  # pi_old from the engine
    assert engines_return_logprobs(cfg)
    cfg = RunConfig()
    cfg.rollout.agent.function = "my_agents:solve"  # every recorded chat call carries its logprobs
    assert engines_return_logprobs(cfg)
    cfg = RunConfig()
    cfg.rollout.engine_logprobs = True
    assert engines_return_logprobs(cfg)


def test_engine_without_sampled_logprobs_refuses_to_return_them():
    from rlhf.rollout.engine import RolloutEngine

    engine = RolloutEngine.__new__(RolloutEngine)  # no vLLM needed to build the request
    engine.sampled_logprobs = False
    assert engine.sampling_params(SamplingConfig(n=2)).logprobs is None
    with pytest.raises(ValueError, match=r"rollout.engine_logprobs=true"):
        engine.sampling_params(SamplingConfig(n=2), logprobs=True)
    engine.sampled_logprobs = True
    assert engine.sampling_params(SamplingConfig(n=2), logprobs=True).logprobs == 0


def test_token_logprobs_both_vllm_containers():
    from vllm.logprobs import FlatLogprobs, Logprob

    positions = [None, {5: Logprob(-0.5), 9: Logprob(-2.0)}, {7: Logprob(-1.25)}]
    flat = FlatLogprobs()
    for p in positions:
        flat.append(p)
    for container in (positions, flat):
        assert _token_logprobs(container, [9, 7], start=1) == [-2.0, -1.25]


# ----------------------------------------------------------------------------------------------
# One real engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    ray = pytest.importorskip("ray")
    from rlhf.rollout import RolloutGroup
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.types import Prompt

    path = tiny_model_dir
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["Compute 12 + 7.", "What is the answer", "The sum of numbers"]
    prompts = [Prompt(i, t, tok(t)["input_ids"]) for i, t in enumerate(texts)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    group = None
    try:
        cfg = RunConfig()
        cfg.rollout.max_model_len = 512
        cfg.rollout.gpu_memory_utilization = 0.01
        cfg.rollout.engine_logprobs = True  # the tests below compare sampled-token logprobs with HF's
        cfg.rollout.vllm_kwargs = {
            "max_num_batched_tokens": 3072
        }  # checked in test_vllm_kwargs_reach_the_engine
        group = RolloutGroup(cfg, path, "cpu")
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        yield SimpleNamespace(group=group, hf=hf, tok=tok, prompts=prompts)
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()


@torch.no_grad()
def hf_logprobs(hf, prompt: list[int], response: list[int], temperature: float = 1.0) -> list[float]:
    logits = hf(torch.tensor([prompt + response])).logits[0]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return [float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(response)]


@pytest.mark.slow
def test_vllm_kwargs_reach_the_engine(engine):
    import ray

    def scheduler_budget(actor):
        return actor.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens

    assert ray.get(engine.group.group.actors[0].__ray_call__.remote(scheduler_budget)) == 3072


def test_vllm_kwargs_are_checked_against_vllm():
    from rlhf.rollout.engine import with_vllm_kwargs

    ours = {"model": "m", "seed": 0}
    assert with_vllm_kwargs(ours, {}) is ours
    assert with_vllm_kwargs(ours, {"seed": 3, "async_scheduling": True}) == {
        "model": "m",
        "seed": 3,
        "async_scheduling": True,
    }
    with pytest.raises(ValueError, match=r"rollout.vllm_kwargs.max_num_seq: not an argument of vLLM"):
        with_vllm_kwargs(ours, {"max_num_seq": 8})
    with pytest.raises(ValueError, match=r"rollout.vllm_kwargs.enable_sleep_mode: set by the framework"):
        with_vllm_kwargs(ours, {"enable_sleep_mode": False})


@pytest.mark.slow
def test_generate_shapes_groups_and_finish(engine):
    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=12)
    samples = engine.group.generate(engine.prompts, sampling, group_offset=10, logprobs=True)
    assert len(samples) == 3 * len(engine.prompts)
    assert [s.group for s in samples] == [10, 10, 10, 11, 11, 11, 12, 12, 12]
    assert [s.prompt.index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for s in samples:
        assert 1 <= len(s.response_ids) <= 12 and len(s.logprobs) == len(s.response_ids)
        assert all(lp <= 0.0 for lp in s.logprobs)
        ended_on_eos = s.response_ids[-1] == engine.tok.eos_token_id
        assert s.finish_reason == ("stop" if ended_on_eos else "length")
        assert s.truncated == (s.finish_reason == "length")
        # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 sequence
        full = engine.tok.decode(s.response_ids, skip_special_tokens=True)
        assert full.startswith(s.response_text) and set(full[len(s.response_text) :]) <= {"\ufffd"}
    assert engine.group.generate([], sampling) == []
    # By default the engine returns no logprobs (the learner supplies pi_old)
    assert all(s.logprobs is None for s in engine.group.generate(engine.prompts, sampling))


@pytest.mark.slow
def test_logprob_conventions_match_hf(engine):
    """Sampled-token logprobs are log_softmax(logits / T); scoring logprobs are at T = 1."""
    temperature = 0.7
    samples = engine.group.generate(
        engine.prompts, SamplingConfig(n=2, temperature=temperature, max_new_tokens=16), logprobs=True
    )
    seqs = [(s.prompt.token_ids, s.response_ids) for s in samples]
    for s in samples:
        expected = hf_logprobs(engine.hf, s.prompt.token_ids, s.response_ids, temperature)
        assert s.logprobs == pytest.approx(expected, abs=1e-4)
    scored = engine.group.logprobs(seqs)
    for (prompt, response), got in zip(seqs, scored):
        assert got == pytest.approx(hf_logprobs(engine.hf, prompt, response), abs=1e-4)
    # the two conventions really differ at T != 1
    assert abs(scored[0][0] - samples[0].logprobs[0]) > 1e-3


@pytest.mark.slow
def test_greedy_matches_hf_argmax(engine):
    sampling = SamplingConfig(n=4, max_new_tokens=8)  # eval overrides n and temperature
    first = engine.group.generate(engine.prompts, sampling, n=1, temperature=0.0)
    again = engine.group.generate(engine.prompts, sampling, n=1, temperature=0.0)
    assert [s.response_ids for s in first] == [s.response_ids for s in again]
    for s in first:
        ids = torch.tensor([s.prompt.token_ids])
        greedy = engine.hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0
        )
        assert s.response_ids == greedy[0, ids.shape[1] :].tolist()


@pytest.mark.slow
def test_sleep_is_noop_on_cpu(engine):
    assert engine.group.sleep() is False
    assert engine.group.wake() is False
    assert len(engine.group.generate(engine.prompts[:1], SamplingConfig(n=1, max_new_tokens=2))) == 1
