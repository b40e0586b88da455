"""How often does the base policy call the calculator, per way of prompting it? (no training)

    python experiments/learning/tool_call_probe.py [--model smollm2-135m-instruct] [--n 16]

Samples `n` first turns of 8 held-out-style products (arithmetic difficulty 2, operators "*") per
prompt variant at T = 1 and greedily, and prints the share of turns with a well-formed calculator
call. Used to choose the demonstration in configs/calculator_tool.yaml (docs/agents.md).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

CALL = '<tool_call>{{"name": "calculator", "arguments": {{"expression": "{e}"}}}}</tool_call>'
Q = "Compute {e}. Answer with just the number."


def demo(pairs, tool_role=False):
    """Worked examples; the results as user turns in <tool_response> tags, or (tool_role) as the
    `tool` turns the calculator environment writes for SmolLM2 (configs/calculator_tool.yaml)."""
    out = []
    for e, r in pairs:
        result = (
            {"role": "tool", "content": str(r)}
            if tool_role
            else {"role": "user", "content": f"<tool_response>{r}</tool_response>"}
        )
        out += [
            {"role": "user", "content": Q.format(e=e)},
            {"role": "assistant", "content": CALL.format(e=e)},
            result,
            {"role": "assistant", "content": str(r)},
        ]
    return out


SHORT = "Use the calculator tool to compute, then answer with just the number."
ALWAYS = (
    "Always call the calculator tool first, exactly as in the examples; then answer with just the number."
)
ONE = [("123 * 45", 5535)]
THREE = [("123 * 45", 5535), ("8 * 702", 5616), ("66 * 91", 6006)]
VARIANTS = {
    "system_only": (SHORT, []),
    "one_example": (SHORT, demo(ONE)),
    "three_examples": (SHORT, demo(THREE)),
    "three_examples_always": (ALWAYS, demo(THREE)),
    "one_example_tool_role": (SHORT, demo(ONE, tool_role=True)),
    "two_examples_tool_role": (SHORT, demo(THREE[:2], tool_role=True)),
    "three_examples_tool_role": (SHORT, demo(THREE, tool_role=True)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    args = ap.parse_args()
    from rlhf.rollout.tools import ToolBox
    from vllm import LLM, SamplingParams

    from rlhf.config.schema import EnvironmentConfig
    from rlhf.data.models import resolve_model_path
    from rlhf.tasks import get_task

    path = resolve_model_path(args.model)
    llm = LLM(
        model=path,
        dtype="float32",
        max_model_len=2048,
        enforce_eager=True,
        seed=0,
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=2 << 30,
    )
    tok = llm.get_tokenizer()
    box = ToolBox.from_config(EnvironmentConfig(name="calculator", tools=["calculator"]), tok)
    rows = get_task("arithmetic").generate(8, seed=12345, difficulty=2, operators="*")
    results = {}
    for name, (system, examples) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        prompts = []
        for row in rows:
            msgs = [
                {"role": "system", "content": f"{system}\n\n{box.describe()}"},
                *examples,
                {"role": "user", "content": row["prompt"]},
            ]
            prompts.append(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        figures = {}
        for label, params in {
            "T1": SamplingParams(
                n=args.n,
                temperature=1.0,
                max_tokens=48,
                stop=["</tool_call>"],
                include_stop_str_in_output=True,
            ),
            "greedy": SamplingParams(
                n=1, temperature=0.0, max_tokens=48, stop=["</tool_call>"], include_stop_str_in_output=True
            ),
        }.items():
            outs = llm.generate(prompts, params, use_tqdm=False)
            texts = [c.text for o in outs for c in o.outputs]
            ok = [t for t in texts if (calls := box.parse(t)) and not calls[0].error]
            figures[label] = {
                "call_rate": len(ok) / len(texts),
                "opened": sum("<tool_call>" in t for t in texts) / len(texts),
            }
            figures[label + "_examples"] = texts[:3]
        results[name] = figures
        print(name, json.dumps({k: v for k, v in figures.items() if not k.endswith("examples")}), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
