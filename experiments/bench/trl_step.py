"""TRL's GRPOTrainer on the benchmark's model and prompts: its step time beside ours (bench_step.py).

Same random-weight model directory (bench_step.build_model_dir, from the same cache), the same
prompts file and lengths (`--workload fixed|longtail`), the same samples per step (P prompts x N),
answer limit, micro-batch and learning rate; vLLM colocated in TRL's own process (`vllm_mode:
colocate`, sleep mode with `--sleep`). TRL keeps its other defaults. On the fixed workload vLLM is
asked for exactly `--new-tokens` tokens (`ignore_eos`, `min_tokens`), as our engines are.

    PYTHONPATH=/path/to/trl:$PWD python3 experiments/bench/trl_step.py --shape qwen2.5-1.5b \\
        --prompts 64 --n 8 --new-tokens 512 --steps 3 --out OUT

TRL is an experiment-only install (never a dependency of the package). Writes OUT/result.json: the
step times (the first is warm-up), the completion lengths TRL logged and the padding fraction its
batches carry (every row of a generation batch is padded to the batch's longest prompt and answer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from experiments.bench.workloads import learning_rate  # noqa: E402


def grpo_kwargs(args: argparse.Namespace, out_dir: str) -> dict:
    """GRPOConfig arguments for the benchmark's step: one generation of P x N answers per optimizer
    step, accumulated over micro-batches of `--micro-batch` answers; no KL, constant lr."""
    batch = args.prompts * args.n
    if batch % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} does not divide {batch} answers per step")
    generation = {"ignore_eos": True, "min_tokens": args.new_tokens} if args.workload == "fixed" else {}
    return dict(
        output_dir=out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=batch // args.micro_batch,
        num_generations=args.n,
        max_completion_length=args.new_tokens,
        temperature=1.0,
        learning_rate=learning_rate(args.workload, args.lr),
        lr_scheduler_type="constant",
        beta=0.0,
        shuffle_dataset=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=True,
        gradient_checkpointing=True,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=args.util,
        vllm_enable_sleep_mode=args.sleep,
        generation_kwargs=generation,
    )


def padding_fraction(prompt_lengths: list[int], n: int, mean_answer: float, max_answer: int) -> float:
    """1 - real tokens / (rows x (longest prompt + longest answer)) for one generation batch of
    `n` answers per prompt: what a batch padded to its longest prompt and answer computes in vain."""
    rows = len(prompt_lengths) * n
    real = n * sum(prompt_lengths) + rows * mean_answer
    return 1.0 - real / (rows * (max(prompt_lengths) + max_answer))


def main() -> None:
    from experiments.bench.bench_step import SHAPES, prompt_lengths, workload_model_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--workload", default="fixed", choices=["fixed", "longtail"])
    ap.add_argument("--eos-median", type=int, default=300)
    ap.add_argument("--prompt-lens", type=lambda t: tuple(int(x) for x in t.split(",")), default=(64, 1024))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, help="default: bench_step's (1e-6; 1e-10 on longtail)")
    ap.add_argument("--micro-batch", type=int, default=16, help="answers per forward/backward")
    ap.add_argument("--util", type=float, default=0.5)
    ap.add_argument("--sleep", action="store_true", help="vLLM sleep mode between generations")
    ap.add_argument("--out", default="experiments/results/gpu/trl")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import os

    # TRL's colocated vLLM runs as an external launcher of this process: a torch.distributed world of one.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    import datasets
    import trl
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model_dir = workload_model_dir(args)
    import random

    rng = random.Random(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    lengths = prompt_lengths(args, args.prompts * args.steps)
    rows = [{"prompt": " ".join(f"t{rng.randrange(vocab - 2)}" for _ in range(k))} for k in lengths]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            self.times.append(now - self.start)
            self.start = now

    timer = StepTimes()
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=lambda completions, **_: [float(len(c) % 2) for c in completions],
        args=GRPOConfig(**grpo_kwargs(args, str(out / "trainer"))),
        train_dataset=datasets.Dataset.from_list(rows),
        callbacks=[timer],
    )
    trainer.train()
    history = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    counted = timer.times[1:] or timer.times
    result = {
        "system": "trl",
        "versions": {"trl": trl.__version__},
        "args": vars(args),
        "step_times_s": timer.times,
        "step_s": sum(counted) / len(counted),
        "completion_mean_length": [h["completions/mean_length"] for h in history],
        "completion_max_length": [h.get("completions/max_length") for h in history],
        # Prompts per step are known; answers from TRL's log (mean and longest of each step).
        "padding_frac": [
            padding_fraction(
                lengths[i * args.prompts : (i + 1) * args.prompts],
                args.n,
                h["completions/mean_length"],
                h["completions/max_length"],
            )
            for i, h in enumerate(history)
            if h.get("completions/max_length")
        ],
    }
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    print("RESULT " + json.dumps({k: result[k] for k in ("step_s", "step_times_s", "padding_frac")}))


if __name__ == "__main__":
    main()
