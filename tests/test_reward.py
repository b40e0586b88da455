"""Rule and HTTP reward sources and their weighted combination (no Ray needed)."""

from __future__ import annotations

import json
import math
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rlhf.reward import RewardError, RewardPipeline, load_reward_function
from rlhf.reward.http import HttpReward, HttpRewardError

from rlhf.config.schema import RewardConfig, RewardSourceConfig
from rlhf.tasks import get_task
from rlhf.types import Prompt, Sample

USER_MODULE = "user_rewards_for_tests"


def make_sample(
    response: str, label=None, group: int = 0, index: int = 0, prompt: str = "What is 6*7?"
) -> Sample:
    return Sample(
        group=group,
        prompt=Prompt(index=index, text=prompt, token_ids=[1, 2, 3], label=label),
        response_ids=[4, 5],
        response_text=response,
        logprobs=[-0.1, -0.2],
        finish_reason="stop",
    )


def rule(name: str, weight: float = 1.0, **args) -> RewardSourceConfig:
    return RewardSourceConfig(kind="rule", name=name, weight=weight, args=args)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A real module on sys.path with reward functions in the documented signature."""
    (tmp_path / f"{USER_MODULE}.py").write_text(
        textwrap.dedent(
            """
            def length(prompt, response, label, scale=1.0):
                return scale * len(response)

            def exact(prompt, response, label):
                return float(response.strip() == str(label))

            def boom(prompt, response, label):
                raise ValueError("cannot parse the answer")

            def nan(prompt, response, label):
                return float("nan")

            def wordy(prompt, response, label):
                return "high"

            def sleepy(prompt, response, label):
                import time
                time.sleep(1.0)
                return 1.0

            def hangs(prompt, response, label):
                import time
                time.sleep(3600)

            def nothing(prompt, response, label):
                return None

            def infinite(prompt, response, label):
                return float("inf")

            def several(prompt, response, label):
                return [1.0, 2.0]

            def picky(prompt, response, label):
                if response == "bad":
                    raise ValueError("unparseable")
                return 1.0

            NOT_A_FUNCTION = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, USER_MODULE, raising=False)
    return USER_MODULE


# ----------------------------------------------------------------------------- rule rewards


def test_task_rule_with_real_task():
    task = get_task("arithmetic")
    examples = task.generate(4, seed=0)
    samples = [
        make_sample(f"The answer is {ex['answer']}", label=ex["answer"], index=i)
        for i, ex in enumerate(examples)
    ]
    samples.append(
        make_sample(f"The answer is {examples[0]['answer'] + 1}", label=examples[0]["answer"], index=9)
    )
    pipe = RewardPipeline(RewardConfig(sources=[rule("task")]), task=task)
    assert pipe.score(samples) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert samples[0].reward_parts == {"task": 1.0}
    assert pipe.last_stats() == {"reward/task_mean": 4 / 5, "reward/errors": 0.0}


def test_task_rule_by_name_and_task_errors():
    countdown = {"numbers": [3, 5, 7], "target": 22}
    pipe = RewardPipeline(RewardConfig(sources=[rule("task", task="countdown")]), task=get_task("arithmetic"))
    samples = [
        make_sample("<answer>3 * 5 + 7</answer>", label=countdown),
        make_sample("<answer>3 * 7</answer>", label=countdown),
    ]
    assert pipe.score(samples) == [1.0, 0.0]
    # A label the checker rejects is a per-sample error naming the sample.
    pipe = RewardPipeline(RewardConfig(sources=[rule("task")]), task=get_task("arithmetic"))
    with pytest.raises(
        RewardError,
        match=r"reward.sources\[0\] \(task\) failed on sample \(group 2, prompt 4.*is not a number",
    ):
        pipe.score([make_sample("12", label="twelve", group=2, index=4)])
    with pytest.raises(RewardError, match=r"reward.sources\[0\].*needs a task"):
        RewardPipeline(RewardConfig(sources=[rule("task")]), task=None)
    with pytest.raises(
        RewardError, match=r"reward.sources\[0\]: rule 'task': args.task: unknown task 'algebra'"
    ):
        RewardPipeline(RewardConfig(sources=[rule("task", task="algebra")]))


