"""The registries behind `algorithm.advantage`, `loss_agg`, `off_policy_correction` and `kl_estimator`:
lookups, the one advantage entry point (same numbers as the estimators called directly), the config's
name checks, the generated tables of docs/algorithms.md, and a new estimator trained end to end."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from rlhf.algorithms import registry
from rlhf.algorithms.advantages import (
    AdvantageInputs,
    advantage_needs_critic,
    apply_kl_to_rewards,
    compute_advantages,
    dr_grpo_advantages,
    estimate_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    token_level_rewards,
)
from rlhf.algorithms.gae import gae
from rlhf.algorithms.kl import kl_estimate
from rlhf.algorithms.losses import aggregate, off_policy_correction, policy_loss
from rlhf.algorithms.registry import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    OFF_POLICY_CORRECTIONS,
    Registry,
    UnknownNameError,
)
from rlhf.config.loader import ConfigError, load_config
from rlhf.config.schema import AlgorithmConfig

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs/quickstart.yaml"
T = torch.tensor

# A hand-made batch: 3 prompts (ids not contiguous), one of them a single sample; right padding and
# prompt tokens off the mask; a row without response tokens.
REWARDS = T([1.0, 0.0, 0.5, 2.0, -1.0, 0.25])
GROUPS = T([7, 7, 3, 3, 3, 9])
MASK = T(
    [
        [0.0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1],
        [0, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ]
)
TOKEN_KL = torch.linspace(-0.3, 0.5, 30).reshape(6, 5) * MASK  # the loop masks it
VALUES = torch.linspace(0.2, -0.4, 30).reshape(6, 5)


# ------------------------------------------------------------------------------------------------ Registry
def test_registry_register_lookup_and_removal():
    things = Registry("algorithm.thing", "thing", "Things")

    @things.register("double", scale=2)
    def double(x):
        """Twice x.

        More text that is not part of the description."""
        return 2 * x

    assert double(3) == 6  # the decorator returns the function unchanged
    entry = things.get("double")
    assert entry(4) == 8 and entry.description == "Twice x." and entry.attrs == {"scale": 2}
    assert things.names() == ("double",) and "double" in things and len(things) == 1
    with pytest.raises(ValueError, match="already registered"):
        things.register("double")(lambda x: x)
    things.register("double", replace=True, description="Replaced.")(lambda x: x)
    assert things.get("double")(4) == 4 and things.get("double").description == "Replaced."

    with things.registered("triple", lambda x: 3 * x) as triple:
        assert things.get("triple") is triple and things.names() == ("double", "triple")
    assert things.names() == ("double",)
    things.unregister("double")
    assert things.names() == ()

    with pytest.raises(UnknownNameError) as info:
        things.get("nope")
    assert str(info.value) == "algorithm.thing: unknown thing 'nope'; registered: "
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_builtin_names_in_order():
    assert ADVANTAGE_ESTIMATORS.names() == (
        "grpo",
        "dr_grpo",
        "rloo",
        "reinforce_pp",
        "reinforce_pp_baseline",
        "gae",
    )
    assert LOSS_AGGREGATIONS.names() == ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
    assert OFF_POLICY_CORRECTIONS.names() == ("none", "tis", "decoupled_ppo")
    assert KL_ESTIMATORS.names() == ("k1", "k2", "k3")
    assert all(e.description for r in registry.REGISTRIES for e in r.entries())
    assert [n for n in ADVANTAGE_ESTIMATORS.names() if advantage_needs_critic(n)] == ["gae"]
    group_relative = [e.name for e in ADVANTAGE_ESTIMATORS.entries() if e.attrs.get("group_relative")]
    assert group_relative == ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"]


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ValueError) as info:
        estimate_advantages(AlgorithmConfig(advantage="foo"), AdvantageInputs(REWARDS, GROUPS, MASK))
    assert str(info.value) == (
        "algorithm.advantage: unknown estimator 'foo'; registered: grpo, dr_grpo, rloo, reinforce_pp, "
        "reinforce_pp_baseline, gae"
    )
    with pytest.raises(KeyError, match="registered: grpo"):
        advantage_needs_critic("foo")
    with pytest.raises(
        ValueError, match="algorithm.loss_agg: unknown loss aggregation 'sum'; registered: token_mean"
    ):
        aggregate(TOKEN_KL, MASK, "sum")
    with pytest.raises(
        ValueError, match="algorithm.kl_estimator: unknown KL estimator 'k4'; registered: k1, k2, k3"
    ):
        kl_estimate(TOKEN_KL, VALUES, "k4")
    with pytest.raises(ValueError, match="registered: none, tis, decoupled_ppo"):
        off_policy_correction(AlgorithmConfig(off_policy_correction="magic"))


# ------------------------------------------------------------------------------------------------ advantages
def old_scalar_advantages(cfg: AlgorithmConfig, rewards, groups, mask):
    """The estimators called directly, as the loop did before the registry."""
    direct = {
        "grpo": lambda: grpo_advantages(rewards, groups, cfg.eps),
        "dr_grpo": lambda: dr_grpo_advantages(rewards, groups),
        "rloo": lambda: rloo_advantages(rewards, groups),
        "reinforce_pp": lambda: reinforce_pp_advantages(rewards, mask, cfg.eps),
        "reinforce_pp_baseline": lambda: reinforce_pp_baseline_advantages(rewards, groups, mask, cfg.eps),
    }
    return direct[cfg.advantage]()[:, None] * mask.float()


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
@pytest.mark.parametrize("kl_in", ["loss", "reward"])
@pytest.mark.parametrize("with_kl", [False, True])
def test_scalar_estimators_equal_the_direct_functions(name, kl_in, with_kl):
    cfg = AlgorithmConfig(advantage=name, kl_in=kl_in, kl_coef=0.3, eps=1e-4)
    token_kl = TOKEN_KL if with_kl else None
    advantages, returns = estimate_advantages(cfg, AdvantageInputs(REWARDS, GROUPS, MASK, token_kl))
    rewards = REWARDS
    if with_kl and kl_in == "reward":
        rewards = apply_kl_to_rewards(REWARDS, TOKEN_KL, MASK, cfg.kl_coef)
    expected = old_scalar_advantages(cfg, rewards, GROUPS, MASK)
    assert returns is None and advantages.dtype == torch.float32
    assert torch.equal(advantages, expected)
    assert torch.equal(compute_advantages(cfg, rewards, GROUPS, MASK), expected)
    if with_kl and kl_in == "reward":  # the KL changed the numbers
        assert not torch.equal(expected, old_scalar_advantages(cfg, REWARDS, GROUPS, MASK))


@pytest.mark.parametrize("kl_in", ["loss", "reward"])
@pytest.mark.parametrize("with_kl", [False, True])
def test_gae_equals_the_direct_function_with_kl_in_the_reward(kl_in, with_kl):
    cfg = AlgorithmConfig(advantage="gae", kl_in=kl_in, kl_coef=0.2, gamma=0.9, lam=0.8)
    token_kl = TOKEN_KL if with_kl else None
    inputs = AdvantageInputs(REWARDS, GROUPS, MASK, token_kl, VALUES)
    advantages, returns = estimate_advantages(cfg, inputs)
    # the loop before the registry: the KL per token when it goes in the reward, else coefficient 0
    coef = cfg.kl_coef if (token_kl is not None and kl_in == "reward") else 0.0
    kl_term = token_kl if token_kl is not None else torch.zeros_like(MASK)
    expected = gae(token_level_rewards(REWARDS, kl_term, MASK, coef), VALUES, MASK, cfg.gamma, cfg.lam)
    assert torch.equal(advantages, expected[0]) and torch.equal(returns, expected[1])
    if with_kl and kl_in == "reward":
        no_kl = estimate_advantages(cfg, AdvantageInputs(REWARDS, GROUPS, MASK, None, VALUES))[0]
        assert not torch.equal(advantages, no_kl)


def test_gae_needs_values():
    cfg = AlgorithmConfig(advantage="gae")
    assert advantage_needs_critic("gae") and not advantage_needs_critic("grpo")
    with pytest.raises(ValueError, match="critic's values"):
        estimate_advantages(cfg, AdvantageInputs(REWARDS, GROUPS, MASK))
    with pytest.raises(ValueError, match="gae"):
        compute_advantages(cfg, REWARDS, GROUPS, MASK)


def test_a_registered_estimator_gets_the_kl_folded_rewards():
    seen = []

    def mean_baseline(inputs, cfg):
        """r_i - mean_batch r."""
        seen.append(inputs)
        rewards = inputs.rewards.float()
        return (rewards - rewards.mean())[:, None] * inputs.mask.float(), None

    cfg = AlgorithmConfig(advantage="mean_baseline", kl_in="reward", kl_coef=0.5)
    with ADVANTAGE_ESTIMATORS.registered("mean_baseline", mean_baseline):
        advantages, _ = estimate_advantages(cfg, AdvantageInputs(REWARDS, GROUPS, MASK, TOKEN_KL))
        assert not advantage_needs_critic("mean_baseline")
    assert "mean_baseline" not in ADVANTAGE_ESTIMATORS
    folded = apply_kl_to_rewards(REWARDS, TOKEN_KL, MASK, 0.5)
    assert torch.equal(seen[0].rewards, folded) and seen[0].token_kl is None
    assert torch.equal(advantages, (folded - folded.mean())[:, None] * MASK)


# ------------------------------------------------------------------------------------ losses and KL
def test_a_registered_aggregation_kl_estimator_and_correction_are_used():
    def plain_sum(values, mask, *, num_tokens=None, num_sequences=None, constant=None):
        """sum of the masked values."""
        return (values.float() * mask).sum()

    def absolute(log_ratio):
        """|d|."""
        return log_ratio.abs()

    def halve(old_logprobs, rollout_logprobs, cfg):
        """Every token's loss at half weight."""
        return torch.full_like(old_logprobs, 0.5)

    logp = torch.linspace(-2, -0.5, 30).reshape(6, 5)
    ref = torch.linspace(-1, -1.5, 30).reshape(6, 5)
    with (
        LOSS_AGGREGATIONS.registered("plain_sum", plain_sum),
        KL_ESTIMATORS.registered("abs", absolute),
        OFF_POLICY_CORRECTIONS.registered("halve", halve),
    ):
        assert torch.equal(aggregate(VALUES, MASK, "plain_sum"), (VALUES * MASK).sum())
        assert torch.equal(kl_estimate(logp, ref, "abs"), (logp - ref).abs())
        adv = REWARDS[:, None] * MASK
        half, stats = policy_loss(
            logp, logp, adv, MASK, AlgorithmConfig(off_policy_correction="halve"), rollout_logprobs=ref
        )
        whole, _ = policy_loss(logp, logp, adv, MASK, AlgorithmConfig(off_policy_correction="none"))
        assert torch.allclose(half, 0.5 * whole) and float(stats["tis_weight_mean"]) == 0.5
    assert (
        "plain_sum" not in LOSS_AGGREGATIONS
        and "abs" not in KL_ESTIMATORS
        and "halve" not in OFF_POLICY_CORRECTIONS
    )


