"""Where the old (pre-update) logprobs of a batch come from, and whether the engines return logprobs.

Returning each sampled token's logprob makes vLLM compute a log-softmax over the whole vocabulary at
every step: at vocab 152k that costs more than the rest of the generation. So by default the engines
return none, and the learner supplies pi_old itself:

* `recompute_old_logprobs: null` (default, "auto"): when the batch feeds a single optimizer step and
  nothing reads pi_old before training, pi_old is the training pass's own logprobs, detached (the
  weights have not moved yet, so they are the same numbers; no extra pass). Otherwise (several
  epochs or mini-batches, or KL to the reference folded into the reward) one learner forward pass
  computes them before training.
* `true`: always one learner forward pass before training.
* `false`: pi_old is the engine's logprob of each sampled token (the engine must return them).

The engines return logprobs only where they are used: `recompute_old_logprobs: false`, or an
off-policy correction (`tis_cap`, an asynchronous run, or FP8 engines), whose weight pi_old / pi_engine needs the
engine's side.
"""

from __future__ import annotations

from rlhf.algorithms.registry import AlgorithmConfig


def engine_logprobs_needed(alg: AlgorithmConfig, max_staleness: int = 0, quantized: bool = False) -> bool:
    """Whether generation must return each sampled token's logprob (pi_old itself, or the behaviour
    policy of an off-policy correction; `quantized` engines turn one on by default)."""
    from rlhf.algorithms.losses import off_policy_correction

    return (
        alg.recompute_old_logprobs is False or off_policy_correction(alg, max_staleness, quantized) != "none"
    )


def rollout_quantized(cfg) -> bool:
    """Whether the engines of the run `cfg` (a RunConfig) run quantized weights (`rollout.quantization`)."""
    return cfg.rollout.quantization != "none"


def engines_return_logprobs(cfg) -> bool:
    """Whether any generate call of the run `cfg` (a RunConfig) asks the engines for sampled-token
    logprobs: the algorithm's (above), the agent endpoint's recorded calls, or `rollout.engine_logprobs`."""
    if cfg.rollout.engine_logprobs is not None:
        return bool(cfg.rollout.engine_logprobs)
    needed = engine_logprobs_needed(cfg.algorithm, cfg.rollout.max_staleness, rollout_quantized(cfg))
    return needed or bool(cfg.rollout.agent.function)


def single_update(alg: AlgorithmConfig) -> bool:
    return alg.ppo_epochs == 1 and alg.mini_batches == 1


def learner_pass_needed(alg: AlgorithmConfig, has_reference: bool) -> bool:
    """Whether the driver runs one learner forward pass for pi_old before training."""
    if alg.recompute_old_logprobs is not None:
        return alg.recompute_old_logprobs
    kl_before_training = has_reference and alg.kl_in == "reward"
    return not single_update(alg) or kl_before_training


def source(alg: AlgorithmConfig, has_reference: bool) -> str:
    """'engine', 'learner_pass' or 'training_pass' (for docs, logs and tests)."""
    if alg.recompute_old_logprobs is False:
        return "engine"
    return "learner_pass" if learner_pass_needed(alg, has_reference) else "training_pass"
