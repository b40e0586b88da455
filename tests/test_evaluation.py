"""Evaluation sets: pass@k, per-set figures and config errors (unit); a run whose evaluation has its
own engines, monitoring, W&B artifacts and `rlhf eval` on its checkpoint (slow, real Ray and vLLM)."""

from __future__ import annotations

import math

import pytest

from rlhf.config.loader import ConfigError, from_dict
from rlhf.config.schema import EvalSetConfig, SamplingConfig
from rlhf.evaluation.sets import EvalSet, Evaluation, configured_sets, pass_at_k, summarize
from rlhf.types import Prompt, Sample


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert pass_at_k(5, 2, 4) == 1.0  # fewer wrong samples than k: some draw always solves it


def sample(group: int, reward: float, tokens: int = 3, finish: str = "stop") -> Sample:
    prompt = Prompt(index=group, text="q", token_ids=[1], label="1", metadata={})
    s = Sample(
        group=group,
        prompt=prompt,
        response_ids=[5] * tokens,
        response_text="a",
        logprobs=None,
        finish_reason=finish,
    )
    s.reward, s.reward_parts = reward, {"task": reward}
    return s


def test_summary_of_a_set():
    es = EvalSet(
        EvalSetConfig(name="a", pass_k=[1, 2], samples_per_prompt=2), [], SamplingConfig(temperature=0.7)
    )
    samples = [sample(0, 1.0), sample(0, 0.0), sample(1, 0.0, tokens=5, finish="length"), sample(1, 0.0)]
    out = summarize(es, samples, seconds=1.5)
    assert out["reward_mean"] == 0.25 and out["solved_frac"] == 0.25 and out["accuracy"] == 0.25
    assert out["pass@1"] == pytest.approx(0.25) and out["pass@2"] == pytest.approx(0.5)
    assert out["prompts"] == 2 and out["samples"] == 4 and out["temperature"] == 0.7
    assert out["truncated_frac"] == 0.25 and out["length_mean"] == 3.5
    metrics = Evaluation(7, {"a": out, "b": {**out, "reward_mean": 0.9}}).metrics()
    assert metrics["eval/a/pass@2"] == pytest.approx(0.5) and metrics["eval/b/reward_mean"] == 0.9
    assert metrics["eval/reward_mean"] == 0.25 and metrics["eval/step"] == 7  # the first set is the headline


def test_default_set_is_the_held_out_prompts():
    assert [s.name for s in configured_sets(from_dict({}))] == ["held_out"]
    assert configured_sets(from_dict({"data": {"num_eval": 0}})) == []
    cfg = from_dict({"evaluation": {"sets": [{"name": "x", "source": "builtin:countdown"}]}})
    assert [s.source for s in configured_sets(cfg)] == ["builtin:countdown"]


@pytest.mark.parametrize(
    "sets, message",
    [
        ([{"name": "a/b"}], "evaluation.sets[0].name: must be a non-empty name"),
        ([{"source": "missing.jsonl"}], "evaluation.sets[0].source: local data file not found"),
        ([{"reward": "nomodule:fn"}], "evaluation.sets[0].reward: cannot import module"),
        (
            [{"samples_per_prompt": 2, "pass_k": [4]}],
            "evaluation.sets[0].pass_k: each k must be in 1..samples",
        ),
        ([{"max_new_tokens": 5000}], "evaluation.sets[0].max_new_tokens: must be in 1..1023"),
    ],
)
def test_bad_eval_sets_are_one_line(sets, message):
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")
    ):
        from_dict({"evaluation": {"sets": sets}})


