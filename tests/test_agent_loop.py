"""Multi-turn episodes through the real loop: Ray, a tiny CPU vLLM engine, DeepSpeed learners.

One trainer: a batch of guess-number episodes straight from the rollout group (masks, engine
logprobs, prompt + response ids), then two training steps (the audit compares engine and learner
logprobs on the multi-turn samples' policy tokens).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf.config.loader import load_config
from rlhf.loop.driver import Trainer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_multi_turn_episodes_train_with_masked_environment_tokens(tiny_model_dir, tmp_path):
    overrides = {
        "model.path": tiny_model_dir,
        "data.task_args": "{max_number: 9}",
        "data.num_eval": "0",
        "rollout.environment.max_turns": "3",
        "rollout.environment.max_tokens": "96",
        # the recipe's demonstration game would fill most of the 256-token context of this test
        "rollout.environment.args.examples": "[]",
        "reward.sources": "[{kind: rule, name: env}, {kind: rule, name: task, weight: 0.5}]",
        "rollout.prompts_per_step": "2",
        "rollout.sampling.n": "2",
        "rollout.sampling.max_new_tokens": "6",
        "rollout.max_model_len": "256",
        "trainer.micro_batch_tokens": "512",
        "logging.wandb_mode": "disabled",
        "logging.output_dir": str(tmp_path),
        "logging.plot": "false",
        "steps": "2",
        "rollout.engine_logprobs": "true",  # the multi-turn logprobs and their mask are checked below
    }
    cfg = load_config(REPO / "configs/guess_number.yaml", [f"{k}={v}" for k, v in overrides.items()])
    trainer = Trainer(cfg)
    try:
        trainer.roles = trainer.start_roles()
        samples = trainer.roles.rollout.generate(
            trainer.data.next_batch(2), cfg.rollout.sampling, logprobs=True
        )
        assert len(samples) == 4 and all(s.episode is not None for s in samples)
        multi = [s for s in samples if s.episode["turns"] > 1]
        assert multi, "the random tiny model never guesses right: every episode should take several turns"
        tok = trainer.tokenizer
        for s in multi:
            mask = torch.tensor(s.response_mask, dtype=torch.bool)
            logprobs = torch.tensor(s.logprobs)
            assert len(s.response_mask) == len(s.response_ids) == len(s.logprobs)
            assert (logprobs[~mask] == 0).all() and (logprobs[mask] < 0).all()
            env_text = tok.decode([t for t, m in zip(s.response_ids, s.response_mask) if not m])
            assert "<|im_start|>user\n" in env_text and "<|im_start|>assistant\n" in env_text
            assert s.response_mask[-1] == 1 and s.episode["turns"] <= 3
            assert len(s.response_ids) <= 96 and s.policy_version == 0
        for _ in range(2):
            metrics = trainer.step_once()
            trainer.step += 1
            assert metrics["episode/turns_mean"] > 1 and "reward/env_mean" in metrics
            assert metrics["train/grad_norm"] >= 0
            # fp32 on CPU: after each sync the engine matches the learner on the policy's tokens
            assert metrics["sync/audit_logprob_diff"] < 1e-3
        rows = (trainer.run_dir / "samples.jsonl").read_text().splitlines()
        assert len(rows) == 8
    finally:
        trainer.shutdown()
