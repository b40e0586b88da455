"""Tools: call parsing and formats, the calculator, the python sandbox's limits, failing user tools, and
the tool-using environments (fast: no Ray, no engine)."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
from rlhf.rollout.chat_tokens import ChatTokens
from rlhf.rollout.environments.calculator import CalculatorEnv
from rlhf.rollout.episodes import EpisodeRunner
from rlhf.rollout.sandbox import network_namespace_available, run_python
from rlhf.rollout.tools import ToolBox, ToolCall, ToolError, calculator, detect_tool_call_format, load_tool

from rlhf.config.schema import EnvironmentConfig
from rlhf.environment import EnvError, check_environment_args
from rlhf.production.metrics import episode_metrics
from rlhf.testing import build_tokenizer
from rlhf.types import Prompt

# Qwen2.5's way of writing tool calls (trimmed), and Llama 3.1's bare JSON
QWEN_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}{% if m.content %}\n{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}\n<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_LIKE = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}"
    '{% for c in m.tool_calls or [] %}{"name": "{{ c.function.name }}", '
    '"parameters": {{ c.function.arguments | tojson }}}{% endfor %}<|eot_id|>{% endfor %}'
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# --- user tools, used by dotted path (tests.test_tools:...)
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def explode(x: str) -> str:
    raise RuntimeError("tool bug")


def sleepy() -> str:
    time.sleep(3)
    return "late"


def junk() -> object:
    return object()


def test_calculator_is_exact_and_refuses_code():
    assert calculator("123456789 * 987654321") == "121932631112635269"
    assert calculator("(2 + 3) * -4 - 10 / 4") == "-22.5"
    assert calculator("2**100 % 97") == str(2**100 % 97) and calculator("7 // 2") == "3"
    assert calculator("1 / 3") == repr(1 / 3) and calculator("0.1 + 0.2") == "0.3"
    for bad, words in [
        ("__import__('os').system('ls')", "unsupported syntax: Call"),
        ("x + 1", "unsupported syntax: Name"),
        ("9 ** 9 ** 9", "integer exponent of at most 1000"),
        ("1 / 0", "division by zero"),
    ]:
        with pytest.raises(ValueError, match=words):
            calculator(bad)


def test_tag_calls_are_parsed_and_bad_ones_explained():
    box = ToolBox([], None)
    text = (
        'Let me check. <tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call> '
        '<tool_call> {"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"} </tool_call>'
    )
    assert [(c.name, c.arguments) for c in box.parse(text)] == [
        ("calculator", {"expression": "2*3"}),
        ("add", {"a": 1, "b": 2}),
    ]
    assert box.parse("The answer is 6.") == []
    (bad,) = box.parse("<tool_call>{name: calculator}</tool_call>")
    assert bad.name is None and "not valid JSON" in bad.error
    (unclosed,) = box.parse('<tool_call>{"name": "calculator", "argum')
    assert "not closed" in unclosed.error
    (no_name,) = box.parse('<tool_call>["calculator"]</tool_call>')
    assert '"name" string' in no_name.error


def test_the_chat_templates_own_tool_call_format_is_detected(tokenizer):
    assert detect_tool_call_format(tokenizer) is None  # plain ChatML: no tool calls -> tags
    qwen = build_tokenizer()
    qwen.chat_template = QWEN_LIKE
    assert detect_tool_call_format(qwen) == ("<tool_call>", "</tool_call>")
    llama = build_tokenizer()
    llama.chat_template = LLAMA_LIKE
    assert detect_tool_call_format(llama) == ("", "")
    cfg = EnvironmentConfig(tools=["calculator"])
    box = ToolBox.from_config(cfg, llama)
    (call,) = box.parse('Sure. {"name": "calculator", "parameters": {"expression": "6*7"}} done')
    assert box.call(call) == "42"
    tags = ToolBox.from_config(EnvironmentConfig(tools=["calculator"], tool_call_format="tags"), llama)
    assert (tags.opening, tags.closing) == ("<tool_call>", "</tool_call>")


def test_tool_failures_become_error_outputs():
    box = ToolBox(
        [load_tool(f"{__name__}:{name}") for name in ("add", "explode", "sleepy", "junk")], timeout_s=0.3
    )
    assert "add(a: int, b: int): Add two integers." in box.describe()
    assert (
        "calculator(expression: str)"
        in ToolBox.from_config(EnvironmentConfig(tools=["calculator"])).describe()
    )
    assert box.call(ToolCall("add", {"a": 2, "b": 40})) == "42"
    assert box.call(ToolCall("explode", {"x": "y"})) == "error: RuntimeError: tool bug"
    start = time.monotonic()
    assert box.call(ToolCall("sleepy")) == "error: sleepy did not return within 0.3s"
    assert time.monotonic() - start < 1.0
    assert box.call(ToolCall("junk")).startswith("error: the tool returned a object")
    assert box.call(ToolCall("add", {"a": 1})).startswith("error: bad arguments for add")
    assert box.call(ToolCall("shell", {})).startswith("error: unknown tool 'shell'")
    assert box.call(ToolCall(None, error="the tool call is not valid JSON")).startswith(
        "error: the tool call"
    )
    with pytest.raises(ToolError, match="cannot import module 'nowhere_pkg'"):
        load_tool("nowhere_pkg:fn")


def test_sandbox_limits_time_memory_network_and_directory():
    out = run_python("import os\nprint(os.listdir('.'), os.getcwd())\nopen('f.txt', 'w').write('x')\n6 * 7")
    listing, cwd = out.stdout.splitlines()[0].split("] ")
    assert listing == "[" and out.stdout.splitlines()[1] == "42" and out.returncode == 0
    assert not os.path.exists(cwd)  # the working directory is removed afterwards
    assert run_python("import os; print(os.listdir('.'))").stdout == "[]\n"  # and the next one is fresh
    start = time.monotonic()
    slow = run_python("while True: pass", timeout_s=1)
    assert slow.timed_out and time.monotonic() - start < 3
    big = run_python("x = bytearray(1024 * 2**20)", memory_mb=256)
    assert big.returncode != 0 and "MemoryError" in big.stderr
    for namespace in (None, False):
        net = run_python(
            "import socket; socket.create_connection(('1.1.1.1', 80), timeout=2)", network_namespace=namespace
        )
        assert net.returncode != 0 and "sandbox: socket" in net.stderr
        proc = run_python("import subprocess; subprocess.run(['true'])", network_namespace=namespace)
        assert "sandbox: subprocess.Popen is not allowed" in proc.stderr
    assert run_python("import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))").returncode != 0
    assert "ctypes" in run_python("import ctypes", network_namespace=False).stderr
    assert run_python("print(1)").network_isolated == network_namespace_available()


def test_python_tool_reports_errors_and_timeouts():
    box = ToolBox.from_config(EnvironmentConfig(tools=["python"], tool_timeout_s=1.0))
    assert box.call(ToolCall("python", {"code": "print(sum(range(10)))"})) == "45\n"
    assert box.call(ToolCall("python", {"code": "1/0"})) == "error: ZeroDivisionError: division by zero"
    assert "longer than 1s" in box.call(ToolCall("python", {"code": "import time; time.sleep(5)"}))
    assert box.call(ToolCall("python", {"code": "x = 1"})) == "(no output)"


def test_calculator_environment_runs_tool_turns_and_rewards_the_answer(tokenizer):
    cfg = EnvironmentConfig(name="calculator", tools=["calculator"], max_turns=3, max_tokens=300)
    cfg.args = {"call_reward": 0.1}  # a turn whose tool call ran earns 0.1, the right answer 1
    box = ToolBox.from_config(cfg, tokenizer)
    runner = EpisodeRunner(cfg, CalculatorEnv, tokenizer, context_len=1024, toolbox=box)
    prompt = Prompt(
        0, "", [1], label=56088, metadata={"raw_prompt": "Compute 123 * 456. Answer with just the number."}
    )
    turns = [
        '<tool_call>{"name": "calculator", "arguments": {"expression": "123 * 456"}}</tool_call>',
        "56088",
    ]
    state = {"turn": 0}

    def policy(inputs, budgets):
        text = turns[state["turn"]]
        state["turn"] += 1
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return [SimpleNamespace(token_ids=ids, text=text, logprobs=None, finish_reason="stop")]

    (sample,) = runner.run([prompt], [0], 1, policy, max_new_tokens=64)
    assert sample.finish_reason == "stop" and sample.episode["turn_rewards"] == [0.1, 1.0]
    assert sample.episode["info"] == {"answered": True, "tool_calls": 1, "tool_errors": 0, "success": True}
    metrics = episode_metrics([sample])
    assert metrics["episode/tool_call_frac"] == 1.0 and metrics["episode/success_frac"] == 1.0
    assert "calculator(expression: str)" in sample.prompt.text and "<tool_call>" in sample.prompt.text
    tool_part = tokenizer.decode([t for t, m in zip(sample.response_ids, sample.response_mask) if not m])
    assert "<|im_start|>tool\n56088<|im_end|>" in tool_part  # the tool's output is context, masked
    chat = ChatTokens(tokenizer)
    env = CalculatorEnv(call_reward=0.1)
    env.tools = box
    assert sample.prompt.token_ids == chat.prompt(env.reset(prompt))[1]
    # `examples`: a worked demonstration between the system message and the question
    demo = [{"role": "user", "content": "Compute 2 * 3."}, {"role": "assistant", "content": "6"}]
    env = CalculatorEnv(examples=demo)
    env.tools = box
    messages = env.reset(prompt)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"] and messages[1:3] == demo
    assert env.step("56088").info["success"]  # a right answer is a success, shaping or not
    with pytest.raises(EnvError, match="args.examples"):
        check_environment_args(CalculatorEnv, {"examples": [{"role": "user"}]})
