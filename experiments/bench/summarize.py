"""Turn `run_matrix.py` outputs into `experiments/results/gpu/summary.json` entries.

Every entry takes its baselines (raw vLLM without logprobs, raw DeepSpeed) from a run on the same
machine in the same run (`--baseline FILE:NAME`), never from another machine.

  python experiments/bench/summarize.py --record two_gpu_hybrid_engine --baseline run2.json:raw \\
      --entry run2.json:gpu1_coloc --entry run3.json:disagg2 ... >> summary
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MEMORY_KEYS = ("peak_gpu_gb", "planned_gpu_gb", "peak_host_gb", "planned_host_gb")


def load(spec: str, root: Path) -> dict:
    path, _, name = spec.rpartition(":")
    return json.loads((root / path).read_text())[name]


def _round(value, digits: int = 3):
    return None if value is None else round(value, digits)


def engine_reload(phases: dict) -> str:
    """How the engines wrote the weights in the pushes timed alone (`sync.engine_reload`)."""
    if phases.get("engine_buckets_replayed"):
        return "replay"
    return "direct" if phases.get("engine_direct", 1.0) else "layerwise"


def workload(args: dict) -> str:
    """The batch in words: fixed-length answers, or the long-tailed lengths (`workloads.py`)."""
    batch = f"{args['prompts']}x{args['n']}"
    if args.get("workload") == "longtail":
        low, high = args["prompt_lens"]
        return (
            f"{batch} long-tailed: prompts of {low}-{high} tokens, answers of median "
            f"{args['eos_median']} up to {args['new_tokens']} tokens"
        )
    return f"{batch} prompts of {args['prompt_len']}, {args['new_tokens']} new tokens"


def entry(run: dict, raw: dict, record: str, source: str) -> dict:
    s, args = run["summary"], run["args"]
    parts = s["breakdown_s"]
    return {
        "record": record,
        "source": source,
        "device": run["device"],
        "gpus": args["gpus"],
        "mode": args["mode"],
        "tensor_parallel": args.get("tp", 1),
        "zero_stage": args.get("zero", 2),
        "max_staleness": args.get("staleness", 0),
        "offload": "trainer.offload_during_generation=true" in " ".join(args.get("override") or []),
        "step_s": round(s["step_s"], 3),
        "tokens_per_s": round(s["end_to_end_tokens_per_s"]),
        "generate_s": round(parts["generate"], 3) if "generate" in parts else None,  # async: producer side
        "train_s": round(parts["train"], 3),
        "sync_s": round(parts["sync"], 3),
        "sync_alone_s": round(s["sync_alone_s"], 4),
        "engine_reload": engine_reload(s.get("sync_phases_s", {})),
        "raw_vllm_nologprobs_s": round(raw["vllm"]["generate_no_logprobs_s"], 3),
        # the same requests as our engines make them (no per-token detokenization): the stricter baseline
        "raw_vllm_nologprobs_lean_s": _round(raw["vllm"].get("generate_lean_no_logprobs_s")),
        "raw_vllm_logprobs_s": round(raw["vllm"]["generate_s"], 3),
        "raw_deepspeed_train_s": round(raw["deepspeed"]["train_s"], 3),
        # the long-tailed workload samples its lengths: what each system actually generated
        "generated_tokens": _round(s.get("generated_tokens_per_step"), 0),
        "raw_vllm_generated_tokens": raw["vllm"].get("generated_tokens"),
        "audit_logprob_diff": _round(s["audit_logprob_diff"], 4),
        "shape": args.get("shape"),
        "workload": workload(args),
        "padding_frac": _round(s.get("padding_frac"), 4),
        "raw_deepspeed_padding_frac": _round(raw["deepspeed"].get("padding_frac"), 4),
        "packing": s.get("packing"),
        **{k: s.get("memory", {}).get(k) for k in MEMORY_KEYS if s.get("memory", {}).get(k) is not None},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="experiments/results/gpu", help="folder the FILE paths are under")
    ap.add_argument("--record", required=True, help="the results folder the entries come from")
    ap.add_argument("--baseline", required=True, help="FILE:NAME of the raw (a,b) run")
    ap.add_argument("--entry", action="append", default=[], help="FILE:NAME of an rlhf (c) run")
    args = ap.parse_args()
    root = Path(args.root)
    raw = load(args.baseline, root)
    print(json.dumps([entry(load(e, root), raw, args.record, e) for e in args.entry], indent=1))


if __name__ == "__main__":
    main()