def test_format_rule_with_real_checker():
    # An explicit pattern.
    pipe = RewardPipeline(RewardConfig(sources=[rule("format", pattern=r"<answer>\d+</answer>\s*$")]))
    assert pipe.score([make_sample("so <answer>42</answer>"), make_sample("<answer>x</answer>")]) == [
        1.0,
        0.0,
    ]
    # Default: the data task's format (arithmetic: a number somewhere), else an <answer> tag.
    pipe = RewardPipeline(RewardConfig(sources=[rule("format")]), task=get_task("arithmetic"))
    assert pipe.score([make_sample("It is 42"), make_sample("no idea")]) == [1.0, 0.0]
    pipe = RewardPipeline(RewardConfig(sources=[rule("format")]))
    assert pipe.score([make_sample("<answer>\n1+2</answer>"), make_sample("1+2")]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="not a valid regex"):
        RewardPipeline(RewardConfig(sources=[rule("format", pattern="(unclosed")]))


def test_user_function_by_dotted_path(user_module):
    pipe = RewardPipeline(RewardConfig(sources=[rule(f"{user_module}:length", scale=0.5)]))
    samples = [make_sample("abcd"), make_sample("ab")]
    assert pipe.score(samples) == [2.0, 1.0]
    assert samples[0].reward_parts == {f"{user_module}:length": 2.0}
    assert pipe.last_stats()[f"reward/{user_module}:length_mean"] == 1.5


def test_load_reward_function_errors(user_module, tmp_path):
    with pytest.raises(RewardError, match="cannot import module 'no_such_pkg.rewards'"):
        load_reward_function("no_such_pkg.rewards:score")
    with pytest.raises(RewardError, match=f"module '{user_module}' has no attribute 'missing'"):
        load_reward_function(f"{user_module}:missing")
    with pytest.raises(RewardError, match="'NOT_A_FUNCTION' is a int, not a function"):
        load_reward_function(f"{user_module}:NOT_A_FUNCTION")
    (tmp_path / "broken_rewards_for_tests.py").write_text("1 / 0\n")  # tmp_path is on sys.path
    with pytest.raises(RewardError, match="importing 'broken_rewards_for_tests' failed: ZeroDivisionError"):
        load_reward_function("broken_rewards_for_tests:score")
    with pytest.raises(RewardError, match="expected 'pkg.module:function'"):
        load_reward_function(f"{user_module}.length")
    with pytest.raises(RewardError, match=r"reward.sources\[1\]: unknown rule 'lenght'"):
        RewardPipeline(RewardConfig(sources=[rule(f"{user_module}:length"), rule("lenght")]))


def test_raising_function_names_source_and_sample(user_module):
    cfg = RewardConfig(sources=[rule(f"{user_module}:length"), rule(f"{user_module}:boom")])
    pipe = RewardPipeline(cfg)
    response = "x" * 100
    with pytest.raises(RewardError) as err:
        pipe.score([make_sample(response, group=3, index=17)])
    message = str(err.value)
    assert f"reward.sources[1] ({user_module}:boom)" in message
    assert "group 3, prompt 17" in message
    assert repr("x" * 80) in message and "x" * 81 not in message
    assert message.endswith("ValueError: cannot parse the answer")
    assert isinstance(err.value.__cause__, ValueError)


@pytest.mark.parametrize(
    ("fn", "what"),
    [
        ("nan", "returned nan"),
        ("infinite", "returned inf"),
        ("wordy", "returned 'high' of type str"),
        ("nothing", "returned None"),
        ("several", "returned \\[1.0, 2.0\\] of type list"),
    ],
)
def test_non_finite_or_non_number_is_an_error(user_module, fn, what):
    pipe = RewardPipeline(RewardConfig(sources=[rule(f"{user_module}:{fn}")]))
    with pytest.raises(
        RewardError, match=rf"reward.sources\[0\] \({user_module}:{fn}\) failed on sample .*{what}"
    ):
        pipe.score([make_sample("42")])


def test_a_hanging_user_function_times_out_per_sample(user_module):
    cfg = RewardConfig(sources=[rule(f"{user_module}:hangs")], timeout_s=0.2)
    with pytest.raises(RewardError, match=r"TimeoutError: no result within reward.timeout_s=0.2s"):
        RewardPipeline(cfg).score([make_sample("42")])
    cfg = RewardConfig(sources=[rule(f"{user_module}:hangs")], timeout_s=0.2, on_error="zero")
    pipe = RewardPipeline(cfg)
    assert pipe.score([make_sample("1"), make_sample("2")]) == [0.0, 0.0]
    assert pipe.last_stats()["reward/errors"] == 2.0


