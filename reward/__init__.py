"""Reward sources (rule functions, reward-model actors, HTTP services) combined by weight."""

from rlhf.reward.http import HttpReward, HttpRewardError
from rlhf.reward.model import RewardModelActor
from rlhf.reward.pipeline import RewardPipeline
from rlhf.reward.rules import RewardError, RuleReward, load_reward_function

__all__ = [
    "HttpReward",
    "HttpRewardError",
    "RewardError",
    "RewardModelActor",
    "RewardPipeline",
    "RuleReward",
    "load_reward_function",
]
