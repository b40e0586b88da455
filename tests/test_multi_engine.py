"""Two engine replicas and two learner ranks (ZeRO-2, gloo) on the CPU: the N-GPU code path.

Generation is spread over both engines by whole groups; the engines return no logprobs by default
and the learner's own logprobs (pi_old) match what the engine would have returned; each sync lands in
both engines (the audit scores the probe on every engine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf.algorithms.losses import policy_loss
from rlhf.config.loader import load_config
from rlhf.config.schema import AlgorithmConfig
from rlhf.loop.batch import make_train_batch
from rlhf.loop.driver import Trainer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_two_engines_two_learner_ranks_end_to_end(tiny_model_dir, tmp_path):
    overrides = {
        "model.path": tiny_model_dir,
        "data.num_eval": "0",
        "rollout.prompts_per_step": "4",
        "rollout.sampling.n": "2",
        "rollout.sampling.max_new_tokens": "8",
        "rollout.max_model_len": "256",
        "rollout.gpu_memory_utilization": "0.02",
        "trainer.micro_batch_tokens": "256",
        "trainer.zero_stage": "2",
        "placement.rollout.replicas": "2",
        "placement.learner.replicas": "2",
        "logging.wandb_mode": "disabled",
        "logging.plot": "false",
        "logging.output_dir": str(tmp_path),
        "steps": "2",
        "rollout.engine_logprobs": "true",  # GRPO needs none; this test compares them with the learner's
    }
    cfg = load_config(REPO / "configs/quickstart.yaml", [f"{k}={v}" for k, v in overrides.items()])
    trainer = Trainer(cfg)
    trainer.roles = trainer.start_roles()
    try:
        roles = trainer.roles
        assert len(roles.rollout.engines) == 2 and len(roles.policy.actors) == 2
        assert not trainer.engine_logprobs  # GRPO, one update per batch: the engines return none

        # Whole groups per engine, back in prompt order, no logprobs unless asked for.
        prompts = trainer.data.next_batch(4)
        assert all(len(rows) == 2 for rows in roles.rollout.assign(prompts, 2, 8))
        plain = roles.rollout.generate(prompts, cfg.rollout.sampling)
        assert [s.group for s in plain] == [0, 0, 1, 1, 2, 2, 3, 3]
        assert all(s.logprobs is None for s in plain)
        assert make_train_batch(plain, trainer.pad_id).rollout_logprobs is None

        # The learner's logprobs (what pi_old is by default) match the engine's sampled-token logprobs.
        samples = roles.rollout.generate(prompts, cfg.rollout.sampling, logprobs=True)
        batch = make_train_batch(samples, trainer.pad_id)
        learner = roles.policy.logprobs(batch)  # at the sampling temperature, like the engine's
        mask = batch.loss_mask
        assert float(((learner - batch.rollout_logprobs).abs() * mask).max()) < 1e-3  # fp32 audit tolerance
        batch.advantages = torch.randn(len(batch), 1, generator=torch.Generator().manual_seed(0)) * mask
        alg = AlgorithmConfig()
        new = learner + 0.05 * torch.randn_like(learner) * mask  # a policy that moved a little
        with_engine, _ = policy_loss(new, batch.rollout_logprobs, batch.advantages, mask, alg)
        with_learner, _ = policy_loss(new, learner, batch.advantages, mask, alg)
        assert float(with_engine) == pytest.approx(float(with_learner), abs=1e-4)

        # Two whole steps: the sync reaches both engines (audited on each), both ranks train.
        for _ in range(2):
            metrics = trainer.step_once()
            trainer.step += 1
            assert metrics["sync/channels"] == 1.0  # object store on CPU, one channel to both engines
            assert metrics["sync/audit_worst_engine_diff"] < 1e-3
            assert metrics["train/optimizer_steps"] == 1.0 and metrics["train/num_tokens"] > 0
            assert "time/old_logprobs_s" not in metrics  # pi_old came from the training pass
    finally:
        trainer.shutdown()
