"""vLLM rollout engines as Ray actors, plus the worker extension that loads synced weights."""

from rlhf.rollout.engine import RolloutEngine
from rlhf.rollout.group import RolloutGroup

from rlhf.actor_group import split_evenly

__all__ = ["RolloutEngine", "RolloutGroup", "split_evenly"]
