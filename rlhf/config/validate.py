"""Validation of a loaded `RunConfig`: every check, each failing with one line that names the file,
the dotted key, the bad value and the problem (`rlhf.config.loader.ConfigError`).

Split from the loader so that each file holds one idea: `rlhf.config.loader` turns YAML and
overrides into a typed tree, this module decides whether that tree makes sense.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlhf.config.loader import (
    ConfigError,
    _error,
    origin_of,
    resolve_device,
)
from rlhf.config.schema import RunConfig
from rlhf.config.uris import is_remote, local_path

BUILTIN_RULES = ("task", "format", "math", "env", "code_tests")
ROLES = ("rollout", "learner", "reference", "critic", "reward_model", "evaluation")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv")


def validate(
    cfg: RunConfig, origins: Mapping[str, str] | None = None, source: str | None = None
) -> RunConfig:
    """Checks value ranges and cross-field rules; raises a one-line ConfigError on the first problem.

    `origins` maps dotted keys to the file that set them (so a message names the right file).
    """
    origins = origins or {}
    default_file = source or cfg.source_file or "<config>"

    def fail(key: str, problem: str, value: Any = dataclasses.MISSING) -> ConfigError:
        return _error(origin_of(key, origins, default_file), key, problem, value)

    def check(ok: bool, key: str, problem: str, value: Any) -> None:
        if not ok:
            raise fail(key, problem, value)

    def positive(key: str, value: float) -> None:
        check(value > 0, key, "must be > 0", value)

    def at_least(key: str, value: float, low: float) -> None:
        check(value >= low, key, f"must be >= {low}", value)

    def fraction(key: str, value: float) -> None:
        check(0 < value <= 1, key, "must be in (0, 1]", value)

    at_least("steps", cfg.steps, 1)
    at_least("eval_every", cfg.eval_every, 0)
    if cfg.resume is not None and not is_remote(cfg.resume):  # a URI is checked when the run starts
        check(local_path(cfg.resume).is_dir(), "resume", "run directory not found", cfg.resume)

    # model / data
    check(bool(cfg.model.path), "model.path", "must not be empty", cfg.model.path)
    _validate_data(cfg, fail)
    at_least("data.max_prompt_tokens", cfg.data.max_prompt_tokens, 1)
    at_least("data.num_train", cfg.data.num_train, 1)
    at_least("data.num_eval", cfg.data.num_eval, 0)

    # rollout
    ro, sp = cfg.rollout, cfg.rollout.sampling
    at_least("rollout.prompts_per_step", ro.prompts_per_step, 1)
    at_least("rollout.sampling.n", sp.n, 1)
    at_least("rollout.sampling.temperature", sp.temperature, 0)
    fraction("rollout.sampling.top_p", sp.top_p)
    check(sp.top_k == -1 or sp.top_k >= 1, "rollout.sampling.top_k", "must be -1 (off) or >= 1", sp.top_k)
    at_least("rollout.sampling.max_new_tokens", sp.max_new_tokens, 1)
    at_least("rollout.eval_temperature", ro.eval_temperature, 0)
    at_least("rollout.tensor_parallel", ro.tensor_parallel, 1)
    at_least("rollout.max_staleness", ro.max_staleness, 0)
    _validate_quantization(cfg, fail)
    if ro.gpu_memory_utilization is not None:
        fraction("rollout.gpu_memory_utilization", ro.gpu_memory_utilization)
    check(
        sp.max_new_tokens < ro.max_model_len,
        "rollout.sampling.max_new_tokens",
        f"must be < rollout.max_model_len ({ro.max_model_len})",
        sp.max_new_tokens,
    )

    # algorithm
    al = cfg.algorithm
    _validate_algorithm_names(cfg, fail)
    at_least("algorithm.clip_low", al.clip_low, 0)
    at_least("algorithm.clip_high", al.clip_high, 0)
    at_least("algorithm.kl_coef", al.kl_coef, 0)
    if al.loss_agg_constant is not None:
        positive("algorithm.loss_agg_constant", al.loss_agg_constant)
    if al.tis_cap is not None:
        positive("algorithm.tis_cap", al.tis_cap)
    check(
        al.off_policy_correction != "tis" or al.tis_cap is not None,
        "algorithm.off_policy_correction",
        "tis needs algorithm.tis_cap (the truncation)",
        al.off_policy_correction,
    )
    if ro.engine_logprobs is False:
        from rlhf.algorithms.old_logprobs import engine_logprobs_needed, rollout_quantized

        check(
            not engine_logprobs_needed(al, ro.max_staleness, rollout_quantized(cfg)),
            "rollout.engine_logprobs",
            "false, but the run needs the engines' sampled-token logprobs (pi_old from the engine, or an "
            "off-policy correction: FP8 engines turn tis on unless algorithm.off_policy_correction is set)",
            ro.engine_logprobs,
        )
    check(
        not (al.recompute_old_logprobs is False and ro.max_staleness > 0),
        "algorithm.recompute_old_logprobs",
        "false (pi_old from the engine) cannot be used with rollout.max_staleness >= 1: the behaviour policy "
        "is several versions old; leave it null",
        al.recompute_old_logprobs,
    )
    at_least("rollout.partial_chunk_tokens", ro.partial_chunk_tokens, 1)
    check(
        not (ro.partial_rollouts and ro.max_staleness < 1),
        "rollout.partial_rollouts",
        "needs rollout.max_staleness >= 1 (a synchronous run never pushes weights mid-generation)",
        ro.partial_rollouts,
    )
    check(
        not (ro.partial_rollouts and (ro.environment.name or ro.agent.function)),
        "rollout.partial_rollouts",
        "does not combine with rollout.environment or rollout.agent (episodes generate turn by turn)",
        ro.partial_rollouts,
    )
    check(
        not (al.dynamic_sampling and ro.max_staleness > 0),
        "algorithm.dynamic_sampling",
        "is not supported with rollout.max_staleness >= 1 yet",
        al.dynamic_sampling,
    )
    at_least("algorithm.ppo_epochs", al.ppo_epochs, 1)
    at_least("algorithm.mini_batches", al.mini_batches, 1)
    check(0 <= al.gamma <= 1, "algorithm.gamma", "must be in [0, 1]", al.gamma)
    check(0 <= al.lam <= 1, "algorithm.lam", "must be in [0, 1]", al.lam)
    at_least("algorithm.value_clip", al.value_clip, 0)
    at_least("algorithm.max_sampling_rounds", al.max_sampling_rounds, 1)
    at_least("algorithm.overlong_buffer", al.overlong_buffer, 0)
    check(
        al.overlong_buffer < sp.max_new_tokens,
        "algorithm.overlong_buffer",
        f"must be < rollout.sampling.max_new_tokens ({sp.max_new_tokens})",
        al.overlong_buffer,
    )
    positive("algorithm.eps", al.eps)
    if al.dynamic_sampling:
        check(sp.n >= 2, "rollout.sampling.n", "dynamic_sampling drops all-equal groups: needs n >= 2", sp.n)

    # trainer
    tr = cfg.trainer
    check(math.isfinite(tr.lr) and tr.lr > 0, "trainer.lr", "must be > 0", tr.lr)
    check(0 <= tr.min_lr_ratio <= 1, "trainer.min_lr_ratio", "must be in [0, 1]", tr.min_lr_ratio)
    check(tr.max_restarts >= 0, "trainer.max_restarts", "must be >= 0", tr.max_restarts)
    at_least("trainer.warmup_steps", tr.warmup_steps, 0)
    at_least("trainer.weight_decay", tr.weight_decay, 0)
    for i, beta in enumerate(tr.adam_betas):
        check(0 <= beta < 1, f"trainer.adam_betas[{i}]", "must be in [0, 1)", beta)
    at_least("trainer.max_grad_norm", tr.max_grad_norm, 0)
    at_least("trainer.micro_batch_tokens", tr.micro_batch_tokens, 1)
    check(0 < tr.offload_ratio <= 1, "trainer.offload_ratio", "must be in (0, 1]", tr.offload_ratio)
    check(
        tr.offload_optimizer or tr.offload_ratio == 1,
        "trainer.offload_ratio",
        "only applies with trainer.offload_optimizer=true",
        tr.offload_ratio,
    )
    check(
        tr.offload_ratio == 1 or tr.zero_stage == 3,
        "trainer.offload_ratio",
        f"below 1 (partial offload) needs trainer.zero_stage=3, got zero_stage {tr.zero_stage}",
        tr.offload_ratio,
    )
    check(
        tr.zero_stage >= 1 or not tr.offload_optimizer,
        "trainer.offload_optimizer",
        "needs trainer.zero_stage >= 1",
        tr.offload_optimizer,
    )
    if tr.critic.enabled:
        positive("trainer.critic.lr", tr.critic.lr)
        at_least("trainer.critic.warmup_steps", tr.critic.warmup_steps, 0)

    _validate_reward(cfg, fail)
    _validate_lora(cfg, fail)
    _validate_environment(cfg, fail)
    _validate_placement(cfg, fail)
    _validate_evaluation(cfg, fail)

    # sync / logging / checkpoint
    at_least("sync.bucket_mb", cfg.sync.bucket_mb, 1)
    at_least("sync.audit_samples", cfg.sync.audit_samples, 1)
    if cfg.sync.audit_tolerance is not None:
        positive("sync.audit_tolerance", cfg.sync.audit_tolerance)
    at_least("logging.log_every", cfg.logging.log_every, 1)
    check(bool(cfg.logging.output_dir), "logging.output_dir", "must not be empty", cfg.logging.output_dir)
    _validate_trackers(cfg, fail)
    at_least("checkpoint.every", cfg.checkpoint.every, 0)
    at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 1)
    return cfg


def _validate_trackers(cfg: RunConfig, fail) -> None:
    """Each tracker named once, and its package installed (`mlflow` is an optional extra)."""
    from rlhf.config.optional import missing_package

    trackers = cfg.logging.trackers
    for name in trackers:
        if trackers.count(name) > 1:
            raise fail("logging.trackers", f"{name!r} is listed twice", trackers)
        if name == "wandb" and cfg.logging.wandb_mode == "disabled":
            continue
        missing = missing_package(name)
        if missing:
            raise fail("logging.trackers", f"{name} {missing}", trackers)


def _validate_algorithm_names(cfg: RunConfig, fail) -> None:
    """The `algorithm.*` names that select a registered piece (rlhf.algorithms.registry), and what the
    chosen advantage estimator needs."""
    from rlhf.algorithms.registry import (
        ADVANTAGE_ESTIMATORS,
        KL_ESTIMATORS,
        LOSS_AGGREGATIONS,
        OFF_POLICY_CORRECTIONS,
    )

    al = cfg.algorithm

    def known(key: str, value: str, registry, extra: tuple[str, ...] = ()) -> None:
        if value not in extra and value not in registry:
            raise fail(key, f"must be one of {', '.join((*registry.names(), *extra))}", value)

    known("algorithm.advantage", al.advantage, ADVANTAGE_ESTIMATORS)
    needs = ADVANTAGE_ESTIMATORS.get(al.advantage).attrs
    if needs.get("needs_critic") and not cfg.trainer.critic.enabled:
        raise fail(
            "algorithm.advantage",
            f"{al.advantage} needs a critic: set trainer.critic.enabled=true",
            al.advantage,
        )
    # Group-relative estimators: a group of one sample has no baseline to compare against.
    if needs.get("group_relative") and cfg.rollout.sampling.n < 2:
        raise fail(
            "rollout.sampling.n",
            f"{al.advantage} compares samples of a prompt: needs n >= 2",
            cfg.rollout.sampling.n,
        )
    known("algorithm.loss_agg", al.loss_agg, LOSS_AGGREGATIONS)
    known("algorithm.kl_estimator", al.kl_estimator, KL_ESTIMATORS)
    # `auto` is no correction of its own: it picks one (rlhf.algorithms.losses.off_policy_correction).
    known("algorithm.off_policy_correction", al.off_policy_correction, OFF_POLICY_CORRECTIONS, ("auto",))


def _validate_lora(cfg: RunConfig, fail) -> None:
    lora = cfg.trainer.lora
    if lora.rank < 0:
        raise fail("trainer.lora.rank", "must be > 0 (or 0: no LoRA)", lora.rank)
    if lora.rank == 0:
        return
    if lora.alpha is not None and not lora.alpha > 0:
        raise fail("trainer.lora.alpha", "must be > 0 (or null: 2 x rank)", lora.alpha)
    if not 0 <= lora.dropout < 1:
        raise fail("trainer.lora.dropout", "must be in [0, 1)", lora.dropout)
    if not lora.target_modules:
        raise fail("trainer.lora.target_modules", "must name at least one module (or `all-linear`)", [])
    names = linear_layer_names(cfg.model.path, cfg.model.trust_remote_code)
    if names is None:
        return  # the model is not a local directory: checked when the learner builds it
    for target in lora.target_modules:
        if target != "all-linear" and target.rsplit(".", 1)[-1] not in names:
            close = difflib.get_close_matches(target, sorted(names), n=1)
            hint = (
                f"did you mean {close[0]!r}?" if close else f"its linear layers: {', '.join(sorted(names))}"
            )
            raise fail(
                "trainer.lora.target_modules",
                f"{cfg.model.path} has no linear layer named so; {hint}",
                target,
            )


def linear_layer_names(
    model_path: str, trust_remote_code: bool = False, head: bool = True
) -> set[str] | None:
    """Short names (`q_proj`) of the linear layers of a local HF model (`head=False`: without the output
    head), built on the meta device (no weights read); None when `model_path` is no local HF directory."""
    if not (Path(model_path).expanduser() / "config.json").is_file():
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    output = None if head else model.get_output_embeddings()
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    }


def _validate_data(cfg: RunConfig, fail) -> None:
    source = cfg.data.source
    if not source:
        raise fail("data.source", "must not be empty", source)
    if source.startswith("builtin:"):
        if cfg.data.format != "columns":
            raise fail(
                "data.format",
                "applies to data files and hub datasets, not to a built-in task",
                cfg.data.format,
            )
        name = source.split(":", 1)[1]
        try:
            tasks = importlib.import_module("rlhf.tasks")
        except ModuleNotFoundError as exc:
            if exc.name != "rlhf.tasks":
                raise
            return  # the task registry is optional for validation
        known = sorted({*getattr(tasks, "TASKS", {}), *getattr(tasks, "LAZY_TASKS", {})})
        try:
            tasks.get_task(name)
        except (KeyError, ValueError):
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean 'builtin:{close[0]}'?" if close else f"; known: {', '.join(known)}"
            raise fail("data.source", f"unknown built-in task{hint}", source) from None
        return
    looks_local = source.startswith((".", "/", "~")) or source.endswith(DATA_FILE_SUFFIXES)
    if looks_local and not Path(source).expanduser().exists():
        raise fail(
            "data.source", "local data file not found (relative paths are from the working dir)", source
        )


def _validate_reward(cfg: RunConfig, fail) -> None:
    sources = cfg.reward.sources
    if not sources:
        raise fail("reward.sources", "needs at least one reward source", sources)
    if cfg.reward.batch_size < 1:
        raise fail("reward.batch_size", "must be >= 1", cfg.reward.batch_size)
    if cfg.reward.timeout_s is not None and not cfg.reward.timeout_s > 0:
        raise fail("reward.timeout_s", "must be > 0 (or null for no limit)", cfg.reward.timeout_s)
    for i, src in enumerate(sources):
        key = f"reward.sources[{i}]"
        if not math.isfinite(src.weight):
            raise fail(f"{key}.weight", "must be a finite number", src.weight)
        if src.kind == "rule":
            if src.name not in BUILTIN_RULES:
                problem = check_reward_function(src.name)
                if problem:
                    raise fail(f"{key}.name", problem, src.name)
        elif src.kind == "model":
            if not src.path:
                raise fail(f"{key}.path", "a model reward source needs a path", src.path)
        elif src.kind == "http" and not (src.url and src.url.startswith(("http://", "https://"))):
            raise fail(f"{key}.url", "an http reward source needs an http(s):// url", src.url)


def _validate_evaluation(cfg: RunConfig, fail) -> None:
    if cfg.evaluation.separate_engines and not cfg.evaluation.sets and cfg.data.num_eval == 0:
        raise fail(
            "evaluation.separate_engines",
            "there is nothing to evaluate (no evaluation.sets and data.num_eval is 0)",
            True,
        )
    names: set[str] = set()
    for i, es in enumerate(cfg.evaluation.sets):
        key = f"evaluation.sets[{i}]"
        if not es.name or not all(c.isalnum() or c in "_-." for c in es.name):
            raise fail(f"{key}.name", "must be a non-empty name of letters, digits, _ - .", es.name)
        if es.name in names:
            raise fail(f"{key}.name", "is already the name of another set", es.name)
        names.add(es.name)
        if es.source is not None:
            # (a built-in set ignores data.format, which is the training data's)
            set_data = dataclasses.replace(
                cfg, data=dataclasses.replace(cfg.data, source=es.source, format="columns")
            )
            _validate_data(
                set_data, lambda _k, problem, value, key=key: fail(f"{key}.source", problem, value)
            )
        if es.reward not in (*BUILTIN_RULES, "reward"):
            problem = check_reward_function(es.reward)
            if problem:
                raise fail(f"{key}.reward", problem.replace("use one of", "use reward, one of"), es.reward)
        if es.num_prompts is not None and es.num_prompts < 1:
            raise fail(f"{key}.num_prompts", "must be >= 1 (or null: every prompt)", es.num_prompts)
        if es.samples_per_prompt < 1:
            raise fail(f"{key}.samples_per_prompt", "must be >= 1", es.samples_per_prompt)
        if es.temperature is not None and es.temperature < 0:
            raise fail(f"{key}.temperature", "must be >= 0", es.temperature)
        if es.max_new_tokens is not None and not 1 <= es.max_new_tokens < cfg.rollout.max_model_len:
            raise fail(
                f"{key}.max_new_tokens", f"must be in 1..{cfg.rollout.max_model_len - 1}", es.max_new_tokens
            )
        for k in es.pass_k:
            if not 1 <= k <= es.samples_per_prompt:
                raise fail(
                    f"{key}.pass_k", f"each k must be in 1..samples_per_prompt ({es.samples_per_prompt})", k
                )


def _validate_environment(cfg: RunConfig, fail) -> None:
    """rollout.environment: the class imports, its args fit, its limits are sane, and its reward is used."""
    env = cfg.rollout.environment
    key = "rollout.environment"
    uses_env_rule = any(s.kind == "rule" and s.name == "env" for s in cfg.reward.sources)
    if env.name is None:
        if cfg.rollout.agent.function is not None:
            _validate_agent(cfg, fail, uses_env_rule)
        elif uses_env_rule:
            raise fail(
                "reward.sources",
                "rule 'env' needs a multi-turn environment or an agent: set rollout.environment.name "
                "or rollout.agent.function",
            )
        return
    if cfg.rollout.agent.function is not None:
        raise fail(
            "rollout.agent.function",
            "set either rollout.environment.name or rollout.agent.function, not both",
            cfg.rollout.agent.function,
        )
    from rlhf.environment import EnvError, check_environment_args, resolve_environment_class

    try:
        cls = resolve_environment_class(env.name)
    except EnvError as exc:
        raise fail(f"{key}.name", str(exc), env.name) from None
    try:
        check_environment_args(cls, env.args)
    except (EnvError, ValueError) as exc:
        raise fail(f"{key}.args", str(exc), env.args) from None
    if env.max_turns < 1:
        raise fail(f"{key}.max_turns", "must be >= 1", env.max_turns)
    if env.max_tokens < 1:
        raise fail(f"{key}.max_tokens", "must be >= 1", env.max_tokens)
    if not env.step_timeout_s > 0:
        raise fail(f"{key}.step_timeout_s", "must be > 0", env.step_timeout_s)
    if not env.tool_timeout_s > 0:
        raise fail(f"{key}.tool_timeout_s", "must be > 0", env.tool_timeout_s)
    if env.tools and env.step_timeout_s <= env.tool_timeout_s:
        raise fail(
            f"{key}.step_timeout_s",
            f"must exceed tool_timeout_s ({env.tool_timeout_s:g}): a step runs the turn's tool calls",
            env.step_timeout_s,
        )
    if env.tool_memory_mb < 64:
        raise fail(
            f"{key}.tool_memory_mb",
            "must be >= 64 (the Python interpreter alone needs ~30 MB)",
            env.tool_memory_mb,
        )
    for i, tool in enumerate(env.tools):
        problem = check_tool_name(tool)
        if problem:
            raise fail(f"{key}.tools[{i}]", problem, tool)
    if getattr(cls, "needs_tools", False) and not env.tools:
        raise fail(f"{key}.tools", f"environment {env.name!r} calls tools: list at least one", env.tools)
    missing = [t for t in getattr(cls, "required_tools", ()) if t not in env.tools]
    if missing:
        raise fail(
            f"{key}.tools", f"environment {env.name!r} needs the tool(s) {', '.join(missing)}", env.tools
        )
    if not uses_env_rule:
        raise fail(
            "reward.sources",
            "the environment's rewards would be ignored: add {kind: rule, name: env} (docs/agents.md)",
        )


def check_tool_name(name: str) -> str | None:
    """None if `name` is a built-in tool or an importable `pkg.mod:fn` callable, else the problem."""
    if name in ("python", "calculator"):
        return None
    if ":" not in name:
        return "unknown tool; use python, calculator or a 'pkg.module:function' path"
    return check_reward_function(name)


def check_reward_function(name: str) -> str | None:
    """None if `name` is a builtin rule or an importable `pkg.mod:fn` callable, else the problem."""
    if ":" not in name:
        return f"unknown rule; use one of {', '.join(BUILTIN_RULES)} or a 'pkg.module:function' path"
    from rlhf.user_code import DottedPathError, import_object

    try:
        target = import_object(name)
    except DottedPathError as exc:
        return str(exc)
    if not callable(target):
        return f"'{name}' is not callable"
    return None


def _validate_placement(cfg: RunConfig, fail) -> None:
    pl = cfg.placement
    for role in ROLES:
        rp = getattr(pl, role)
        key = f"placement.{role}"
        if rp.replicas < 1:
            raise fail(f"{key}.replicas", "must be >= 1", rp.replicas)
        if rp.gpus < 0:
            raise fail(f"{key}.gpus", "must be >= 0", rp.gpus)
        if rp.gpus > 1 and not float(rp.gpus).is_integer():
            raise fail(f"{key}.gpus", "above 1 must be a whole number of GPUs", rp.gpus)
        if rp.cpus < 0:
            raise fail(f"{key}.cpus", "must be >= 0", rp.cpus)
        for name, amount in rp.resources.items():
            if amount < 0:
                raise fail(f"{key}.resources.{name}", "must be >= 0", amount)
    seen: dict[str, int] = {}
    for g, group in enumerate(pl.colocate):
        key = f"placement.colocate[{g}]"
        if not group:
            raise fail(key, "empty colocation group", group)
        for role in group:
            if role not in ROLES:
                close = difflib.get_close_matches(role, ROLES, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; roles: {', '.join(ROLES)}"
                raise fail(key, f"unknown role '{role}'{hint}", group)
            if role in seen:
                where = (
                    "twice in this group" if seen[role] == g else f"also in placement.colocate[{seen[role]}]"
                )
                raise fail(key, f"role '{role}' appears {where}", group)
            seen[role] = g
        explicit = sum(getattr(pl, r).gpus for r in group if 0 < getattr(pl, r).gpus < 1)
        if explicit > 1 + 1e-9:
            raise fail(key, f"fractional gpus of colocated roles sum to {explicit:g} > 1 per GPU", group)
        if (
            cfg.rollout.max_staleness > 0
            and {"rollout", "learner"} <= set(group)
            and resolve_device(cfg) == "cuda"
        ):
            raise fail(
                key,
                "rollout.max_staleness >= 1 overlaps generation with training, which needs the rollout and "
                "the learner on different GPUs; drop this colocation or set rollout.max_staleness=0",
                group,
            )


def _checkpoint_quantization(model_path: str) -> str | None:
    """The quantization method in a local checkpoint's config.json (`quantization_config`), if any."""
    import json

    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None  # a hub name: the engine finds out when it loads
    try:
        quant = json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None
    return str(quant.get("quant_method", "unknown")) if isinstance(quant, dict) else None


