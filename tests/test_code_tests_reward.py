"""The `code_tests` reward: programs run against their tests in the sandbox; every hostile program
(hanging, memory-hungry, networking, writing outside its directory, forking) is contained and
reported with its error class, and the test process goes on."""

from __future__ import annotations

import os
import tempfile
import time

import pytest
from rlhf.reward.code_tests import CodeTestsReward, extract_code, program
from rlhf.reward.pipeline import RewardPipeline
from rlhf.reward.rules import RewardError, RuleReward
from rlhf.reward.sandbox import Limits, instrument, isolation, run

from rlhf.config.schema import RewardConfig, RewardSourceConfig
from rlhf.types import Prompt, Sample

LIMITS = Limits(timeout_s=2.0, memory_mb=512)
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4\n"


def sample(response: str, label, group: int = 0) -> Sample:
    prompt = Prompt(index=group, text="Write add(a, b).", token_ids=[1], label=label, metadata={})
    return Sample(group, prompt, [1], response, None, "stop")


def test_passing_program():
    out = run(ADD, ADD_TESTS, LIMITS)
    assert (out.status, out.passed, out.total) == ("ok", 3, 3)


def test_failing_assertions_are_counted_one_by_one():
    out = run("def add(a, b):\n    return a * b\n", ADD_TESTS, LIMITS)  # 1*2, -1*1 fail; 2*2 holds
    assert (out.status, out.passed, out.total) == ("assertion", 1, 3)
    assert out.detail.startswith("AssertionError")


def test_an_exception_inside_an_assertion_fails_that_assertion_only():
    code = "def inv(x):\n    return 1 / x\n"
    out = run(code, "assert inv(1) == 1\nassert inv(0) == 0\nassert inv(2) == 0.5\n", LIMITS)
    assert (out.status, out.passed, out.total) == ("crash", 2, 3)
    assert "ZeroDivisionError" in out.detail


def test_test_functions_each_run():
    tests = "def test_one():\n    assert add(1, 1) == 2\n\ndef test_two():\n    assert add(1, 1) == 3\n"
    assert instrument(tests)[1:] == (2, ("test_one", "test_two"))
    out = run(ADD, tests, LIMITS)
    assert (out.status, out.passed, out.total) == ("assertion", 1, 2)


def test_syntax_error():
    out = run("def add(a, b)\n    return a + b\n", ADD_TESTS, LIMITS)
    assert (out.status, out.passed) == ("syntax", 0)


def test_hanging_program_is_killed_within_the_limit():
    start = time.monotonic()
    out = run("while True:\n    pass\n", ADD_TESTS, Limits(timeout_s=1.0))
    assert out.status == "timeout" and out.passed == 0
    assert time.monotonic() - start < 3.0


def test_memory_hungry_program_is_contained():
    out = run("x = bytearray(10**10)\n", "assert True", LIMITS)
    assert out.status == "crash" and "MemoryError" in out.detail


def test_network_is_unreachable():
    code = 'import socket\nsocket.create_connection(("1.1.1.1", 80), timeout=1)\n'
    out = run(code, "assert True", LIMITS)
    assert out.status == "crash" and out.passed == 0


def test_writes_outside_the_working_directory_do_not_land(tmp_path, monkeypatch):
    outside = f"/tmp/rlhf-sandbox-escape-{os.getpid()}"
    repo_file = os.path.join(os.path.dirname(__file__), f"escape-{os.getpid()}.txt")
    code = f"open({outside!r}, 'w').write('x')\nopen({repo_file!r}, 'w').write('x')\n"
    out = run(code, "assert True", LIMITS)
    assert out.status == "crash" and not os.path.exists(outside) and not os.path.exists(repo_file)
    # inside its own directory a program may write, up to RLIMIT_FSIZE; the directory is removed
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the working directories go
    big = run("open('big', 'wb').write(b'x' * (64 * 2**20))\n", "assert True", Limits(file_size_mb=8))
    assert big.status == "crash" and "File too large" in big.detail
    small = run("open('f.txt', 'w').write('hello')\n", "assert open('f.txt').read() == 'hello'", LIMITS)
    assert small.ok and list(tmp_path.iterdir()) == []


def test_fork_loop_is_bounded():
    code = "import os\nchildren = 0\nwhile True:\n    if os.fork() == 0:\n        while True: pass\n    children += 1\n"
    start = time.monotonic()
    out = run(code, "assert True", LIMITS)
    assert out.status == "crash" and time.monotonic() - start < 3.0


@pytest.mark.skipif(isolation() != "namespaces", reason="needs root and unshare")
def test_namespaces_hold_without_the_in_process_guard():
    """Past the audit hook (libc through ctypes): the file system is read-only, processes are bounded
    by the sandbox user's RLIMIT_NPROC, and there is no network device to connect through."""
    target = f"/tmp/rlhf-sandbox-ctypes-{os.getpid()}"
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None)\n"
        f"fd = libc.open({target.encode()!r}, 0o101, 0o644)\n"  # O_WRONLY | O_CREAT
        "forks = 0\nfor _ in range(200):\n    pid = libc.fork()\n    if pid == 0:\n        libc.pause()\n"
        "    if pid < 0:\n        break\n    forks += 1\n"
    )
    out = run(code, "assert fd < 0\nassert forks < 100\n", LIMITS)
    assert (out.status, out.passed) == ("ok", 2) and not os.path.exists(target)


