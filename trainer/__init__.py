"""DeepSpeed learner actor groups (policy, reference, critic); see docs/trainer.md."""

from rlhf.trainer.group import LearnerGroup

__all__ = ["LearnerGroup"]