def test_builtin_aggregations_and_kl_estimators_by_hand():
    close = torch.testing.assert_close
    close(aggregate(VALUES, MASK, "token_mean"), (VALUES * MASK).sum() / MASK.sum())
    per_seq = (VALUES * MASK).sum(1)[MASK.sum(1) > 0]
    close(aggregate(VALUES, MASK, "seq_mean_token_mean"), (per_seq / MASK.sum(1)[MASK.sum(1) > 0]).mean())
    close(aggregate(VALUES, MASK, "seq_mean_token_sum_norm", constant=4.0), (per_seq / 4.0).mean())
    d = torch.linspace(-3, 3, 13)
    zero = torch.zeros_like(d)
    close(kl_estimate(d, zero, "k1"), d)
    close(kl_estimate(d, zero, "k2"), 0.5 * d**2)
    close(kl_estimate(d, zero, "k3"), torch.exp(-d) - 1 + d)


# ------------------------------------------------------------------------------------------------ config
def config_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, overrides)
    return str(info.value)


def test_config_names_are_checked_against_the_registries():
    assert config_error(["algorithm.advantage=foo"]).endswith(
        "algorithm.advantage: must be one of grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline, gae "
        "(got 'foo')"
    )
    assert "algorithm.loss_agg: must be one of token_mean, seq_mean_token_mean, seq_mean_token_sum_norm" in (
        config_error(["algorithm.loss_agg=sum"])
    )

    def baseline(inputs, cfg):
        """The group mean as the baseline, and a critic."""
        return torch.zeros_like(inputs.mask.float()), None

    with ADVANTAGE_ESTIMATORS.registered("with_critic", baseline, needs_critic=True, group_relative=True):
        assert "with_critic needs a critic: set trainer.critic.enabled=true" in config_error(
            ["algorithm.advantage=with_critic"]
        )
        assert (
            "rollout.sampling.n: with_critic compares samples of a prompt: needs n >= 2 (got 1)"
            in config_error(
                ["algorithm.advantage=with_critic", "trainer.critic.enabled=true", "rollout.sampling.n=1"]
            )
        )
        cfg = load_config(QUICKSTART, ["algorithm.advantage=with_critic", "trainer.critic.enabled=true"])
        assert cfg.algorithm.advantage == "with_critic"
    with LOSS_AGGREGATIONS.registered("plain_sum", lambda values, mask, **_: (values * mask).sum()):
        assert load_config(QUICKSTART, ["algorithm.loss_agg=plain_sum"]).algorithm.loss_agg == "plain_sum"