def test_extract_code_and_labels():
    assert extract_code("Here:\n```python\nx = 1\n```\nand\n```py\nx = 2\n```\n") == "x = 2\n"
    assert extract_code("```python\nx = 3\n") == "x = 3\n"  # a response cut off inside its block
    assert extract_code("x = 4") == "x = 4"
    label = {"prompt": "def f(x):\n    '''doc'''\n", "entry_point": "f", "test": "assert f(1) == 2"}
    assert program("    return x + 1\n", label)[0] == "def f(x):\n    '''doc'''\n    return x + 1\n"
    whole = program("```python\ndef f(x):\n    return x + 1\n```", label)[0]
    assert whole.endswith("\ndef f(x):\n    return x + 1\n")
    with pytest.raises(ValueError, match="label must be Python test code"):
        program("x", 3)


def test_rule_args_are_checked():
    with pytest.raises(RewardError, match="unknown args"):
        RuleReward.from_config("code_tests", {"timeout": 3})
    with pytest.raises(RewardError, match="args.timeout_s must be a number"):
        RuleReward.from_config("code_tests", {"timeout_s": "3"})
    with pytest.raises(RewardError, match="partial_credit must be true or false"):
        RuleReward.from_config("code_tests", {"partial_credit": "yes"})


def test_rule_scores_a_batch_in_parallel_with_partial_credit():
    rule = RuleReward.from_config("code_tests", {"timeout_s": 2, "workers": 3, "partial_credit": True})
    assert isinstance(rule, CodeTestsReward) and rule.workers == 3
    responses = [
        ADD,
        "def add(a, b):\n    return a * b\n",
        "def add(a, b):\n  return (\n",
        "while True: pass",
    ]
    scores, errors = rule.score([sample(r, ADD_TESTS) for r in responses])
    assert errors == 0 and scores == pytest.approx([1.0, 1 / 3, 0.0, 0.0])
    assert rule.stats() | {"tests_passed_frac": 0, "seconds_max": 0} == {
        "ok": 1.0, "syntax": 1.0, "timeout": 1.0, "assertion": 1.0, "crash": 0.0,
        "tests_passed_frac": 0, "seconds_max": 0,
    }  # fmt: skip
    rule.shutdown()


def test_pipeline_reports_error_classes_and_bad_labels():
    cfg = RewardConfig(
        sources=[RewardSourceConfig(name="code_tests", args={"timeout_s": 2, "workers": 2})], on_error="zero"
    )
    pipeline = RewardPipeline(cfg)
    try:
        samples = [sample(ADD, ADD_TESTS), sample("x = 1", ADD_TESTS, 1), sample(ADD, None, 2)]
        assert pipeline.score(samples) == [1.0, 0.0, 0.0]
        stats = pipeline.last_stats()
        assert stats["reward/code_tests_ok"] == 1.0 and stats["reward/code_tests_crash"] == 1.0  # NameError
        assert stats["reward/errors"] == 1.0  # the sample without tests
    finally:
        pipeline.shutdown()


def test_process_mode_refuses_network_forks_and_outside_writes():
    """Without namespaces (not root, or no unshare) the in-process guard still contains honest code."""
    outside = f"/tmp/rlhf-sandbox-process-{os.getpid()}"
    for code in (
        'import socket\nsocket.create_connection(("1.1.1.1", 80), timeout=1)\n',
        "import os\nwhile True:\n    os.fork()\n",
        f"open({outside!r}, 'w').write('x')\n",
        "import subprocess\nsubprocess.run(['true'])\n",
    ):
        out = run(code, "assert True", LIMITS, mode="process")
        assert out.status == "crash" and "PermissionError: sandbox:" in out.detail, (code, out)
    assert not os.path.exists(outside)


def test_config_accepts_code_tests_and_humaneval():
    from rlhf.config.loader import from_dict

    cfg = from_dict(
        {
            "reward": {"sources": [{"kind": "rule", "name": "code_tests", "args": {"timeout_s": 3}}]},
            "evaluation": {"sets": [{"name": "he", "source": "builtin:humaneval", "reward": "code_tests"}]},
        }
    )
    assert cfg.reward.sources[0].name == "code_tests" and cfg.evaluation.sets[0].source == "builtin:humaneval"


def test_code_functions_task_generates_problems_whose_tests_a_right_answer_passes():
    """builtin:code_functions: deterministic per seed, other problems for another seed, scored by the
    `code_tests` rule through the task's rule; a right function passes every assert, a wrong one none."""
    from rlhf.tasks import get_task

    task = get_task("code_functions")
    rows = task.generate(40, seed=3)
    assert rows == task.generate(40, seed=3) and rows != task.generate(40, seed=4)
    assert len({r["kind"] for r in rows}) > 10
    add = next(r for r in task.generate(50, seed=0, kinds=["add"], tests=4) if "add_5" in r["prompt"])
    assert add["prompt"].startswith(
        "Write a Python function `add_5(x)` that returns x plus 5. For example, `add_5("
    )
    assert add["answer"].count("assert add_5(") == 4
    rule = RuleReward.from_config("task", task=task)
    right = "```python\ndef add_5(x):\n    return x + 5\n```"
    wrong = "def add_5(x):\n    return x + 6\n"
    assert isinstance(rule, CodeTestsReward)
    assert rule.score([sample(right, add["answer"]), sample(wrong, add["answer"])]) == ([1.0, 0.0], 0)
    rule.shutdown()
    with pytest.raises(ValueError, match="code_functions: kinds=\\['sort'\\]; known kinds: add, times"):
        task.generate(2, 0, kinds=["sort"])
