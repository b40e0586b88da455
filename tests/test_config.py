"""Recipe loading: includes, overrides, typing, one-line errors, semantic checks and the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf.cli.main import main
from rlhf.config.loader import ConfigError, from_dict, load_config, resolve_device, to_dict, to_yaml
from rlhf.config.schema import RunConfig

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    """A small valid recipe; tests run from tmp_path so messages show short relative paths."""
    monkeypatch.chdir(tmp_path)
    return write(
        tmp_path / "base.yaml",
        """
        steps: 3
        rollout:
          prompts_per_step: 2
          sampling: {n: 4, temperature: 0.7}
        trainer: {lr: 1e-5}
        """,
    )


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


# ---------------------------------------------------------------------------------------------- typing


def test_loads_typed_values(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, RunConfig)
    assert cfg.steps == 3 and cfg.rollout.sampling.n == 4
    # YAML 1.1 reads `1e-5` as a string: numeric strings are accepted where a float is expected.
    assert cfg.trainer.lr == 1e-5 and isinstance(cfg.trainer.lr, float)
    assert cfg.rollout.sampling.top_p == 1.0  # untouched defaults stay
    assert cfg.source_file == str(recipe)


def test_int_is_promoted_to_float(recipe):
    cfg = load_config(recipe, ["rollout.sampling.temperature=1"])
    assert cfg.rollout.sampling.temperature == 1.0 and isinstance(cfg.rollout.sampling.temperature, float)


def test_typo_key_suggests_the_closest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "x.yaml", "rollout:\n  samplng: {n: 2}\n")
    assert error_of(path) == "x.yaml: rollout.samplng: unknown key; did you mean 'rollout.sampling'?"


def test_unknown_top_level_key_lists_sections(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "x.yaml", "zzz: 1\n")
    message = error_of(path)
    assert message.startswith("x.yaml: zzz: unknown key; valid keys: model, data, rollout")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("steps: ten\n", "x.yaml: steps: must be an integer (got 'ten')"),
        ("steps: true\n", "x.yaml: steps: must be an integer, not a boolean (got True)"),
        ("steps: 2.5\n", "x.yaml: steps: must be an integer (got 2.5)"),
        ("trainer: {lr: fast}\n", "x.yaml: trainer.lr: must be a number (got 'fast')"),
        ("model: {trust_remote_code: 1}\n", "x.yaml: model.trust_remote_code: must be true or false (got 1)"),
        (
            "placement: {device: gpu}\n",
            "x.yaml: placement.device: must be one of 'auto', 'cpu', 'cuda' (got 'gpu')",
        ),
        ("trainer: {zero_stage: 4}\n", "x.yaml: trainer.zero_stage: must be one of 0, 1, 2, 3 (got 4)"),
        (
            "trainer: {adam_betas: [0.9]}\n",
            "x.yaml: trainer.adam_betas: must have exactly 2 values (got [0.9])",
        ),
        ("rollout: {sampling: 3}\n", "x.yaml: rollout.sampling: must be a mapping (a section) (got 3)"),
        (
            "rollout: {sampling: {stop: [1]}}\n",
            "x.yaml: rollout.sampling.stop[0]: must be a string (quote it in YAML) (got 1)",
        ),
        (
            "reward: {sources: [{kind: rule, weight: x}]}\n",
            "x.yaml: reward.sources[0].weight: must be a number (got 'x')",
        ),
        ("model: {cache_dir: 3}\n", "x.yaml: model.cache_dir: must be a string (quote it in YAML) (got 3)"),
    ],
)
def test_wrong_types(tmp_path, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)
    assert error_of(write(tmp_path / "x.yaml", text)) == expected


def test_bad_yaml_and_non_mapping(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert error_of(write(tmp_path / "x.yaml", "steps: [1\n")).startswith("x.yaml: invalid YAML at line")
    assert (
        error_of(write(tmp_path / "y.yaml", "- 1\n"))
        == "y.yaml: top level must be a mapping of sections (got [1])"
    )
    assert error_of(tmp_path / "missing.yaml") == "missing.yaml: config file not found: missing.yaml"


# ---------------------------------------------------------------------------------------------- semantics


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.lr=-0.1", "<override>: trainer.lr: must be > 0 (got -0.1)"),
        ("steps=0", "<override>: steps: must be >= 1 (got 0)"),
        ("rollout.sampling.n=0", "<override>: rollout.sampling.n: must be >= 1 (got 0)"),
        (
            "rollout.sampling.temperature=-1",
            "<override>: rollout.sampling.temperature: must be >= 0 (got -1.0)",
        ),
        ("rollout.sampling.top_p=0", "<override>: rollout.sampling.top_p: must be in (0, 1] (got 0.0)"),
        ("rollout.sampling.top_p=1.5", "<override>: rollout.sampling.top_p: must be in (0, 1] (got 1.5)"),
        ("algorithm.clip_low=-0.2", "<override>: algorithm.clip_low: must be >= 0 (got -0.2)"),
        (
            "rollout.gpu_memory_utilization=1.2",
            "<override>: rollout.gpu_memory_utilization: must be in (0, 1] (got 1.2)",
        ),
    ],
)
def test_range_checks(recipe, override, expected):
    # The message names the last writer of the key (here the override, not base.yaml).
    assert error_of(recipe, [override]) == expected


def test_negative_lr_in_file_names_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "configs/x.yaml", "trainer: {lr: -0.1}\n")
    assert error_of(path) == "configs/x.yaml: trainer.lr: must be > 0 (got -0.1)"


def test_algorithm_names(recipe):
    assert error_of(recipe, ["algorithm.advantage=ppo"]) == (
        "<override>: algorithm.advantage: must be one of grpo, dr_grpo, rloo, reinforce_pp, "
        "reinforce_pp_baseline, gae (got 'ppo')"
    )
    assert "gae needs a critic: set trainer.critic.enabled=true" in error_of(
        recipe, ["algorithm.advantage=gae"]
    )
    cfg = load_config(recipe, ["algorithm.advantage=gae", "trainer.critic.enabled=true"])
    assert cfg.algorithm.advantage == "gae"
    assert "loss_agg: must be one of token_mean" in error_of(recipe, ["algorithm.loss_agg=sum"])
    assert error_of(recipe, ["rollout.sampling.n=1"]) == (
        "<override>: rollout.sampling.n: grpo compares samples of a prompt: needs n >= 2 (got 1)"
    )
    assert (
        load_config(recipe, ["rollout.sampling.n=1", "algorithm.advantage=reinforce_pp"]).rollout.sampling.n
        == 1
    )


def test_reward_sources(recipe, tmp_path, monkeypatch):
    assert error_of(
        recipe, ["reward.sources=[{kind: rule, name: task}, {kind: rule, name: nosuch_pkg.mod:fn}]"]
    ) == (
        "<override>: reward.sources[1].name: cannot import module 'nosuch_pkg.mod' "
        "(No module named 'nosuch_pkg') (got 'nosuch_pkg.mod:fn')"
    )
    assert "reward.sources[0].name: unknown rule; use one of task, format" in error_of(
        recipe, ["reward.sources=[{name: length}]"]
    )
    write(tmp_path / "my_rewards.py", "def brevity(sample):\n    return 1.0\nLIMIT = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(recipe, ["reward.sources=[{name: task}, {name: 'my_rewards:brevity', weight: 0.5}]"])
    assert [(s.name, s.weight) for s in cfg.reward.sources] == [("task", 1.0), ("my_rewards:brevity", 0.5)]
    assert "module 'my_rewards' has no attribute 'nope'" in error_of(
        recipe, ["reward.sources=[{name: 'my_rewards:nope'}]"]
    )
    assert "'my_rewards:LIMIT' is not callable" in error_of(
        recipe, ["reward.sources=[{name: 'my_rewards:LIMIT'}]"]
    )
    assert error_of(recipe, ["reward.sources=[{kind: rule, weight: .nan}]"]) == (
        "<override>: reward.sources[0].weight: must be a finite number (got nan)"
    )
    assert "reward.sources[0].path: a model reward source needs a path" in error_of(
        recipe, ["reward.sources=[{kind: model}]"]
    )
    assert "reward.sources[0].url: an http reward source needs an http(s):// url" in error_of(
        recipe, ["reward.sources=[{kind: http, url: 'ftp://x'}]"]
    )
    assert "reward.sources[0].kind: must be one of 'rule', 'model', 'http'" in error_of(
        recipe, ["reward.sources=[{kind: human}]"]
    )


def test_placement_checks(recipe):
    assert error_of(recipe, ["placement.colocate=[[rollot, learner]]"]) == (
        "<override>: placement.colocate[0]: unknown role 'rollot'; did you mean 'rollout'? "
        "(got ['rollot', 'learner'])"
    )
    assert "role 'learner' appears twice in this group" in error_of(
        recipe, ["placement.colocate=[[learner, learner]]"]
    )
    assert "role 'learner' appears also in placement.colocate[0]" in error_of(
        recipe, ["placement.colocate=[[rollout, learner], [learner, reference]]"]
    )
    assert error_of(recipe, ["placement.learner.replicas=0"]) == (
        "<override>: placement.learner.replicas: must be >= 1 (got 0)"
    )
    assert (
        error_of(recipe, ["placement.rollout.gpus=-1"])
        == "<override>: placement.rollout.gpus: must be >= 0 (got -1.0)"
    )
    assert "fractional gpus of colocated roles sum to 1.2 > 1" in error_of(
        recipe,
        [
            "placement.colocate=[[rollout, learner]]",
            "placement.rollout.gpus=0.6",
            "placement.learner.gpus=0.6",
        ],
    )


def test_data_source(recipe, tmp_path):
    assert error_of(recipe, ["data.source=./nowhere.jsonl"]) == (
        "<override>: data.source: local data file not found (relative paths are from the working dir) "
        "(got './nowhere.jsonl')"
    )
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    assert load_config(recipe, ["data.source=prompts.jsonl"]).data.source == "prompts.jsonl"
    assert load_config(recipe, ["data.source=openai/gsm8k"]).data.source == "openai/gsm8k"  # a hub name
    try:
        import rlhf.tasks  # noqa: F401 - written by another package; the check is skipped without it
    except ModuleNotFoundError:
        return
    assert "data.source: unknown built-in task" in error_of(recipe, ["data.source=builtin:nosuchtask"])


def test_from_dict_validates():
    assert from_dict({"steps": 2}).steps == 2
    with pytest.raises(ConfigError, match=r"^<dict>: trainer.lr: must be > 0 \(got 0.0\)$"):
        from_dict({"trainer": {"lr": 0}})


# ---------------------------------------------------------------------------------------------- includes


def test_defaults_are_merged_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "configs/base/common.yaml", "steps: 5\ntrainer: {lr: 2.0e-6, zero_stage: 3}\nseed: 1\n")
    write(tmp_path / "configs/base/gpu.yaml", "placement: {device: cpu}\ntrainer: {zero_stage: 2}\n")
    child = write(
        tmp_path / "configs/run.yaml",
        "defaults: [base/common.yaml, base/gpu.yaml]\ntrainer: {lr: 3.0e-6}\nseed: 7\n",
    )
    cfg = load_config(child)
    assert (cfg.steps, cfg.trainer.lr, cfg.trainer.zero_stage, cfg.seed) == (5, 3e-6, 2, 7)
    assert cfg.placement.device == "cpu"
    # Errors in an included file name that file.
    write(tmp_path / "configs/base/common.yaml", "steps: 5\ntrainer: {lr: -1.0}\n")
    assert error_of(tmp_path / "configs/base/../run.yaml", ["trainer.lr=-1"]).startswith(
        "<override>: trainer.lr"
    )
    write(tmp_path / "configs/run.yaml", "defaults: [base/common.yaml]\n")
    assert error_of(child) == "configs/base/common.yaml: trainer.lr: must be > 0 (got -1.0)"
    write(tmp_path / "configs/base/common.yaml", "steps: 5\nrollout: {sampling: {temprature: 1.0}}\n")
    assert error_of(child) == (
        "configs/base/common.yaml: rollout.sampling.temprature: unknown key; did you mean "
        "'rollout.sampling.temperature'?"
    )


def test_include_cycle_and_missing_include(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path / "b.yaml", "defaults: [a.yaml]\n")
    assert error_of(tmp_path / "a.yaml") == "b.yaml: defaults: include cycle: a.yaml -> b.yaml -> a.yaml"
    write(tmp_path / "c.yaml", "defaults: [nope.yaml]\n")
    assert error_of(tmp_path / "c.yaml") == "c.yaml: defaults: config file not found: nope.yaml"
    write(tmp_path / "d.yaml", "defaults: 3\n")
    assert error_of(tmp_path / "d.yaml") == "d.yaml: defaults: must be a list of YAML file paths (got 3)"


# ---------------------------------------------------------------------------------------------- overrides


def test_overrides_lists_dicts_and_indices(recipe):
    cfg = load_config(
        recipe,
        [
            "trainer.lr=1e-5",
            "placement.colocate=[[rollout,learner]]",
            "reward.sources=[{kind: rule, name: task}, {kind: rule, name: format, weight: 0.1}]",
            "reward.sources[1].weight=0.25",
            "data.task_args={difficulty: 2}",
            "trainer.adam_betas=[0.9, 0.95]",
            "rollout.gpu_memory_utilization=null",
            "logging.run_name=2024-01-01",
            "rollout.sampling.stop=['</answer>']",
        ],
    )
    assert cfg.trainer.lr == 1e-5
    assert cfg.placement.colocate == [["rollout", "learner"]]
    assert [(s.name, s.weight) for s in cfg.reward.sources] == [("task", 1.0), ("format", 0.25)]
    assert cfg.data.task_args == {"difficulty": 2}
    assert cfg.trainer.adam_betas == (0.9, 0.95)
    assert cfg.rollout.gpu_memory_utilization is None
    assert cfg.logging.run_name == "2024-01-01"  # a string field keeps the text, not a YAML date
    assert cfg.rollout.sampling.stop == ["</answer>"]


def test_section_override_merges_into_the_recipe(recipe):
    cfg = load_config(recipe, ["rollout={sampling: {temperature: 0.5}}"])
    assert (cfg.rollout.sampling.temperature, cfg.rollout.sampling.n, cfg.rollout.prompts_per_step) == (
        0.5,
        4,
        2,
    )
    assert (
        error_of(recipe, ["rollout={sampling: {n: 0}}"])
        == "<override>: rollout.sampling.n: must be >= 1 (got 0)"
    )


def test_bad_overrides(recipe):
    assert (
        error_of(recipe, ["trainer.lrr=1"])
        == "<override>: trainer.lrr: unknown key; did you mean 'trainer.lr'?"
    )
    assert (
        error_of(recipe, ["trainer.lr"]) == "<override>: overrides look like key.sub=value (got 'trainer.lr')"
    )
    assert error_of(recipe, ["reward.sources[3].weight=1"]).startswith(
        "<override>: reward.sources[3].weight: index into 'sources' needs a list set in the recipe"
    )
    assert error_of(recipe, ["rollout.sampling.n=[1"]) == (
        "<override>: rollout.sampling.n: value is not valid YAML (got '[1')"
    )


def test_resume_override(recipe, tmp_path):
    run_dir = tmp_path / "runs" / "2024-01-01"
    assert (
        error_of(recipe, [f"resume={run_dir}"])
        == f"<override>: resume: run directory not found (got '{run_dir}')"
    )
    run_dir.mkdir(parents=True)
    assert load_config(recipe, [f"resume={run_dir}"]).resume == str(run_dir)
    # A run directory holding its config.yaml can be passed instead of the recipe.
    (run_dir / "config.yaml").write_text(to_yaml(load_config(recipe, ["steps=9"])))
    cfg = load_config(run_dir, ["steps=12"])
    assert (cfg.resume, cfg.steps, cfg.trainer.lr) == (str(run_dir), 12, 1e-5)


# ---------------------------------------------------------------------------------------------- round trip


def test_to_yaml_round_trips(recipe, tmp_path):
    cfg = load_config(
        recipe,
        [
            "placement.colocate=[[rollout,learner]]",
            "reward.sources=[{name: task}, {name: format, weight: 0.2, args: {tag: answer}}]",
            "algorithm.clip_high=0.28",
            "placement.learner.resources={ssd: 1}",
        ],
    )
    again = load_config(write(tmp_path / "dump.yaml", to_yaml(cfg)))
    first, second = to_dict(cfg), to_dict(again)
    first.pop("source_file")
    second.pop("source_file")
    assert first == second
    assert again.trainer.adam_betas == (0.9, 0.999)


def test_resolve_device(recipe):
    import torch

    assert resolve_device(load_config(recipe, ["placement.device=cpu"])) == "cpu"
    assert resolve_device(load_config(recipe)) == ("cuda" if torch.cuda.is_available() else "cpu")


def test_shipped_inventories_load():
    from rlhf.placement import load_inventory

    counts = {p.stem: load_inventory(p).gpu_counts() for p in (REPO / "configs/inventories").glob("*.yaml")}
    assert counts == {
        "h100x8_l4x8": {"H100": 8, "L4": 8},
        "laptop": {},
        "h100x1": {"H100": 1},
        "h200x1": {"H200": 1},
        "h100x2": {"H100": 2},
        "h100x4": {"H100": 4},
    }


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_validate_prints_resolved_yaml(recipe, capsys):
    assert main(["validate", str(recipe), "trainer.lr=3e-6", "steps=4"]) == 0
    out = capsys.readouterr().out
    assert "lr: 3.0e-06" in out and "steps: 4" in out
    assert load_config(write(recipe.parent / "printed.yaml", out)).trainer.lr == 3e-6


def test_cli_validate_error_exit_code(recipe, capsys):
    assert main(["validate", str(recipe), "rollout.samplng.n=2"]) == 2
    err = capsys.readouterr().err
    assert err == "error: <override>: rollout.samplng: unknown key; did you mean 'rollout.sampling'?\n"


def test_cli_validate_checks_the_placement_against_an_inventory(recipe, capsys):
    h100x2 = str(REPO / "configs/inventories/h100x2.yaml")
    hybrid = [
        "placement.device=cuda",
        "placement.colocate=[[rollout,learner]]",
        "placement.learner.replicas=2",
    ]
    assert (
        main(["validate", str(recipe), "--inventory", h100x2, *hybrid, "placement.rollout.replicas=2"]) == 0
    )
    capsys.readouterr()
    # more engines than GPUs, and a tensor-parallel engine wider than the machine: one line each
    for bad in (["placement.rollout.replicas=3"], ["rollout.tensor_parallel=4"]):
        assert main(["validate", str(recipe), "--inventory", h100x2, *hybrid, *bad]) == 3
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "GPUs but the cluster has 2" in err, err


def test_cli_train_reports_config_errors_before_starting(recipe, capsys):
    assert main(["train", str(recipe), "trainer.lr=0"]) == 2
    assert capsys.readouterr().err == "error: <override>: trainer.lr: must be > 0 (got 0.0)\n"


def test_cli_usage_errors(recipe):
    with pytest.raises(SystemExit) as info:
        main(["validate", str(recipe), "--nope"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main([])


def test_python_dash_m_entry_point(recipe):
    result = subprocess.run(
        [sys.executable, "-m", "rlhf", "validate", str(recipe), "steps=0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: <override>: steps: must be >= 1 (got 0)"


def test_train_refuses_an_existing_run_directory_in_one_line(tmp_path, capsys):
    """Another run's directory is never written over: one line naming the key and the way to resume."""
    taken = tmp_path / "runs" / "taken"
    taken.mkdir(parents=True)
    (taken / "metrics.jsonl").write_text('{"step": 1}\n')
    rc = main(
        ["train", "configs/quickstart.yaml", f"logging.output_dir={tmp_path / 'runs'}", "logging.run_name=taken"]
    )
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: logging.run_name: run directory {taken} exists already; choose another name, or resume={taken}"
    ]
    assert (taken / "metrics.jsonl").read_text() == '{"step": 1}\n' and len(list(taken.iterdir())) == 1
