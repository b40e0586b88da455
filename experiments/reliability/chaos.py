"""Chaos run: a real CPU training run (tiny model, two vLLM engines) in which engines are killed
mid-step; records faults injected, steps completed, samples lost and restart times.

  python experiments/reliability/chaos.py --out experiments/results/reliability/summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--kill-every", type=int, default=2, help="kill an engine during every k-th step")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray

    from rlhf.config.loader import load_config
    from rlhf.loop.driver import Trainer
    from rlhf.testing import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="rlhf-chaos-"))
    model = build_tiny_model(str(work / "model"), arch="llama")
    prompts, n, tokens = 4, 4, 160
    overrides = {
        "model.path": model,
        "data.num_eval": "0",
        "rollout.prompts_per_step": str(prompts),
        "rollout.sampling.n": str(n),
        "rollout.sampling.max_new_tokens": str(tokens),
        "rollout.sampling.ignore_eos": "true",
        "rollout.max_model_len": "256",
        "rollout.gpu_memory_utilization": "0.02",
        "placement.rollout.replicas": "2",
        "trainer.micro_batch_tokens": "1024",
        "logging.wandb_mode": "disabled",
        "logging.plot": "false",
        "logging.output_dir": str(work / "runs"),
        "steps": str(args.steps),
    }
    cfg = load_config(REPO / "configs/quickstart.yaml", [f"{k}={v}" for k, v in overrides.items()])
    trainer = Trainer(cfg)
    trainer.roles = trainer.start_roles()
    faults, steps, restart_s = [], [], []
    try:
        rollout = trainer.roles.rollout
        for step in range(1, args.steps + 1):
            killer = None
            if step % args.kill_every == 0:
                victim_rank = (step // args.kill_every) % len(rollout.engines)
                victim = rollout.engines[victim_rank]
                killer = threading.Timer(0.2, lambda v=victim: ray.kill(v, no_restart=True))
                killer.start()
                faults.append({"step": step, "killed": f"rollout engine {victim_rank}"})
            before = rollout.restarts
            t0 = time.perf_counter()
            m = trainer.step_once()
            trainer.step += 1
            if killer is not None:
                killer.join()
            if rollout.restarts > before:
                restart_s.append(round(rollout.last_restart_s, 2))
            steps.append(
                {
                    "step": step,
                    "step_s": round(time.perf_counter() - t0, 2),
                    "trained_tokens": m["train/num_tokens"],
                    "expected_tokens": prompts * n * tokens,
                    "restarts_so_far": m["fault/engine_restarts"],
                    "audit_worst_engine_diff": m["sync/audit_worst_engine_diff"],
                }
            )
            print(json.dumps(steps[-1]), flush=True)
    finally:
        trainer.shutdown()
    lost = sum(s["expected_tokens"] - s["trained_tokens"] for s in steps) // tokens
    result = {
        "device": "cpu (2 cores)",
        "command": " ".join(sys.argv),
        "faults_injected": faults,
        "steps_completed": len(steps),
        "steps_planned": args.steps,
        "samples_lost": int(lost),
        "engine_restarts": rollout.restarts,
        "restart_s": restart_s,
        "bad_inputs_tried": 39,
        "bad_inputs_note": "the battery in docs/reliability.md, each a test in tests/",
        "steps": steps,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=1))


if __name__ == "__main__":
    main()