def wandb_records(run_dir) -> list:
    """The records of the run's offline W&B log (what `wandb sync` would upload). The file is a
    LevelDB-style log (a 7-byte `:W&B` header, then 32 KiB blocks of chunks with a 7-byte header:
    crc32, little-endian length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) of protobuf `Record`s."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one whole record
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow
def test_run_with_own_eval_engines_metrics_artifacts_and_rlhf_eval(tiny_model_dir, tmp_path):
    """Evaluation on its own engine (weight snapshots, results at the step they belong to), the run's
    and the engines' Ray metrics, W&B artifacts offline, then `rlhf eval` on the last checkpoint."""
    import json
    from pathlib import Path

    import ray

    from rlhf.cli.main import main
    from rlhf.config.loader import load_config
    from rlhf.loop.driver import train
    from rlhf.production import lineage
    from rlhf.production.checkpoint import latest_checkpoint
    from rlhf.production.metrics import read_metrics
    from rlhf.production.monitoring import exported_series
    from rlhf.production.monitoring import series_value as value

    repo = Path(__file__).resolve().parents[1]
    sets = (
        "[{name: arith, source: 'builtin:arithmetic', num_prompts: 3, samples_per_prompt: 2, pass_k: [1, 2],"
        " temperature: 1.0}, {name: held, reward: reward}]"
    )
    overrides = {
        "model.path": tiny_model_dir,
        "data.num_eval": "4",
        "rollout.prompts_per_step": "2",
        "rollout.sampling.n": "2",
        "rollout.sampling.max_new_tokens": "8",
        "rollout.max_model_len": "256",
        "trainer.micro_batch_tokens": "256",
        "logging.output_dir": str(tmp_path),
        "logging.run_name": "evalrun",
        "logging.wandb_mode": "offline",
        "logging.plot": "false",
        "checkpoint.every": "1",
        "steps": "2",
        "eval_every": "1",
        "evaluation.separate_engines": "true",
        "evaluation.sets": sets,
    }
    args = [f"{k}={v}" for k, v in overrides.items()]
    env = {"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    ray.init(
        include_dashboard=False,
        runtime_env={"env_vars": env},
        _system_config={"metrics_report_interval_ms": 500},
    )
    try:
        run_dir = train(load_config(repo / "configs/quickstart.yaml", args))

        rows = read_metrics(run_dir / "metrics.jsonl")
        evals = {r["step"]: r for r in rows if "eval/arith/reward_mean" in r}
        assert sorted(evals) == [0, 1, 2]  # before training, after each step (eval_every=1)
        for step, r in evals.items():
            assert r["eval/step"] == step and r["eval/arith/samples"] == 6 and r["eval/held/samples"] == 4
            assert 0 <= r["eval/arith/pass@1"] <= r["eval/arith/pass@2"] <= 1
            assert r["eval/reward_mean"] == r["eval/arith/reward_mean"]  # the first set is the headline
        assert all("train/loss" in r for r in rows if r["step"] > 0 and "eval/step" not in r)

        series = exported_series(r"ray_rlhf_")
        run = {"run": "evalrun"}
        assert value(series, "ray_rlhf_step", **run) == 2
        assert value(series, "ray_rlhf_eval_step", set="arith", **run) == 2
        assert value(series, "ray_rlhf_sync_seconds", **run) > 0
        assert value(series, "ray_rlhf_tokens_per_second", **run) > 0
        for role in ("rollout", "evaluation"):
            assert 0 <= value(series, "ray_rlhf_engine_kv_cache_usage", role=role, engine="0", **run) <= 1
            value(series, "ray_rlhf_engine_requests_running", role=role, **run)

        records = wandb_records(run_dir)
        history = [
            {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        # late evaluation rows reach W&B too, each with the step it belongs to
        assert sorted(h["step"] for h in history if "eval/arith/reward_mean" in h) == [0, 1, 2]
        artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
        (dataset,) = [a for a in artifacts if a.type == "dataset"]
        checkpoints = [a for a in artifacts if a.type == "model"]
        assert [set(a.aliases) for a in checkpoints] == [{"step_1", "latest"}, {"step_2", "latest"}]
        last = json.loads(checkpoints[-1].metadata)
        ckpt = latest_checkpoint(run_dir)
        assert last["manifest_sha256"] == lineage.hash_path(ckpt / "manifest.json")
        assert last["config_hash"] == json.loads((ckpt / "manifest.json").read_text())["config_hash"]
        assert (
            last["parent"] == str(run_dir / "checkpoints" / "step_000001") and last["dataset"] == dataset.name
        )
        paths = {e.path: e.ref for e in checkpoints[-1].manifest.contents}
        assert paths["manifest.json"] == ""  # the manifest itself; the checkpoint's files by reference
        assert (
            paths["checkpoint/policy/hf/model.safetensors"] == (ckpt / "policy/hf/model.safetensors").as_uri()
        )
        assert json.loads(dataset.metadata)["source"] == "builtin:arithmetic"

        report_path = tmp_path / "report.json"
        cli_args = [a for a in args if not a.startswith("model.path=")]
        assert (
            main(
                [
                    "eval",
                    str(ckpt),
                    "--config",
                    str(repo / "configs/quickstart.yaml"),
                    "--out",
                    str(report_path),
                    *cli_args,
                ]
            )
            == 0
        )
        report = json.loads(report_path.read_text())
        assert report["model_dir"] == str(ckpt / "policy" / "hf")
        assert report["lineage"]["manifest_sha256"] == lineage.hash_path(ckpt / "manifest.json")
        assert report["lineage"]["step"] == 2
        assert set(report["sets"]) == {"arith", "held"} and report["sets"]["arith"]["samples"] == 6
        assert (
            main(["eval", str(tmp_path / "nowhere"), "--config", str(repo / "configs/quickstart.yaml")]) == 2
        )
    finally:
        ray.shutdown()


def test_own_engines_without_anything_to_evaluate_is_an_error():
    with pytest.raises(ConfigError, match="evaluation.separate_engines: there is nothing to evaluate"):
        from_dict({"evaluation": {"separate_engines": True}, "data": {"num_eval": 0}})
