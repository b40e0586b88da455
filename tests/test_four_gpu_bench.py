"""experiments/bench/four_gpu.py on CPU: memory samples, pairing with the plan, the run's config
and plan on the 4 x H100 inventory, the tiny reward model, the reports."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from experiments.bench import four_gpu, gpu_memory
from rlhf.placement import estimate_params, load_inventory, make_plan, params_from_hf_config

REPO = Path(__file__).resolve().parents[1]
H100X4 = REPO / "configs" / "inventories" / "h100x4.yaml"


def args_for(out: Path, rollout: str = "two_engines", staleness: int = 0) -> argparse.Namespace:
    return argparse.Namespace(
        out=str(out),
        shape="qwen2.5-1.5b",
        rm_shape="qwen2.5-0.5b",
        rollout=rollout,
        staleness=staleness,
        prompts=4,
        n=2,
        prompt_len=8,
        new_tokens=16,
        steps=3,
        micro_batch_tokens=1024,
        util=0.5,
        bucket_mb=256,
        eager=True,
        audit_every=None,
        override=[],
    )


def config_only(path: Path, shape: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**four_gpu.SHAPES[shape], "model_type": "llama"}))
    return path


@pytest.fixture
def planned(tmp_path):
    """(cfg, plan) of the 4-GPU run, as four_gpu builds it, on the h100x4 inventory."""

    def make(rollout: str, staleness: int = 0):
        policy = config_only(tmp_path / f"policy-{rollout}-{staleness}", "qwen2.5-1.5b")
        rm = config_only(tmp_path / f"rm-{rollout}-{staleness}", "qwen2.5-0.5b")
        prompts = four_gpu.write_prompts(tmp_path / "p.jsonl", [8] * 16, 1000)
        args = args_for(tmp_path, rollout, staleness)
        _, overrides, cfg = four_gpu.config_of_run(
            str(policy), str(prompts), four_gpu.run_args(args, str(rm))
        )
        return overrides, cfg, make_plan(cfg, load_inventory(H100X4))

    return make


SAMPLES = """\
0, GPU-a, 1000, 81559
1, GPU-b, 500, 81559
2, GPU-c, [N/A], 81559
0, GPU-a, 30000, 81559
1, GPU-b, 41000, 81559
2, GPU-c, 20000, 81559
3, GPU-d, 4
"""


def test_samples_parse_into_peaks_and_skip_bad_lines():
    peaks = gpu_memory.parse_samples(SAMPLES)
    assert {i: g["mib"] for i, g in peaks.items()} == {0: 30000, 1: 41000, 2: 20000}
    assert peaks[0]["uuid"] == "GPU-a" and peaks[0]["samples"] == 2 and peaks[2]["samples"] == 1
    assert gpu_memory.parse_samples(SAMPLES, reduce=min)[0]["mib"] == 1000


def test_sampler_marks_split_phases(tmp_path):
    sampler = gpu_memory.GpuSampler(tmp_path / "s.csv")
    sampler.sink = open(sampler.path, "w")  # noqa: SIM115  (closed by stop)
    sampler.sink.write("0, GPU-a, 100, 80000\n")
    sampler.mark("roles")
    sampler.sink.write("0, GPU-a, 5000, 80000\n")
    sampler.mark("steps")
    sampler.sink.write("0, GPU-a, 7000, 80000\n")
    peaks = sampler.stop()
    assert peaks["all"][0]["mib"] == 7000 and peaks["steps"][0]["mib"] == 7000
    assert peaks["idle"][0]["mib"] == 100


@pytest.mark.parametrize("rollout", ["two_engines", "tp2"])
@pytest.mark.parametrize("staleness", [0, 1])
def test_run_config_is_planned_as_the_issue_asks(planned, rollout, staleness):
    overrides, cfg, plan = planned(rollout, staleness)
    assert cfg.trainer.zero_stage == 3 and cfg.algorithm.kl_coef == 0.05
    assert cfg.rollout.max_staleness == staleness and cfg.rollout.enforce_eager
    assert [s.kind for s in cfg.reward.sources] == ["model"]
    assert plan.roles == ["rollout", "learner", "reference", "reward_model"]
    gpus = {role: [a.gpus for a in plan.assignments[role]] for role in plan.roles}
    engine_gpus = {g for a in gpus["rollout"] for g in a}
    learner_gpus = {g for a in gpus["learner"] for g in a}
    assert len(engine_gpus) == len(learner_gpus) == 2 and engine_gpus | learner_gpus == {0, 1, 2, 3}
    assert len(gpus["rollout"]) == (1 if rollout == "tp2" else 2)
    assert {g for a in gpus["reference"] + gpus["reward_model"] for g in a} <= learner_gpus
    # the reward model's estimate comes from its own (0.5B) config, not the policy's size
    rm = plan.assignments["reward_model"][0].memory_gb
    assert 1.5 < rm < 2.5, rm
    for used, total in plan.gpu_memory_usage().values():
        assert used < total == 80 * 2**30 / 1e9  # H100: 80 GiB


def test_pairing_follows_the_uuids_ray_gave_each_role(planned):
    _, _, plan = planned("two_engines")
    learner_plan = [a.gpus[0] for a in plan.assignments["learner"]]
    engine_plan = [a.gpus[0] for a in plan.assignments["rollout"]]
    # Ray put learner rank 0 on physical GPU 3, rank 1 on 2, the engines on 1 and 0
    measured = {i: {"uuid": f"GPU-{i}", "mib": 1000 * (i + 1), "total_mib": 81559} for i in range(4)}
    rows = gpu_memory.pair_with_plan(plan, measured, ["GPU-3", "GPU-2"], [["GPU-1"], ["GPU-0"]])
    by_plan = {r["plan_gpu"]: r for r in rows}
    assert len(rows) == 4 and all(r["paired_by"] == "uuid" for r in rows)
    assert by_plan[learner_plan[0]]["gpu_index"] == 3 and by_plan[learner_plan[1]]["gpu_index"] == 2
    assert by_plan[engine_plan[0]]["gpu_index"] == 1 and by_plan[engine_plan[1]]["gpu_index"] == 0
    rank0 = by_plan[learner_plan[0]]
    assert set(rank0["roles"]) == {"learner[0]", "reference[0]", "reward_model[0]"}
    assert rank0["measured_peak_gb"] == round(4000 * 2**20 / 1e9, 2)
    assert rank0["measured_over_estimate"] == round(4000 * 2**20 / 1e9 / rank0["estimate_gb"], 3)
    # without UUIDs: plan GPU i is nvidia-smi index i
    rows = gpu_memory.pair_with_plan(plan, measured)
    assert all(r["paired_by"] == "index" and r["gpu_index"] == r["plan_gpu"] for r in rows)


def test_pairing_of_a_tensor_parallel_engine(planned):
    _, _, plan = planned("tp2")
    (engine,) = plan.assignments["rollout"]
    measured = {i: {"uuid": f"GPU-{i}", "mib": 100.0, "total_mib": 81559} for i in range(4)}
    learners = [f"GPU-{g}" for g in (0, 1)]
    rows = gpu_memory.pair_with_plan(plan, measured, learners, [["GPU-3", "GPU-2"]])
    by_plan = {r["plan_gpu"]: r["gpu_index"] for r in rows}
    assert [by_plan[g] for g in engine.gpus] == [3, 2]


def test_tiny_reward_model_dir_loads_and_scores_with_our_reward_model(tmp_path, monkeypatch):
    from rlhf.reward.model import RewardModelActor

    monkeypatch.setattr(four_gpu, "CACHE", tmp_path)
    policy, rm = four_gpu.build_models("tiny", "tiny")
    cfg = json.loads((rm / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert (rm / "tokenizer.json").read_text() == (policy / "tokenizer.json").read_text()
    actor = RewardModelActor(str(rm), batch_size=2)
    assert actor.model.config.num_labels == 1
    scores = actor.score(["t1 t2", "t3", "t4 t5 t6"], [" t7", " t8 t9", ""])
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert estimate_params(str(rm)) == params_from_hf_config(four_gpu.SHAPES["tiny"])


def fake_run(staleness: int) -> dict:
    pushes = [
        {"sync/time_s": 0.2, "sync/bytes": 3.1e9, "sync/learner_gather_s": 0.05, "sync/learner_send_s": 0.1}
    ] * 3
    steps = [
        {"time/step_s": s, "time/generate_s": 4.0, "time/train_s": 6.0, "time/sync_s": 0.2,
         "time/ref_logprobs_s": 1.0, "time/reward_s": 0.5, "perf/generated_tokens": 131072.0,
         "sync/audit_logprob_diff": 0.009}
        for s in (30.0, 12.0, 14.0)
    ]  # fmt: skip
    args = {"gpus": 4, "mode": "disaggregated", "tp": 1, "zero": 3, "staleness": staleness, "shape": "x"}
    run = {"kind": "four_gpu", "device": "NVIDIA H100", "rollout": "two_engines", "args": args}
    run["rlhf"] = {"steps": steps, "sync_alone": pushes}
    run["summary"] = four_gpu.summarise(run, None)
    run["summary"].update(four_gpu.sync_rates(run["summary"], pushes))
    run["memory"] = [
        {
            "plan_gpu": 0,
            "gpu_index": 2,
            "roles": ["learner[0]"],
            "estimate_gb": 20.4,
            "measured_peak_gb": 31.0,
        }
    ]
    return run


def test_summary_entries_and_markdown(tmp_path):
    run = fake_run(0)
    assert run["summary"]["gather_gbps"] == pytest.approx(62.0)
    assert run["summary"]["broadcast_gbps"] == pytest.approx(31.0)
    e = four_gpu.summary_entry("sync", run, "s1")
    assert e["step_s"] == 13.0 and e["tokens_per_s"] == round(131072 / 13.0)
    assert e["gpus"] == 4 and e["ref_logprobs_s"] == 1.0 and e["audit_logprob_diff"] == 0.009
    assert e["memory_gb"][0]["gpu_index"] == 2
    bench = {"args": {"gpus": 2, "mode": "colocated", "staleness": 0}, "summary": run["summary"]}
    bench["summary"] = {k: v for k, v in run["summary"].items() if not k.endswith("gbps")}
    bench["rlhf"] = {"sync_alone": run["rlhf"]["sync_alone"]}
    assert four_gpu.summary_entry("gpu2", bench, "s1")["gather_gbps"] == 62.0
    combined = {"device": "NVIDIA H100", "runs": {"sync": run, "async": {"rc": "timeout", "wall_s": 300}}}
    combined["skipped"] = {"gpu1": "10s left"}
    four_gpu.write_reports(tmp_path, combined, "s1")
    md = (tmp_path / "four_gpu.md").read_text()
    assert "| sync | 4 |" in md and "async | failed: rc=timeout" in md and "gpu1 | skipped" in md
    assert json.loads((tmp_path / "four_gpu.json").read_text())["summary_entries"][0]["step_s"] == 13.0


def test_step_lines_of_a_killed_run():
    log = 'noise\n{"time/step_s": 12.5, "time/train_s": 6.0}\n{"other": 1}\n{"time/step_s": 1\n'
    assert four_gpu.step_lines(log) == [{"time/step_s": 12.5, "time/train_s": 6.0}]


def test_run_commands_share_the_workload(tmp_path):
    args = args_for(tmp_path)
    args.sample_ms = 200
    cmds = four_gpu.run_commands(args)
    workload = four_gpu.workload_flags(args)
    assert "--eager" in workload
    for name, cmd in cmds.items():
        assert cmd[-len(workload) :] == workload, name
    assert "--staleness=1" in cmds["async"] and "--gpus=2" in cmds["gpu2"] and "--sleep" in cmds["gpu1"]


def test_matrix_runs_in_children_keeps_failures_and_skips_what_no_longer_fits(tmp_path, monkeypatch):
    import sys

    ok = "import json, sys; print('{\"time/step_s\": 2.0}'); sys.exit(0)"
    fail = "import sys, time; print('{\"time/step_s\": 3.0}'); time.sleep(6); sys.exit(1)"
    commands = {"sync": [sys.executable, "-c", ok], "async": [sys.executable, "-c", fail, "--"]}
    commands["gpu2"] = [sys.executable, "-c", "import time; time.sleep(5)", "--"]
    monkeypatch.setattr(four_gpu, "run_commands", lambda args: commands)
    monkeypatch.setattr(four_gpu, "ensure_models", lambda *a: None)
    monkeypatch.setattr(four_gpu, "stop_ray", lambda: None)
    monkeypatch.setattr(four_gpu, "wait_gpus_free", lambda: 0.0)
    commands["sync"].append("--")  # the --out=DIR the matrix appends is an argument of `-c`
    args = args_for(tmp_path)
    args.runs, args.budget, args.min_run_s, args.record, args.sample_ms = "sync,async,gpu2", 60, 55, "s", 200
    combined = four_gpu.matrix(args)
    assert combined["runs"]["sync"]["rc"] == 0 and combined["runs"]["async"]["rc"] == 1
    assert combined["runs"]["async"]["steps_from_log"] == [{"time/step_s": 3.0}]
    assert "gpu2" in combined["skipped"]
    md = (tmp_path / "four_gpu.md").read_text()
    assert "async | failed: rc=1" in md and "gpu2 | skipped" in md