def _validate_quantization(cfg: RunConfig, fail) -> None:
    """`rollout.quantization: fp8` quantizes a bf16 policy in GPU engines, online: what rules it out at
    validate time (the GPUs themselves are checked where they are known: here if the driver sees them,
    else when each engine starts)."""
    ro = cfg.rollout
    if ro.quantization == "none":
        return
    key = "rollout.quantization"
    if resolve_device(cfg) == "cpu":
        raise fail(
            key, "fp8 needs GPU engines (vLLM's CPU build has no online FP8 quantization)", ro.quantization
        )
    if "quantization" in ro.vllm_kwargs:
        raise fail(key, "set either this or rollout.vllm_kwargs.quantization, not both", ro.quantization)
    checkpoint = _checkpoint_quantization(cfg.model.path)
    if checkpoint is not None:
        raise fail(
            key,
            f"the checkpoint is already quantized ({checkpoint} in {cfg.model.path}/config.json); fp8 "
            "quantizes a bf16/fp16 policy",
            ro.quantization,
        )
    import torch

    if torch.cuda.is_available():
        low = [i for i in range(torch.cuda.device_count()) if torch.cuda.get_device_capability(i) < (8, 0)]
        if low:
            raise fail(
                key, f"fp8 needs GPUs of compute capability >= 8.0; GPU {low[0]} is below", ro.quantization
            )


def _validate_agent(cfg: RunConfig, fail, uses_env_rule: bool) -> None:
    """rollout.agent: the function imports and takes (prompt, base_url, **args); sane limits; its
    reward is used."""
    agent = cfg.rollout.agent
    key = "rollout.agent"
    from rlhf.user_code import AgentError, check_agent_args, load_agent_function

    try:
        fn = load_agent_function(agent.function)
    except AgentError as exc:
        raise fail(f"{key}.function", str(exc), agent.function) from None
    try:
        check_agent_args(fn, agent.args)
    except AgentError as exc:
        raise fail(f"{key}.args", str(exc), agent.args) from None
    if not agent.timeout_s > 0:
        raise fail(f"{key}.timeout_s", "must be > 0", agent.timeout_s)
    if agent.max_calls < 1:
        raise fail(f"{key}.max_calls", "must be >= 1", agent.max_calls)
    if not agent.host:
        raise fail(f"{key}.host", "must be an address to listen on, e.g. 127.0.0.1", agent.host)
    if not uses_env_rule:
        raise fail(
            "reward.sources",
            "the agent's rewards would be ignored: add {kind: rule, name: env} (docs/agents.md)",
        )
