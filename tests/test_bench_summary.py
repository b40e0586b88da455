"""The benchmark's step summary (experiments/bench/bench_step.py::summarise) on hand-made step logs."""

from __future__ import annotations

import pytest

from experiments.bench.bench_step import summarise


def _res(audited: bool) -> dict:
    steps = []
    for step_s, gen, train in [(20.0, 9.0, 9.0), (10.0, 5.0, 4.0), (12.0, 6.0, 5.0)]:
        s = {"time/step_s": step_s, "time/generate_s": gen, "time/train_s": train, "time/sync_s": 0.5}
        s["perf/generated_tokens"] = 1000
        if audited:
            s["sync/audit_logprob_diff"] = 0.01 if gen == 5.0 else 0.02
            s["sync/audit_logprob_diff_max"] = 0.1
        steps.append(s)
    pushes = [{"sync/time_s": t, "sync/bytes": 2e9, "sync/engine_load_s": t / 2} for t in (0.3, 0.1, 0.2)]
    return {"rlhf": {"steps": steps, "sync_alone": pushes}}


def test_the_warm_up_step_is_not_counted_and_pushes_take_the_median():
    out = summarise(_res(audited=True), None)
    assert out["step_s"] == pytest.approx(11.0)  # (10 + 12) / 2, not counting the first step
    assert out["breakdown_s"]["generate"] == pytest.approx(5.5)
    assert out["end_to_end_tokens_per_s"] == pytest.approx(1000 / 11.0)
    assert out["overhead_ratio"] == pytest.approx(11.0 / (5.5 + 4.5 + 0.5))
    assert out["sync_alone_s"] == pytest.approx(0.2) and out["sync_gbps"] == pytest.approx(10.0)
    assert out["sync_phases_s"] == {"engine_load_s": pytest.approx(0.1)}
    assert out["audit_logprob_diff"] == pytest.approx(0.015) and out["audit_logprob_diff_max"] == 0.1


def test_a_run_without_audits_reports_none_rather_than_zero():
    """Asynchronous runs without engine logprobs audit nothing: 0.0 would read as a perfect audit."""
    out = summarise(_res(audited=False), None)
    assert out["audit_logprob_diff"] is None and out["audit_logprob_diff_max"] is None


def test_summary_entries_name_how_the_engines_wrote_the_weights():
    from experiments.bench.summarize import engine_reload

    assert engine_reload({"engine_direct": 1.0, "engine_buckets_replayed": 4.0}) == "replay"
    assert (
        engine_reload({"engine_direct": 1.0, "engine_buckets_replayed": 0.0}) == "direct"
    )  # nothing replayed
    assert engine_reload({"engine_direct": 1.0}) == "direct"
    assert engine_reload({"engine_direct": 0.0}) == "layerwise"


def test_summary_entries_carry_shape_workload_and_memory_beside_the_plan():
    from experiments.bench.summarize import entry

    args = {"gpus": 1, "mode": "colocated", "shape": "qwen2.5-1.5b", "prompts": 64, "n": 8}
    args.update(prompt_len=128, new_tokens=512)
    summary = summarise(_res(audited=True), None)
    summary.update(packing=True, memory={"peak_gpu_gb": 70.1, "planned_gpu_gb": 66.0, "peak_host_gb": 20.0})
    raw = {
        "vllm": {"generate_no_logprobs_s": 4.0, "generate_s": 9.0},
        "deepspeed": {"train_s": 3.0},
    }
    e = entry({"summary": summary, "args": args, "device": "NVIDIA H200"}, raw, "rec", "f.json:x")
    assert e["shape"] == "qwen2.5-1.5b" and e["packing"] is True
    assert e["workload"] == "64x8 prompts of 128, 512 new tokens"
    assert e["peak_gpu_gb"] == 70.1 and e["planned_gpu_gb"] == 66.0 and e["peak_host_gb"] == 20.0
    assert "planned_host_gb" not in e  # not measured: left out rather than null
    assert e["raw_vllm_nologprobs_s"] == 4.0 and e["raw_deepspeed_train_s"] == 3.0


def test_trl_step_settings_and_padding_by_hand():
    import argparse

    from experiments.bench.trl_step import grpo_kwargs, padding_fraction

    args = argparse.Namespace(
        prompts=4,
        n=8,
        micro_batch=16,
        new_tokens=512,
        steps=3,
        util=0.5,
        sleep=True,
        workload="fixed",
        lr=None,
    )
    kw = grpo_kwargs(args, "/tmp/x")
    assert kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] == 32  # one step's answers
    assert kw["num_generations"] == 8 and kw["max_completion_length"] == 512
    assert kw["generation_kwargs"] == {"ignore_eos": True, "min_tokens": 512}  # fixed: every answer 512
    assert kw["vllm_mode"] == "colocate" and kw["vllm_enable_sleep_mode"] is True and kw["beta"] == 0.0
    assert kw["learning_rate"] == 1e-6  # the learning rate of our step and raw DeepSpeed too
    args.workload = "longtail"
    longtail = grpo_kwargs(args, "/tmp/x")
    assert longtail["generation_kwargs"] == {}  # answers end at EOS
    assert longtail["learning_rate"] == 1e-10  # updates must not move the EOS rate (workloads.py)
    # 2 prompts of 10 and 30 tokens, 2 answers each, mean 20, longest 50:
    # real = 2 x 40 + 4 x 20 = 160 of 4 x (30 + 50) = 320 -> half is padding
    assert padding_fraction([10, 30], 2, 20.0, 50) == pytest.approx(0.5)
    assert padding_fraction([8, 8], 3, 40.0, 40) == pytest.approx(0.0)