# ------------------------------------------------------------------------------------------------ docs
def test_docs_tables_are_generated_from_the_registries():
    text = (REPO / "docs/algorithms.md").read_text()
    assert registry.BEGIN in text and registry.END in text
    assert registry.doc_block(text) == registry.registry_tables(), (
        "docs/algorithms.md is out of date: run python -m rlhf.algorithms.registry"
    )


def test_write_doc_rewrites_only_the_block(tmp_path):
    doc = tmp_path / "algorithms.md"
    shutil.copy(REPO / "docs/algorithms.md", doc)
    original = doc.read_text()
    assert not registry.write_doc(doc)
    with ADVANTAGE_ESTIMATORS.registered("extra", lambda inputs, cfg: None, description="An extra one."):
        assert registry.write_doc(doc)
        assert "| `extra` | An extra one. |  |" in doc.read_text()
    assert registry.write_doc(doc) and doc.read_text() == original


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_a_new_estimator_trains_one_step(tiny_model_dir, rm_path, tmp_path):
    """An estimator registered here alone drives a real step (Ray, vLLM and DeepSpeed on the CPU): the
    loop calls it, and the logged advantage is what it returned."""
    from rlhf.loop.driver import Trainer

    calls = []

    def mean_baseline(inputs, cfg):
        """r_i - mean_batch r: the batch mean as the baseline, on every response token."""
        rewards = inputs.rewards.float()
        advantages = (rewards - rewards.mean())[:, None] * inputs.mask.float()
        calls.append((inputs.rewards.clone(), inputs.mask.clone(), advantages.clone()))
        return advantages, None

    overrides = {
        "model.path": tiny_model_dir,
        "data.num_eval": "0",
        "rollout.prompts_per_step": "2",
        "rollout.sampling.n": "2",
        "rollout.sampling.max_new_tokens": "8",
        "rollout.max_model_len": "256",
        "rollout.gpu_memory_utilization": "0.02",
        "trainer.micro_batch_tokens": "256",
        # a random reward model: rewards that differ, so the advantages are not all 0
        "reward.sources": f"[{{kind: model, path: {rm_path}}}]",
        "algorithm.advantage": "mean_baseline",
        "logging.wandb_mode": "disabled",
        "logging.plot": "false",
        "logging.output_dir": str(tmp_path),
        "steps": "1",
    }
    with ADVANTAGE_ESTIMATORS.registered("mean_baseline", mean_baseline):
        cfg = load_config(QUICKSTART, [f"{k}={v}" for k, v in overrides.items()])
        assert cfg.algorithm.advantage == "mean_baseline"
        trainer = Trainer(cfg)
        trainer.roles = trainer.start_roles()
        try:
            metrics = trainer.step_once()
        finally:
            trainer.shutdown()

    assert len(calls) == 1
    rewards, mask, advantages = calls[0]
    assert rewards.shape == (4,) and mask.shape[0] == 4 and mask.sum() > 0
    assert float(rewards.max() - rewards.min()) > 0
    # the estimator's formula, computed here again from what it was given
    expected = (rewards - rewards.mean())[:, None] * mask
    torch.testing.assert_close(advantages, expected)
    abs_mean = float((expected.abs() * mask).sum() / mask.sum())
    assert abs_mean > 0
    assert metrics["train/advantage_abs_mean"] == pytest.approx(abs_mean, rel=1e-6)
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert metrics["train/num_tokens"] > 0 and math.isfinite(metrics["train/loss"])
    assert metrics["train/grad_norm"] >= 0
