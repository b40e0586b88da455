"""Training the user's own agent through an OpenAI-compatible endpoint (rollout/agent_runner.py).

Fast: the call -> token assembly (extending chains, masks, logprobs, new chains) with a tiny tokenizer,
and the HTTP endpoint + runner with a scripted engine, the real `openai` client, and agents that
raise, hang, return junk or exceed max_calls. Slow: one run through the real loop (Ray, a tiny CPU
vLLM engine, DeepSpeed), where an agent makes two chat calls per episode over HTTP.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from rlhf.rollout.agent_runner import AgentRunner, CallAssembler
from rlhf.rollout.chat_tokens import ChatTokens
from rlhf.rollout.episodes import Completion
from rlhf.rollout.openai_server import ChatRequest, RequestError, normalize_message

from rlhf.config.schema import AgentConfig
from rlhf.loop.batch import make_train_batch
from rlhf.testing import build_tokenizer
from rlhf.types import Prompt

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
import openai_agents  # noqa: E402 - the agents live beside the tests

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Compute 12 * 7."}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(add_bos=True)


def policy_reply(tokenizer, text: str, logprob: float = -0.5) -> Completion:
    """What an engine returns when the policy writes `text` and stops: its tokens + EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Completion(ids, text, [logprob] * len(ids), "stop")


def request(*messages, **kw) -> ChatRequest:
    return ChatRequest(messages=[normalize_message(m) for m in messages], **kw)


def test_a_call_that_extends_the_last_one_joins_its_sample_with_the_new_messages_masked(tokenizer):
    chat = ChatTokens(tokenizer)
    calls = CallAssembler(chat, context_len=1024, max_new_tokens=32)
    (first,) = calls.begin(request(SYSTEM, USER, max_tokens=8))
    assert first.input_ids == chat.prompt([SYSTEM, USER])[1] and first.max_tokens == 8
    reply1 = policy_reply(tokenizer, "Let us compute: 84", -0.25)
    calls.finish(first, reply1)
    # the client echoes its own message object back (None fields and all): still the same turn
    echoed = {"role": "assistant", "content": reply1.text, "refusal": None, "tool_calls": None, "audio": None}
    tool = {"role": "tool", "content": '{"result": 84}'}
    (second,) = calls.begin(request(SYSTEM, USER, echoed, tool, {"role": "user", "content": "Sure?"}))
    assert second.chain is first.chain and second.max_tokens == 32
    conversation = [SYSTEM, USER, {"role": "assistant", "content": reply1.text}, tool]
    conversation.append({"role": "user", "content": "Sure?"})
    full = chat.prompt(conversation)[1]
    assert second.input_ids == full  # the policy's own tokens + the template's delta = a fresh render
    reply2 = policy_reply(tokenizer, "Yes, 84", -0.75)
    calls.finish(second, reply2)
    chain = calls.chains[0]
    appended = len(second.appended_ids)
    assert chain.ids == reply1.token_ids + second.appended_ids + reply2.token_ids
    assert chain.mask == [1] * len(reply1.token_ids) + [0] * appended + [1] * len(reply2.token_ids)
    assert chain.logprobs == [-0.25] * len(reply1.token_ids) + [0.0] * appended + [-0.75] * len(
        reply2.token_ids
    )
    assert chain.prompt_ids + chain.ids == full + reply2.token_ids and chain.calls == 2
    # another conversation, a rewritten history, or a parallel call from a busy state: new chains
    calls.begin(request({"role": "user", "content": "Other task."}))
    calls.begin(
        request(SYSTEM, USER, {"role": "assistant", "content": "84"}, {"role": "user", "content": "Ok"})
    )
    assert len(calls.chains) == 3
    now = request(SYSTEM, USER, echoed, tool, {"role": "user", "content": "Sure?"})
    now.messages.append({"role": "assistant", "content": reply2.text})
    now.messages.append({"role": "user", "content": "Again?"})
    (a,), (b,) = calls.begin(now), calls.begin(now)
    assert a.chain is chain and b.chain is not chain
    # a conversation past the context is refused, and nothing changes
    small = CallAssembler(chat, context_len=len(full) + 1, max_new_tokens=32)
    with pytest.raises(RequestError, match="context length exceeded") as refused:
        small.begin(request(*conversation))
    assert refused.value.status == 400 and small.chains == []


