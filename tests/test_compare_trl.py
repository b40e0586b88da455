"""The pure parts of experiments/learning (no Ray, vLLM or TRL): the shared prompt sets and the
arithmetic of the comparison's summary, against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from experiments.learning import prompts as P
from experiments.learning import summary as S
from experiments.learning.compare_trl import ours_batches_match, ours_overrides, parse_args
from experiments.learning.trl_baseline import config_kwargs, task_reward


# ------------------------------------------------------------------------------ prompt sets
def test_held_out_is_deterministic_distinct_and_disjoint_from_every_train_pool():
    held = P.held_out_rows(200)
    assert held == P.held_out_rows(200) and len({r["prompt"] for r in held}) == 200
    assert P.held_out_rows(50) == held[:50]  # a smoke test's set is a prefix of the GPU run's
    for seed in (0, 1, 2):
        pool = P.train_rows(seed, 1280, held)
        assert len(pool) == 1280 and pool == P.train_rows(seed, 1280, held)
        assert not {r["prompt"] for r in pool} & {r["prompt"] for r in held}
    assert P.train_rows(0, 64, held) != P.train_rows(1, 64, held)
    assert P.fingerprint(held) == P.fingerprint(P.held_out_rows(200)) != P.fingerprint(held[:-1])


def test_train_pool_drops_exactly_the_held_out_prompts():
    from rlhf.tasks import get_task

    generated = get_task(P.TASK).generate(100, seed=3, **P.TASK_ARGS)
    held = generated[10:20]  # pretend these were held out
    assert P.train_rows(3, 90, held) == generated[:10] + generated[20:]


def test_trl_reward_is_our_checker():
    completions = [
        [{"role": "assistant", "content": "The answer is 95."}],
        [{"role": "assistant", "content": "94"}],
    ]
    assert task_reward(prompts=[None, None], completions=completions, answer=[95, 95]) == [1.0, 0.0]
    assert task_reward(prompts=[None], completions=["-3"], answer=[-3]) == [1.0]


def test_both_sides_get_the_same_budget():
    args = parse_args(["--device", "cpu", "--steps", "40", "--seeds", "0"])
    assert (args.prompts_per_step, args.n, args.max_new_tokens, args.lr, args.mid_step) == (
        32,
        8,
        48,
        1e-5,
        20,
    )
    ours = dict(
        o.split("=", 1)
        for o in ours_overrides(args, 1, P.Path("/x.jsonl"), P.Path("/r"), ["trainer.lr=2e-5"])
    )
    assert ours["steps"] == "40" and ours["rollout.sampling.n"] == "8" and ours["data.num_train"] == "1280"
    assert ours["checkpoint.every"] == "20" and ours["data.seed"] == ours["seed"] == "1"
    assert ours["trainer.lr"] == "2e-5"  # a variant's override comes last and wins
    spec = dict(steps=40, prompts_per_step=32, n=8, max_new_tokens=48, temperature=1.0, lr=1e-5, seed=1,
                device="cuda", micro_batch=64, mid_step=20, out_dir="/o")  # fmt: skip
    kw = config_kwargs(spec)
    assert kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] == 32 * 8
    assert kw["use_vllm"] and kw["vllm_mode"] == "colocate" and kw["bf16"] and kw["beta"] == 0.0
    assert kw["lr_scheduler_type"] == "constant" and kw["save_steps"] == 20 and not kw["shuffle_dataset"]
    with pytest.raises(ValueError, match="does not divide"):
        config_kwargs({**spec, "micro_batch": 48})


def test_batch_check_reads_our_logged_samples(tmp_path):
    import json

    trl = P.write_jsonl(
        tmp_path / "trl.jsonl", [{"prompt": f"Compute {i} + 1.", "answer": i + 1} for i in range(4)]
    )
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    logged = [(1, "Compute 0 + 1."), (1, "Compute 1 + 1."), (2, "Compute 3 + 1.")]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"step": s, "prompt": chat.format(u)}) + "\n" for s, u in logged))
    assert ours_batches_match(samples, trl, per_step=2) is True
    assert ours_batches_match(samples, trl, per_step=1) is False  # step 1 would be prompt 0 only
    assert ours_batches_match(tmp_path / "none.jsonl", trl, per_step=2) is None


# ------------------------------------------------------------------------------ summary maths
def test_spread_and_curves():
    s = S.spread([0.2, 0.4, 0.9])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.5) and (s["min"], s["max"]) == (0.2, 0.9)
    assert s["std"] == pytest.approx(math.sqrt(((0.3**2) + (0.1**2) + (0.4**2)) / 2))  # sample std, n - 1
    assert S.spread([0.3])["std"] == 0.0 and S.spread([None])["mean"] is None
    assert S.mean_curve([[0.0, 0.5, 1.0], [1.0, None, 0.0], [0.5]]) == [0.5, 0.5, 0.5]
    assert S.mean_curve([[None], [None]]) == [None]
    assert S.curve_mean([0.1, None, 0.3, 0.5]) == pytest.approx(0.3)
    assert S.curve_mean([0.1, 0.2, 0.3, 0.5], last=2) == pytest.approx(0.4)


def test_aggregate_against_hand_computed_values():
    def run(label, seed, curve, after, mid, status="ok"):
        return {"label": label, "seed": seed, "status": status, "train_reward": curve,
                "greedy": {"4": after, "2": mid}}  # fmt: skip

    runs = [
        run("ours", 0, [0.1, 0.2, 0.3, 0.4], 0.30, 0.20),
        run("ours", 1, [0.3, 0.4, 0.5, 0.6], 0.50, 0.40),
        run("trl", 0, [0.0, 0.1, 0.1, 0.2], 0.25, 0.20),
        run("trl", 1, [0.2, 0.1, 0.3, 0.2], 0.35, 0.30),
        run("trl", 2, [0.9, 0.9, 0.9, 0.9], 0.99, 0.99, status="failed"),  # counts nowhere
        run("ours:tis", 0, [0.2, 0.2, 0.2, 0.2], 0.40, 0.10),
    ]
    agg = S.aggregate(runs, steps=4, mid_step=2, base=0.17)
    assert list(agg["by_label"]) == ["ours", "trl", "ours:tis"]
    assert agg["base_greedy"] == 0.17
    assert agg["ours_greedy_after_mean"] == pytest.approx(0.40)
    assert agg["trl_greedy_after_mean"] == pytest.approx(0.30)
    assert agg["ours_greedy_step2_mean"] == pytest.approx(0.30)
    assert agg["trl_greedy_step2_mean"] == pytest.approx(0.25)
    assert agg["ours_tis_greedy_after_mean"] == pytest.approx(0.40)
    ours, trl = agg["by_label"]["ours"], agg["by_label"]["trl"]
    assert ours["greedy_after_per_seed"] == {"0": 0.30, "1": 0.50} and trl["seeds"] == [0, 1]
    assert ours["greedy_after"]["std"] == pytest.approx(math.sqrt(0.02))  # (0.1^2 + 0.1^2) / 1
    assert (trl["greedy_after"]["min"], trl["greedy_after"]["max"]) == (0.25, 0.35)
    assert ours["train_reward_curve_mean"] == pytest.approx([0.2, 0.3, 0.4, 0.5])
    assert trl["train_reward_curve_mean"] == pytest.approx([0.1, 0.1, 0.2, 0.2])
    assert ours["train_reward_mean_per_seed"] == pytest.approx({"0": 0.25, "1": 0.45})
    assert agg["ours_train_reward_mean"] == pytest.approx(0.35)
    assert agg["trl_train_reward_mean"] == pytest.approx(0.15)
    assert ours["train_reward_last5_mean"]["mean"] == pytest.approx(0.35)  # 4 steps: all of them
    assert S.aggregate(runs, steps=4, mid_step=None, base=None).get("ours_greedy_step2_mean") is None


def test_plot_writes_a_png(tmp_path):
    runs = [
        {"label": "ours", "seed": 0, "status": "ok", "train_reward": [0.1, None, 0.3], "greedy": {"3": 0.5}}
    ]
    path = tmp_path / "curve.png"
    S.plot(S.aggregate(runs, steps=3, mid_step=None, base=0.2), str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_state_takes_the_other_dirs_finished_runs_only():
    from experiments.learning.compare_trl import SHARED_KEYS, merge_state

    settings = {k: 1 for k in SHARED_KEYS}
    mine = {
        "settings": dict(settings),
        "runs": {"ours/s0": {"status": "ok"}},
        "evals": {"base": {"accuracy": 0.25}},
    }
    other = {
        "settings": {**settings, "train_fingerprints": {"1": "abc"}},
        "runs": {
            "trl/s0": {"status": "ok"},
            "trl/s1": {"status": "failed"},
            "ours/s0": {"status": "ok", "x": 1},
        },
        "evals": {"base": {"accuracy": 0.5}, "/w/trl-s0": {"accuracy": 0.75}},
    }
    assert merge_state(mine, other) == ["trl/s0"]
    assert set(mine["runs"]) == {"ours/s0", "trl/s0"} and "x" not in mine["runs"]["ours/s0"]
    assert mine["evals"] == {"base": {"accuracy": 0.25}, "/w/trl-s0": {"accuracy": 0.75}}
    assert mine["settings"]["train_fingerprints"] == {"1": "abc"}
    with pytest.raises(SystemExit, match="other settings"):
        merge_state(mine, {**other, "settings": {**settings, "steps": 2}})


def test_a_recorded_summary_merges_without_its_base_scores(tmp_path):
    from experiments.learning.compare_trl import SHARED_KEYS, load_merge_source, merge_state

    settings = {k: 1 for k in SHARED_KEYS}
    recorded = {
        "settings": settings,
        "runs": {"trl/s0": {"status": "ok", "models": {"40": "/old/trl-s0"}}},
        "evals": {
            "base": {"accuracy": 0.25},
            "base_recheck": {"accuracy": 0.25},
            "/old/trl-s0": {"accuracy": 0.5},
        },
        "by_label": {},
    }
    (tmp_path / "summary.json").write_text(json.dumps(recorded))
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "state.json").write_text(json.dumps({**recorded, "runs": {}}))
    mine = {"settings": dict(settings), "runs": {}, "evals": {}}
    assert merge_state(mine, load_merge_source(tmp_path / "summary.json")) == ["trl/s0"]
    assert mine["evals"] == {"/old/trl-s0": {"accuracy": 0.5}}  # the base is scored again by this evaluation
    assert load_merge_source(tmp_path / "work")["evals"]["base"] == {"accuracy": 0.25}


def test_variants_only_leaves_out_the_default_runs_of_ours():
    args = parse_args(["--variants-only", "--only", "ours", "--variant", "tis", "algorithm.tis_cap=2.0"])
    assert args.variants_only and args.variant == [["tis", "algorithm.tis_cap=2.0"]]