def test_on_error_drop_leaves_out_the_groups_of_unscored_samples(user_module):
    from rlhf.reward.pipeline import drop_unscored_groups

    pipe = RewardPipeline(RewardConfig(sources=[rule(f"{user_module}:picky")], on_error="drop"))
    samples = [make_sample(r, group=g) for r, g in [("ok", 0), ("bad", 0), ("ok", 1), ("ok", 1)]]
    rewards = pipe.score(samples)
    assert math.isnan(rewards[1]) and rewards[2:] == [1.0, 1.0]
    assert pipe.last_stats()["reward/errors"] == 1.0
    kept, dropped = drop_unscored_groups(samples)
    assert dropped == 1 and [s.group for s in kept] == [1, 1]  # the whole of group 0 is left out
    with pytest.raises(RewardError, match="every one of the 1 group"):
        drop_unscored_groups([s for s in samples if s.group == 0])


def test_on_error_zero_scores_zero_and_counts(user_module):
    cfg = RewardConfig(
        sources=[rule(f"{user_module}:length", weight=1.0), rule(f"{user_module}:nan", weight=1.0)],
        on_error="zero",
    )
    pipe = RewardPipeline(cfg)
    samples = [make_sample("abc"), make_sample("de")]
    assert pipe.score(samples) == [3.0, 2.0]
    assert samples[1].reward_parts == {f"{user_module}:length": 2.0, f"{user_module}:nan": 0.0}
    assert pipe.last_stats()["reward/errors"] == 2.0


def test_weighted_combination_by_hand(user_module):
    cfg = RewardConfig(
        sources=[rule(f"{user_module}:length", weight=0.5), rule(f"{user_module}:exact", weight=2.0)]
    )
    pipe = RewardPipeline(cfg)
    samples = [make_sample("42", label=42), make_sample("7", label=42), make_sample("", label=42)]
    # 0.5 * len + 2 * exact:  0.5*2 + 2*1 = 3.0;  0.5*1 + 0 = 0.5;  0 + 0 = 0
    assert pipe.score(samples) == [3.0, 0.5, 0.0]
    assert [s.reward for s in samples] == [3.0, 0.5, 0.0]
    assert samples[0].reward_parts == {f"{user_module}:length": 2.0, f"{user_module}:exact": 1.0}
    assert pipe.last_stats() == {
        f"reward/{user_module}:length_mean": 1.0,  # (2 + 1 + 0) / 3
        f"reward/{user_module}:exact_mean": 1 / 3,
        "reward/errors": 0.0,
    }


def test_duplicate_names_and_bad_config(user_module):
    with pytest.raises(RewardError, match=r"reward.sources\[1\]: name .* already used"):
        RewardPipeline(RewardConfig(sources=[rule(f"{user_module}:exact"), rule(f"{user_module}:exact")]))
    with pytest.raises(RewardError, match=r"reward.sources\[0\]: unknown kind 'grpc'"):
        RewardPipeline(RewardConfig(sources=[RewardSourceConfig(kind="grpc", name="x")]))
    with pytest.raises(RewardError, match=r"reward.sources\[0\] \(http\): kind 'http' needs `url`"):
        RewardPipeline(RewardConfig(sources=[RewardSourceConfig(kind="http")]))
    with pytest.raises(RewardError, match=r"reward.sources\[0\] \(rm\): kind 'model' needs `path`"):
        RewardPipeline(RewardConfig(sources=[RewardSourceConfig(kind="model")]))
    with pytest.raises(RewardError, match="on_error must be 'raise', 'zero' or 'drop'"):
        RewardPipeline(RewardConfig(sources=[rule(f"{user_module}:exact")], on_error="skip"))


# ----------------------------------------------------------------------------- HTTP