def scripted_engine(tokenizer, batches: list[int]):
    """generate(calls): every reply is "42" + EOS (cut at the budget), logprob -1 per token."""

    def generate(calls):
        batches.append(len(calls))
        out = []
        for _ids, budget, _stop in calls:
            ids = (tokenizer("42", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:budget]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            out.append(Completion(ids, text, [-1.0] * len(ids), "stop" if budget > 2 else "length"))
        return out

    return generate


def http(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def scripted_agents(prompt: Prompt, base_url: str):
    """By prompt: 0 two calls, 1 raises, 2 hangs, 3 returns junk, 4 goes past max_calls, 5 protocol checks."""
    if prompt.index == 0:
        return openai_agents.two_calls(prompt, base_url, reward=2.0)
    if prompt.index == 1:
        raise ValueError("agent bug")
    if prompt.index == 2:
        import time

        time.sleep(30)
    if prompt.index == 3:
        return "yes"
    if prompt.index == 4:
        for _ in range(3):
            openai_agents.two_calls(prompt, base_url)
    root = base_url.rsplit("/e/", 1)[0]
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    checks = {
        "models": http(f"{base_url}/models")[1]["data"][0]["id"],
        "tool_choice": http(f"{base_url}/chat/completions", {**chat, "tool_choice": "required"}),
        "n": http(f"{base_url}/chat/completions", {**chat, "n": 0}),
        "no_episode": http(f"{root}/v1/chat/completions", chat)[0],
        "unknown_episode": http(f"{root}/e/nope/v1/chat/completions", chat)[0],
        "bad_route": http(f"{base_url}/completions", chat)[0],
    }
    return 0.5, checks


def test_endpoint_records_each_episode_and_reports_a_failing_agent_per_sample(tokenizer):
    cfg = AgentConfig(function="unused:unused", timeout_s=2.0, max_calls=3)
    runner = AgentRunner(cfg, tokenizer, context_len=256, model_name="tiny", function=scripted_agents)
    prompts = [
        Prompt(index=i, text=f"q{i}", token_ids=[1, 2], label=None, metadata={"raw_prompt": f"Question {i}?"})
        for i in range(6)
    ]
    batches: list[int] = []
    samples = runner.run(
        prompts, [10 + i for i in range(6)], 1, scripted_engine(tokenizer, batches), 16, True, 3
    )
    by_index = {}
    for s in samples:
        by_index.setdefault(s.prompt.index, []).append(s)
    assert [s.group for s in samples] == sorted(s.group for s in samples) and len(by_index) == 6
    # two calls over HTTP -> one sample; its policy tokens and logprobs are what the agent was sent
    (good,) = by_index[0]
    seen = good.episode["info"]["seen"]
    assert good.episode["error"] is None and good.episode["reward"] == 2.0 and good.episode["calls"] == 2
    assert good.prompt.token_ids == seen[0]["prompt_ids"] and good.policy_version == 3
    assert (
        seen[1]["prompt_ids"]
        == good.prompt.token_ids
        + good.response_ids[: len(seen[1]["prompt_ids"]) - len(good.prompt.token_ids)]
    )
    policy = [t for t, m in zip(good.response_ids, good.response_mask) if m]
    assert policy == seen[0]["ids"] + seen[1]["ids"]
    assert [lp for lp, m in zip(good.logprobs, good.response_mask) if m] == seen[0]["logprobs"] + seen[1][
        "logprobs"
    ]
    assert all(lp == 0.0 for lp, m in zip(good.logprobs, good.response_mask) if not m)
    masked = tokenizer.decode([t for t, m in zip(good.response_ids, good.response_mask) if not m])
    assert "Check your answer." in masked and "<|im_start|>assistant" in masked
    # failures end only their own episode, each reported on its sample
    (raised,) = by_index[1]
    assert raised.episode["error"] == "ValueError: agent bug" and raised.finish_reason == "agent_error"
    assert raised.response_ids == [] and raised.episode["reward"] == 0.0
    assert "timeout_s=2s" in by_index[2][0].episode["error"]
    assert "expected a number or (number, info dict)" in by_index[3][0].episode["error"]
    over = by_index[4]
    assert "RateLimitError" in over[0].episode["error"] and over[0].episode["calls"] == 3
    assert len(over) == 2  # calls 1-2 were one conversation, call 3 started another
    checks = by_index[5][0].episode["info"]
    tool_choice_error = checks["tool_choice"][1]["error"]
    n_error = {"message": "'n' must be a positive integer, got 0", "type": "invalid_request_error"}
    n_error |= {"param": "n", "code": "invalid_request_error"}
    assert (
        tool_choice_error["param"] == "tool_choice" and tool_choice_error["type"] == "invalid_request_error"
    )
    assert checks == {
        "models": "tiny",
        "tool_choice": (400, {"error": tool_choice_error}),
        "n": (400, {"error": n_error}),
        "no_episode": 404,
        "unknown_episode": 404,
        "bad_route": 404,
    }
    batch = make_train_batch(samples, pad_token_id=0)
    p = len(good.prompt.token_ids)
    assert batch.loss_mask[0, p : p + len(good.response_ids)].tolist() == good.response_mask
    assert batch.rollout_logprobs is not None and batch.loss_mask.sum() > 0
    assert sum(batches) == sum(s.episode["calls"] for s in samples if s.episode["chain"] == 0)


def test_the_documented_example_agent_runs_against_the_endpoint(tokenizer, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples/openai_agent"))
    from agent import solve_then_check

    runner = AgentRunner(AgentConfig(), tokenizer, 256, "tiny", function=solve_then_check)
    prompts = [
        Prompt(index=i, text="", token_ids=[1], label=label, metadata={"raw_prompt": "Compute 40 + 2."})
        for i, label in enumerate(["42", "41"])
    ]
    samples = runner.run(prompts, [0, 1], 2, scripted_engine(tokenizer, []), 16)
    assert [s.episode["reward"] for s in samples] == [1.0, 1.0, 0.0, 0.0]
    assert all(s.episode["calls"] == 2 and s.episode["chains"] == 1 for s in samples)
    assert "Check your work." in samples[0].response_text


@pytest.mark.parametrize(
    "override, key",
    [
        ("rollout.agent.function=agent:nope", "rollout.agent.function: module 'agent' has no attribute"),
        ("rollout.agent.args={tries: 3}", "rollout.agent.args: solve_then_check(prompt, base_url, **args)"),
        ("rollout.agent.max_calls=0", "rollout.agent.max_calls: must be >= 1"),
        ("rollout.environment.name=guess_number", "rollout.agent.function: set either"),
        ("reward.sources=[{kind: rule, name: task}]", "reward.sources: the agent's rewards would be ignored"),
    ],
)
def test_bad_agent_config_is_one_line_naming_the_key(override, key, monkeypatch):
    from rlhf.config.loader import ConfigError, load_config

    monkeypatch.syspath_prepend(str(REPO / "examples/openai_agent"))
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "examples/openai_agent/config.yaml", [override])
    assert key in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_agent_over_http_trains_through_the_real_loop(tiny_model_dir, tmp_path, monkeypatch):
    from rlhf.config.loader import load_config
    from rlhf.loop.driver import Trainer

    # the engine actor imports the agent: its module must be on the PYTHONPATH Ray starts with
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    overrides = {
        "model.path": tiny_model_dir,
        "rollout.agent.function": "openai_agents:two_calls_or_misbehave",
        "rollout.agent.args": "{max_tokens: 5}",
        "rollout.agent.timeout_s": "8",
        "reward.on_error": "zero",
        "data.num_eval": "0",
        "evaluation.sets": "[]",
        "rollout.prompts_per_step": "2",
        "rollout.sampling.n": "2",
        "rollout.sampling.max_new_tokens": "6",
        "rollout.max_model_len": "256",
        "trainer.micro_batch_tokens": "512",
        "logging.wandb_mode": "disabled",
        "logging.output_dir": str(tmp_path),
        "logging.plot": "false",
        "steps": "1",
    }
    config = REPO / "examples/openai_agent/config.yaml"
    cfg = load_config(config, [f"{k}={v}" for k, v in overrides.items()])
    trainer = Trainer(cfg)
    try:
        trainer.roles = trainer.start_roles()
        samples = trainer.roles.rollout.generate(
            trainer.data.next_batch(2), cfg.rollout.sampling, logprobs=True
        )
        errors = sorted(s.episode["error"] or "" for s in samples)
        assert (
            errors[0] == errors[1] == ""
            and "the agent's own bug" in errors[2]
            and "timeout_s=8s" in errors[3]
        )
        for s in samples:
            if s.episode["error"]:
                assert s.finish_reason == "agent_error"
                continue
            seen = s.episode["info"]["seen"]
            assert (
                s.episode["calls"] == 2
                and s.episode["chains"] == 1
                and s.prompt.token_ids == seen[0]["prompt_ids"]
            )
            mask = torch.tensor(s.response_mask, dtype=torch.bool)
            ids, logprobs = torch.tensor(s.response_ids), torch.tensor(s.logprobs)
            assert ids[mask].tolist() == seen[0]["ids"] + seen[1]["ids"]
            assert logprobs[mask].tolist() == pytest.approx(seen[0]["logprobs"] + seen[1]["logprobs"])
            assert (logprobs[mask] < 0).all() and (logprobs[~mask] == 0).all()
            assert (s.prompt.token_ids + s.response_ids)[: len(seen[1]["prompt_ids"])] == seen[1][
                "prompt_ids"
            ]
            assert "Check your answer." in trainer.tokenizer.decode(ids[~mask].tolist())
        metrics = trainer.step_once()  # episodes 4..7 of the engine process: all well-behaved
        assert metrics["episode/env_errors"] == 0 and metrics["train/grad_norm"] >= 0
        assert metrics["sync/audit_logprob_diff"] < 1e-3  # the policy's tokens, after the sync
    finally:
        trainer.shutdown()
