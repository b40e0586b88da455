"""The TRL baseline: TRL's GRPOTrainer on our prompts, budget and checker, in a process of its own.

Run by compare_trl.py as `python -m experiments.learning.trl_baseline SPEC.json` with TRL on PYTHONPATH
(an experiment-only install, never a dependency of the package). TRL keeps its defaults (loss_type
"dapo", group-scaled rewards, vLLM importance-sampling correction "sequence_mask", gradient
checkpointing, bf16 on GPU) except what the shared budget fixes, and two data settings that make the
batches ours: the dataset comes in our driver's served order and is not shuffled again.
Writes SPEC's out_dir/result.json: the per-step train reward, the log history, the model directories.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def task_reward(prompts, completions, answer, **_):
    """rlhf.tasks' arithmetic checker on the completion text: the same reward our rule source gives."""
    from experiments.learning.prompts import TASK
    from rlhf.tasks import get_task

    task = get_task(TASK)
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [task.check(text, label) for text, label in zip(texts, answer)]


def config_kwargs(spec: dict) -> dict:
    """GRPOConfig arguments for the shared budget: one generation of P x N completions per optimizer
    step (gradient accumulation over micro-batches), constant lr, no KL, clip 0.2."""
    batch = spec["prompts_per_step"] * spec["n"]
    micro = spec.get("micro_batch") or batch
    if batch % micro:
        raise ValueError(f"TRL micro batch {micro} does not divide {batch} completions per step")
    on_gpu = spec["device"] == "cuda"
    kwargs = dict(
        output_dir=spec["out_dir"],
        max_steps=spec["steps"],
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro,
        num_generations=spec["n"],
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        beta=0.0,
        epsilon=0.2,
        seed=spec["seed"],
        shuffle_dataset=False,  # the dataset is already in our served order
        logging_steps=1,
        save_strategy="steps" if spec.get("mid_step") else "no",
        save_steps=spec.get("mid_step") or 500,
        save_only_model=True,
        report_to="none",
        use_vllm=on_gpu,
        bf16=on_gpu,
        use_cpu=not on_gpu,
    )
    if on_gpu:
        kwargs["vllm_mode"] = "colocate"
    kwargs.update(spec.get("extra", {}))
    return kwargs


def last_completions(trainer, k: int = 8) -> list[dict]:
    """A few completions of the last generation batch with their rewards (TRL keeps them for logging),
    to read beside our samples.jsonl; empty if this TRL version keeps them elsewhere."""
    logs = getattr(trainer, "_logs", {})
    completions, rewards = list(logs.get("completion", []))[-k:], list(logs.get("rewards", {}).values())
    scores = list(rewards[0])[-k:] if rewards else [None] * len(completions)
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [{"completion": t, "reward": r} for t, r in zip(texts, scores)]


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import datasets
    import trl
    from trl import GRPOConfig, GRPOTrainer

    from experiments.learning.prompts import messages

    rows = [json.loads(line) for line in Path(spec["train_file"]).read_text().splitlines()]
    dataset = datasets.Dataset.from_list(
        [{"prompt": messages(r["prompt"]), "answer": r["answer"]} for r in rows]
    )
    args = GRPOConfig(**config_kwargs(spec))
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=task_reward, args=args, train_dataset=dataset)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    out = Path(spec["out_dir"])
    final = out / f"checkpoint-{spec['steps']}"
    if not (final / "config.json").is_file():
        final = out / "final"
        trainer.save_model(str(final))
    models = {str(spec["steps"]): str(final)}
    if spec.get("mid_step") and (out / f"checkpoint-{spec['mid_step']}" / "config.json").is_file():
        models[str(spec["mid_step"])] = str(out / f"checkpoint-{spec['mid_step']}")
    history = [h for h in trainer.state.log_history if "reward" in h]
    curve: list[float | None] = [None] * spec["steps"]
    for h in history:
        if 1 <= h["step"] <= spec["steps"]:
            curve[h["step"] - 1] = h["reward"]
    keep = ("step", "reward", "reward_std", "loss", "grad_norm", "entropy", "clip_ratio/region_mean",
            "completions/mean_length", "completions/clipped_ratio", "learning_rate")  # fmt: skip
    result = {
        "train_reward": curve,
        "log_history": [{k: h[k] for k in keep if k in h} for h in history],
        "models": models,
        "train_s": train_s,
        "last_completions": last_completions(trainer),
        "last_batch_prompts": sorted(
            {m[-1]["content"] for m in getattr(trainer, "_logs", {}).get("prompt", [])}
        ),
        "versions": {"trl": trl.__version__, "datasets": datasets.__version__},
        "config": {k: v for k, v in config_kwargs(spec).items() if k != "output_dir"},
        "defaults_kept": {
            k: getattr(args, k)
            for k in (
                "loss_type",
                "scale_rewards",
                "vllm_importance_sampling_correction",
                "vllm_importance_sampling_mode",
                "vllm_importance_sampling_clip_max",
                "gradient_checkpointing",
                "max_grad_norm",
                "top_k",
                "top_p",
                "num_iterations",
                "vllm_gpu_memory_utilization",
                "warmup_steps",
                "weight_decay",
            )  # fmt: skip
            if hasattr(args, k)
        },
    }
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
