"""Reward sources (rule functions, reward-model actors, HTTP services) combined by weight."""

from reward.http import HttpReward, HttpRewardError
from reward.model import RewardModelActor
from reward.pipeline import RewardPipeline
from reward.rules import RewardError, RuleReward, load_reward_function

__all__ = [
    "HttpReward",
    "HttpRewardError",
    "RewardError",
    "RewardModelActor",
    "RewardPipeline",
    "RuleReward",
    "load_reward_function",
]
