"""The endpoint's OpenAI features through the real `openai` client: `stream=True` and `n > 1` against
one real tiny vLLM engine (in-process, no Ray), parsed `tool_calls` and their follow-up with a
scripted engine (a random tiny model never writes a tool call), and OpenAI-style 400s."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from openai import BadRequestError, OpenAI
from rlhf.rollout.agent_runner import AgentRunner
from rlhf.rollout.episodes import Completion

from rlhf.config.schema import AgentConfig, RunConfig
from rlhf.testing import build_tokenizer
from rlhf.types import Prompt

sys.path.insert(0, str(Path(__file__).resolve().parent))
QUESTION = [{"role": "user", "content": "Compute 12 * 7."}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Exact arithmetic",
            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """One tiny CPU vLLM engine for the module; each test gives it its own agent function."""
    from rlhf.rollout.engine import RolloutEngine

    cfg = RunConfig().rollout
    cfg.max_model_len = 256
    cfg.gpu_memory_utilization = 0.01
    cfg.sampling.max_new_tokens = 8
    from transformers import AutoTokenizer

    engine = RolloutEngine(tiny_model_dir, cfg, "cpu")
    engine.test_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    yield engine
    engine.shutdown()


def run_agent(engine, function, n_episodes: int = 1):
    """Run `function` as the agent of one prompt on the real engine; (samples, the function's info)."""
    runner = AgentRunner(AgentConfig(timeout_s=60), engine.test_tokenizer, 256, "tiny", function)
    engine._agent_runner = runner
    prompt = Prompt(index=0, text="", token_ids=[1], label=None, metadata={"raw_prompt": "Compute 12 * 7."})
    samples = engine.generate_agent_episodes([prompt], n=n_episodes, logprobs=True)
    assert all(s.episode["error"] is None for s in samples), samples[0].episode["error"]
    return samples, samples[0].episode["info"]


def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def policy_tokens(sample) -> list[int]:
    return [t for t, m in zip(sample.response_ids, sample.response_mask) if m]


def test_stream_true_yields_chunks_that_join_to_the_recorded_call(engine):
    def agent(prompt, base_url):
        stream = client(base_url).chat.completions.create(
            model="tiny",
            messages=QUESTION,
            stream=True,
            logprobs=True,
            stream_options={"include_usage": True},
            extra_body={"return_token_ids": True},
        )
        chunks = list(stream)
        choice_chunks = [c for c in chunks if c.choices]
        return 1.0, {
            "content": "".join(c.choices[0].delta.content or "" for c in choice_chunks),
            "logprobs": [
                t.logprob
                for c in choice_chunks
                if c.choices[0].logprobs
                for t in c.choices[0].logprobs.content
            ],
            "prompt_ids": choice_chunks[0].model_extra["prompt_token_ids"],
            "ids": choice_chunks[-1].choices[0].model_extra["token_ids"],
            "finish": choice_chunks[-1].choices[0].finish_reason,
            "usage": chunks[-1].usage.completion_tokens,
            "objects": {c.object for c in chunks},
        }

    (sample,), seen = run_agent(engine, agent)
    assert seen["objects"] == {"chat.completion.chunk"} and seen["finish"] in ("stop", "length")
    assert seen["content"] == sample.response_text and seen["prompt_ids"] == sample.prompt.token_ids
    assert seen["ids"] == sample.response_ids and seen["usage"] == len(sample.response_ids)
    assert seen["logprobs"] == sample.logprobs and all(lp < 0 for lp in seen["logprobs"])


def test_n_choices_are_one_sample_each_and_the_chosen_one_continues(engine):
    def agent(prompt, base_url):
        openai = client(base_url)
        first = openai.chat.completions.create(
            model="tiny", messages=QUESTION, n=3, max_tokens=4, extra_body={"return_token_ids": True}
        )
        chosen = first.choices[1]
        messages = [*QUESTION, chosen.message.model_dump(), {"role": "user", "content": "Sure?"}]
        second = openai.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
        return 1.0, {
            "indexes": [c.index for c in first.choices],
            "ids": [c.model_extra["token_ids"] for c in first.choices],
            "second": second.choices[0].message.content,
        }

    samples, seen = run_agent(engine, agent)
    assert seen["indexes"] == [0, 1, 2] and len(samples) == 3
    assert all(s.episode["calls"] == 4 and s.episode["chains"] == 3 for s in samples)
    assert all(
        s.prompt.token_ids == samples[0].prompt.token_ids and s.episode["reward"] == 1.0 for s in samples
    )
    # each choice's tokens train once; choice 1's sample goes on with the follow-up, masked in between
    by_chain = {s.episode["chain"]: s for s in samples}
    assert [s.episode["turns"] for s in by_chain.values()] == [1, 2, 1]
    assert by_chain[0].response_ids == seen["ids"][0] and by_chain[2].response_ids == seen["ids"][2]
    continued = by_chain[1]
    assert continued.response_ids[: len(seen["ids"][1])] == seen["ids"][1]
    assert 0 in continued.response_mask and continued.response_text.endswith(seen["second"])


def scripted(tokenizer, replies: list[str], prompts: list[list[int]]):
    """generate(calls): the next scripted reply + EOS for each call, logprob -1 per token."""

    def generate(calls):
        out = []
        for ids, _budget, _stop in calls:
            prompts.append(ids)
            text = replies[min(len(prompts) - 1, len(replies) - 1)]
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            out.append(Completion(tokens, text, [-1.0] * len(tokens), "stop"))
        return out

    return generate


def test_tool_calls_are_parsed_and_their_results_continue_the_recorded_conversation():
    tokenizer = build_tokenizer(add_bos=True)
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 7"}}</tool_call>'
    replies = [f"Let me compute. {call}", call, "It is 84."]

    def agent(prompt, base_url):
        openai = client(base_url)
        messages = list(QUESTION)
        first = openai.chat.completions.create(model="tiny", messages=messages, tools=TOOLS)
        message = first.choices[0].message
        messages.append(message.model_dump())
        for tool_call in message.tool_calls:
            assert json.loads(tool_call.function.arguments) == {"expression": "12 * 7"}
            messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": str(12 * 7)})
        # streamed: a call arrives as a `tool_calls` delta, the message is rebuilt from the chunks the
        # way streaming agents do, and the conversation still continues
        chunks = [
            c.choices[0]
            for c in openai.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, stream=True)
        ]
        (streamed,) = [d for c in chunks for d in c.delta.tool_calls or []]
        # re-serialized arguments (other spacing) still match the recorded call
        arguments = json.dumps(json.loads(streamed.function.arguments), separators=(",", ":"))
        function = {"name": streamed.function.name, "arguments": arguments}
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": streamed.id, "type": "function", "function": function}],
            }
        )
        messages.append({"role": "tool", "tool_call_id": streamed.id, "content": "84"})
        stream = openai.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        finish = [chunks[-1].finish_reason, streamed.function.arguments]
        return 1.0, {"first": first.choices[0], "text": text, "streamed": finish}

    prompts: list[list[int]] = []
    runner = AgentRunner(AgentConfig(timeout_s=30), tokenizer, 256, "tiny", agent)
    prompt = Prompt(index=0, text="", token_ids=[1], label=None, metadata={})
    (sample,) = runner.run([prompt], [0], 1, scripted(tokenizer, replies, prompts), 32, True)
    first, text = sample.episode["info"]["first"], sample.episode["info"]["text"]
    assert first.finish_reason == "tool_calls" and first.message.content == "Let me compute."
    (tool_call,) = first.message.tool_calls
    assert tool_call.type == "function" and tool_call.function.name == "calculator"
    assert json.loads(tool_call.function.arguments) == {"expression": "12 * 7"}
    # one conversation: the second prompt is the first one + the policy's tokens as generated (the
    # call text included, never re-tokenized from the parsed message) + the tool result, masked
    assert sample.episode["info"]["streamed"] == ["tool_calls", tool_call.function.arguments]
    assert sample.episode["calls"] == 3 and sample.episode["chains"] == 1 and text == "It is 84."
    first_reply = tokenizer(replies[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert prompts[1][: len(prompts[0]) + len(first_reply)] == prompts[0] + first_reply
    assert sample.prompt.token_ids + sample.response_ids[: len(prompts[1]) - len(prompts[0])] == prompts[1]
    masked = tokenizer.decode([t for t, m in zip(sample.response_ids, sample.response_mask) if not m])
    assert "<|im_start|>tool\n84<|im_end|>" in masked and call in sample.response_text


def test_bad_requests_get_openai_errors_naming_the_field():
    tokenizer = build_tokenizer(add_bos=True)
    bad = {
        "n": {"n": 99},
        "tool_choice": {"tools": TOOLS, "tool_choice": "required"},
        "response_format": {"response_format": {"type": "json_object"}},
        "logit_bias": {"logit_bias": {"5": 10}},
        "messages[1].tool_calls[0]": {
            "messages": [*QUESTION, {"role": "assistant", "tool_calls": [{"function": {}}]}]
        },
    }

    def agent(prompt, base_url):
        errors = {}
        for param, extra in bad.items():
            try:
                client(base_url).chat.completions.create(**{"model": "tiny", "messages": QUESTION, **extra})
            except BadRequestError as exc:
                errors[param] = (exc.status_code, exc.body["type"], exc.body["param"])
        return 0.0, errors

    runner = AgentRunner(AgentConfig(timeout_s=30), tokenizer, 256, "tiny", agent)
    (sample,) = runner.run([Prompt(0, "", [1], None, {})], [0], 1, scripted(tokenizer, ["x"], []), 8)
    assert sample.episode["info"] == {p: (400, "invalid_request_error", p) for p in bad}
    assert sample.episode["calls"] == 0  # nothing refused reached the engine


def test_stream_pieces_keep_characters_split_over_tokens_whole():
    from rlhf.rollout.openai_stream import content_pieces

    tokenizer = build_tokenizer()
    text = "héllo 😀 wörld"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    pieces = content_pieces(lambda t: tokenizer.decode(t, skip_special_tokens=True), ids, text)
    assert len(pieces) == len(ids) and "".join(pieces) == text and "😀" in pieces
    cut = content_pieces(
        lambda t: tokenizer.decode(t, skip_special_tokens=True), ids, "héllo"
    )  # a stop string
    assert "".join(cut) == "héllo"