class _RewardHandler(BaseHTTPRequestHandler):
    """A real reward service: reward = len(response) + 10 * (response == str(label))."""

    hits: dict[str, int] = {}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        rewards = [len(r) + 10.0 * (r == str(lab)) for r, lab in zip(body["responses"], body["labels"])]
        if self.path == "/error" or (self.path == "/flaky" and self.hits[self.path] == 1):
            return self._send(500, b"reward model exploded")
        if self.path == "/slow":
            time.sleep(1.0)
        if self.path == "/short":
            rewards = rewards[:-1]
        if self.path == "/nan":
            rewards[0] = float("nan")  # Python's json writes NaN, as a careless service would
        if self.path == "/text":
            return self._send(200, b"<html>not json</html>")
        if self.path == "/auth" and self.headers.get("Authorization") != "Bearer s3cret":
            return self._send(403, b"forbidden")
        self._send(200, json.dumps({"rewards": rewards}).encode())

    def _send(self, status: int, payload: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _RewardHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def http(url: str, weight: float = 1.0, **args) -> RewardSourceConfig:
    return RewardSourceConfig(kind="http", url=url, weight=weight, args={"backoff": 0.01, **args})


def test_http_source_scores_and_combines(server, user_module):
    cfg = RewardConfig(
        sources=[http(f"{server}/score", weight=0.5), rule(f"{user_module}:exact", weight=1.0)]
    )
    pipe = RewardPipeline(cfg)
    samples = [make_sample("42", label=42), make_sample("abc", label=42)]
    # http: 2 + 10 = 12, 3;  exact: 1, 0  ->  0.5*12 + 1 = 7.0;  0.5*3 + 0 = 1.5
    assert pipe.score(samples) == [7.0, 1.5]
    assert samples[0].reward_parts == {"http": 12.0, f"{user_module}:exact": 1.0}
    assert pipe.last_stats()["reward/http_mean"] == 7.5
    pipe.shutdown()


def test_http_batches_retries_and_headers(server):
    client = HttpReward(f"{server}/flaky", args={"backoff": 0.01})
    assert client.score(["p"], ["abc"], [None]) == [3.0]
    assert _RewardHandler.hits["/flaky"] == 2  # one 500, one retry
    client = HttpReward(
        f"{server}/auth", args={"headers": {"Authorization": "Bearer s3cret"}, "batch_size": 2}
    )
    assert client.score(["p"] * 5, ["a", "bb", "ccc", "d", "7"], [None, None, None, None, 7]) == [
        1,
        2,
        3,
        1,
        11,
    ]
    assert _RewardHandler.hits["/auth"] == 3  # 5 samples in requests of 2


def test_http_errors_name_the_url(server):
    with pytest.raises(
        HttpRewardError, match=rf"{server}/error: failed after 3 attempts; last error HTTP 500"
    ):
        HttpReward(f"{server}/error", args={"retries": 2, "backoff": 0.01}).score(["p"], ["r"], [1])
    assert _RewardHandler.hits["/error"] == 3
    with pytest.raises(HttpRewardError, match=rf"{server}/short: sent 2 responses but got 1 rewards"):
        HttpReward(f"{server}/short").score(["p", "p"], ["a", "b"], [1, 2])
    with pytest.raises(HttpRewardError, match=rf"{server}/text: response is not JSON"):
        HttpReward(f"{server}/text").score(["p"], ["a"], [1])
    with pytest.raises(HttpRewardError, match=rf"{server}/auth: HTTP 403"):
        HttpReward(f"{server}/auth").score(["p"], ["a"], [1])
    with pytest.raises(HttpRewardError, match="labels must be JSON-serialisable"):
        HttpReward(f"{server}/score").score(["p"], ["a"], [object()])
    with pytest.raises(HttpRewardError, match="connection|Connection"):
        HttpReward("http://127.0.0.1:9/none", args={"retries": 0}).score(["p"], ["a"], [1])


def test_http_failures_in_pipeline(server):
    samples = [make_sample("a", group=1, index=5), make_sample("b")]
    pipe = RewardPipeline(RewardConfig(sources=[http(f"{server}/short")]))
    with pytest.raises(
        RewardError, match=rf"reward.sources\[0\] \(http\) failed on all 2 samples: .*{server}/short"
    ):
        pipe.score(samples)
    pipe = RewardPipeline(RewardConfig(sources=[http(f"{server}/nan")]))
    with pytest.raises(
        RewardError, match=r"reward.sources\[0\] \(http\) failed on sample \(group 1, prompt 5.*nan"
    ):
        pipe.score(samples)
    pipe = RewardPipeline(RewardConfig(sources=[http(f"{server}/error", retries=1)], on_error="zero"))
    assert pipe.score(samples) == [0.0, 0.0]
    assert pipe.last_stats() == {"reward/http_mean": 0.0, "reward/errors": 2.0}
    pipe.shutdown()


def test_http_runs_while_rules_score(server, user_module):
    """The service is called before the inline rules run, so their latencies overlap."""
    pipe = RewardPipeline(RewardConfig(sources=[rule(f"{user_module}:sleepy"), http(f"{server}/slow")]))
    start = time.perf_counter()
    assert pipe.score([make_sample("abc")]) == [1.0 + 3.0]
    assert time.perf_counter() - start < 1.8  # >= 2 s if they ran one after the other
    pipe.shutdown()
