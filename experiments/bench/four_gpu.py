"""The 1.5B shape on one 4-GPU host, planned by `rlhf plan` and run as planned.

Layout (tests/test_placement.py FOUR_GPU_RUN): the rollout on two GPUs (`--rollout two_engines`: two
engines, or `tp2`: one engine with tensor_parallel=2), a ZeRO-3 learner over the other two, the
reference model (algorithm.kl_coef=0.05) and a reward model (a random sequence classifier of the
0.5B shape with the policy's tokenizer) colocated with the learner. The step workload is bench_step
part (c)'s (`rlhf_steps`: same prompts, sampling, micro batches; the first step is the warm-up).

One run (in this process), on a GPU host:

  python experiments/bench/four_gpu.py --out $OUT/sync --rollout two_engines --staleness 0 --eager

records the plan (`rlhf plan` on this machine, and the plan the Trainer made on the Ray cluster),
per-GPU used memory sampled with nvidia-smi every 200 ms (peak next to the plan's estimate for that
GPU, paired through the CUDA UUIDs the learners and engine workers report), step time, tokens/s,
generate/train/sync seconds and the ZeRO-3 gather and NCCL broadcast GB/s of the weight sync.

The whole measurement in ONE command (each run a fresh process; a shared time budget; runs that
no longer fit are skipped and said so; the combined JSON and markdown are rewritten after each run):

  python experiments/bench/four_gpu.py --out $OUT/four_gpu --runs sync,async,gpu2,gpu1 --budget 500 --eager

  sync   the 4-GPU layout, rollout.max_staleness=0
  async  the 4-GPU layout, rollout.max_staleness=1
  gpu2   our 2-GPU figure of the same shape and workload:
           bench_step.py --shape qwen2.5-1.5b --parts c --sleep --gpus 2 <workload> [--eager]
  gpu1   our 1-GPU figure:
           bench_step.py --shape qwen2.5-1.5b --parts c --sleep <workload> [--eager]
  (both colocated ZeRO-2 with kl_coef=0 and a rule reward: the reference and reward-model passes of
  the 4-GPU runs are extra work there, shown in their breakdown as ref_logprobs and reward)

It writes DIR/four_gpu.json (runs + `summary_entries` in the shape of
experiments/results/gpu/summary.json) and DIR/four_gpu.md. CPU check of everything but the GPU part:

  python experiments/bench/four_gpu.py --dry-run --out /tmp/four_gpu_dry
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from experiments.bench.bench_step import (  # noqa: E402
    SHAPES,
    build_model_dir,
    device_name,
    rlhf_steps,
    summarise,
    write_prompts,
)
from experiments.bench.gpu_memory import (  # noqa: E402
    GpuSampler,
    pair_with_plan,
    parse_samples,
    wait_gpus_free,
)

RM_SHAPE = "qwen2.5-0.5b"
TINY = dict(  # for --dry-run and the tests: same structure, seconds to build on a CPU
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=1000,
    tie_word_embeddings=True,
    attention_bias=True,
)
SHAPES.setdefault("tiny", TINY)
CACHE = Path(os.environ.get("RLHF_BENCH_CACHE", "/tmp/rlhf-bench"))  # bench_step's model cache too
ROLLOUT_LAYOUTS = {
    "two_engines": ["rollout.tensor_parallel=1", "placement.rollout.replicas=2"],
    "tp2": ["rollout.tensor_parallel=2", "placement.rollout.replicas=1"],
}


# ----------------------------------------------------------------------------------------- models
def build_reward_dir(spec: dict, out: Path, tokenizer_dir: Path) -> Path:
    """Random sequence classifier (num_labels=1, bf16) of `spec`, with the policy's tokenizer files.

    A Qwen2 network written as a Llama config with attention biases, like bench_step's policy: a
    `qwen2` model type would make AutoTokenizer pick Qwen2Tokenizer, which cannot read the word-level
    tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    eos = spec["vocab_size"] - 1
    cfg = LlamaConfig(
        **{"attention_bias": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6, **spec},
        max_position_embeddings=4096,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=spec["vocab_size"] - 2,  # the classifier pools the last non-pad token
        num_labels=1,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(1)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForSequenceClassification(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


def model_dirs(shape: str, rm_shape: str) -> tuple[Path, Path]:
    return CACHE / shape, CACHE / f"rm-{rm_shape}"


def ensure_models(shape: str, rm_shape: str) -> tuple[Path, Path]:
    """Builds both directories in a child process: building on the GPU leaves a CUDA context and
    cached blocks in the builder, which would count in this process's measured memory."""
    policy, rm = model_dirs(shape, rm_shape)
    if not ((policy / "config.json").exists() and (rm / "config.json").exists()):
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            __file__,
            "--build-only",
            f"--out={CACHE}",
            f"--shape={shape}",
            f"--rm-shape={rm_shape}",
        ]
        subprocess.run(cmd, check=True)
        print(f"models built in {time.perf_counter() - t0:.0f}s", flush=True)
    return policy, rm


def build_models(shape: str, rm_shape: str) -> tuple[Path, Path]:
    policy, rm = model_dirs(shape, rm_shape)
    build_model_dir(shape, policy)
    build_reward_dir(SHAPES[rm_shape], rm, policy)
    return policy, rm


# ----------------------------------------------------------------------------------------- config
def layout_overrides(rm_dir: str, rollout: str) -> list[str]:
    """The 4-GPU layout on top of bench_step's part (c) overrides."""
    return [
        "trainer.zero_stage=3",
        "algorithm.kl_coef=0.05",
        f"reward.sources=[{{kind: model, path: '{rm_dir}'}}]",
        "placement.learner.replicas=2",
        "placement.colocate=[[learner, reference, reward_model]]",
        *ROLLOUT_LAYOUTS[rollout],
    ]


def run_args(args: argparse.Namespace, rm_dir: str) -> argparse.Namespace:
    """The namespace bench_step.rlhf_steps reads (gpu_layout: 4 GPUs disaggregated = the rollout on
    two, the learner on two; the layout overrides say the same explicitly)."""
    extra = list(args.override)
    if args.audit_every is not None:
        extra.append(f"sync.audit_every={args.audit_every}")
    return argparse.Namespace(
        shape=args.shape,
        workload="fixed",
        prompts=args.prompts,
        n=args.n,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        steps=args.steps,
        mode="disaggregated",
        gpus=4,
        tp=2 if args.rollout == "tp2" else 1,
        zero=3,
        staleness=args.staleness,
        offload_ratio=None,
        lr=None,  # bench_step.learning_rate: the shared default
        quantization="none",
        sleep_level=1,
        transport="auto",
        bucket_mb=args.bucket_mb,
        util=args.util,
        sleep=False,
        eager=args.eager,
        micro_batch_tokens=args.micro_batch_tokens,
        out=args.out,
        override=layout_overrides(rm_dir, args.rollout) + extra,
    )


def config_of_run(model_dir: str, prompts_file: str, rargs: argparse.Namespace):
    """(recipe, overrides, RunConfig) that bench_step.rlhf_steps builds for `rargs`, nothing started:
    its own override list, so the plan and the dry run check exactly what the GPU run will load."""
    import rlhf.config.loader
    import rlhf.loop.driver

    seen: dict = {}
    real = rlhf.config.loader.load_config

    def load(recipe, overrides):
        seen["recipe"], seen["overrides"] = str(recipe), list(overrides)
        return real(recipe, overrides)

    class _Stop(Exception):
        pass

    def capture(cfg):
        seen["cfg"] = cfg
        raise _Stop

    with (
        mock.patch.object(rlhf.config.loader, "load_config", load),
        mock.patch.object(rlhf.loop.driver, "Trainer", capture),
        contextlib.suppress(_Stop),
    ):
        rlhf_steps(model_dir, prompts_file, rargs)
    return seen["recipe"], seen["overrides"], seen["cfg"]


# ----------------------------------------------------------------------------------------- one run
def cli_plan(recipe: str, overrides: list[str], timeout: float = 90) -> str:
    """`rlhf plan RECIPE OVERRIDES` in a child process (its inventory: this machine's GPUs)."""
    cmd = [sys.executable, "-m", "rlhf.cli.main", "plan", recipe, *overrides]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return f"$ rlhf plan ...: timed out after {timeout:g}s"
    return (
        f"$ rlhf plan {recipe} {shlex.join(overrides)}\n(exit {p.returncode})\n{p.stdout}{p.stderr[-3000:]}"
    )


def one_run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    policy, rm = ensure_models(args.shape, args.rm_shape)
    prompts = write_prompts(
        out / "prompts.jsonl", [args.prompt_len] * (args.prompts * 4), SHAPES[args.shape]["vocab_size"]
    )
    rargs = run_args(args, str(rm))
    recipe, overrides, _ = config_of_run(str(policy), str(prompts), rargs)
    result: dict = {
        "kind": "four_gpu",
        "device": device_name_nvidia_smi(),
        "rollout": args.rollout,
        "max_staleness": args.staleness,
        "args": {**vars(rargs), "shape": args.shape, "rm_shape": args.rm_shape, "rollout": args.rollout},
        "command": " ".join(sys.argv),
        "overrides": overrides,
    }
    save = lambda: (out / "result.json").write_text(json.dumps(result, indent=2, default=str))  # noqa: E731
    if not args.no_cli_plan:
        result["rlhf_plan_cli"] = cli_plan(recipe, overrides)
        (out / "plan_cli.txt").write_text(result["rlhf_plan_cli"])
        print(result["rlhf_plan_cli"], flush=True)
    save()

    import rlhf.loop.driver

    sampler = GpuSampler(out / "gpu_samples.csv", args.sample_ms).start()
    real_start = rlhf.loop.driver.Trainer.start_roles
    kept: dict = {}  # the Trainer's plan, for the pairing at the end

    def start_roles(trainer):
        roles = real_start(trainer)
        sampler.mark("roles")
        plan = roles.placement.plan
        result["plan_text"] = plan.describe()
        (out / "plan.txt").write_text(result["plan_text"])
        result["plan_gpu_estimates"] = {
            f"{n} gpu {g}": [round(u, 2), c] for (n, g), (u, c) in sorted(plan.gpu_memory_usage().items())
        }
        try:
            result["learner_uuids"], result["worker_uuids"] = roles.sync._gpus()
        except Exception as exc:  # noqa: BLE001  (pairing falls back to indices)
            result["uuid_error"] = repr(exc)
        result["roles_ready_s"] = time.perf_counter() - t_start
        kept["plan"] = plan
        save()
        sampler.mark("steps")
        return roles

    try:
        with mock.patch.object(rlhf.loop.driver.Trainer, "start_roles", start_roles):
            result["rlhf"] = rlhf_steps(str(policy), str(prompts), rargs)
    finally:
        peaks = sampler.stop()
        result["memory_samples"] = peaks
        plan = kept.get("plan")
        if plan is not None:
            result["memory"] = pair_with_plan(
                plan, peaks["all"], result.get("learner_uuids"), result.get("worker_uuids")
            )
            if "steps" in peaks:
                for row, srow in zip(
                    result["memory"],
                    pair_with_plan(
                        plan, peaks["steps"], result.get("learner_uuids"), result.get("worker_uuids")
                    ),
                ):
                    row["measured_peak_steps_gb"] = srow.get("measured_peak_gb")
        result["wall_s"] = time.perf_counter() - t_start
        save()
    result["summary"] = summarise(result, rargs)
    result["summary"].update(sync_rates(result["summary"], result["rlhf"]["sync_alone"]))
    result["gpus"] = len(peaks["all"]) or None
    save()
    print(json.dumps(result["summary"], indent=2), flush=True)
    print(json.dumps(result.get("memory"), indent=1), flush=True)
    return result


def sync_rates(summary: dict, pushes: list[dict]) -> dict:
    """GB/s of the ZeRO-3 gather (learner ranks -> full tensors on rank 0) and of the NCCL broadcast
    (rank 0 -> engine workers): the full model's bytes over the medians of the pushes timed alone."""
    phases = summary.get("sync_phases_s", {})
    size = pushes[0].get("sync/bytes", 0.0) if pushes else 0.0
    rate = lambda s: size / s / 1e9 if s and size else None  # noqa: E731
    return {
        "sync_bytes": size,
        "gather_gbps": rate(phases.get("learner_gather_s")),
        "broadcast_gbps": rate(phases.get("learner_send_s")),
    }


def device_name_nvidia_smi() -> str:
    """The GPU's name without a CUDA context in this (driver) process, which would count as memory."""
    if shutil.which("nvidia-smi"):
        p = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        names = p.stdout.strip().splitlines()
        if names:
            return names[0].strip()
    return device_name()


# ----------------------------------------------------------------------------------------- several runs
WORKLOAD = ("prompts", "n", "prompt_len", "new_tokens", "steps", "micro_batch_tokens", "util", "bucket_mb")


def workload_flags(args: argparse.Namespace) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in WORKLOAD]
    return flags + (["--eager"] if args.eager else [])


def run_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """The command of each named run (`--runs`); every one gets the same shape and workload."""
    me = [
        sys.executable,
        __file__,
        f"--shape={args.shape}",
        f"--rm-shape={args.rm_shape}",
        f"--rollout={args.rollout}",
    ]
    me += [f"--sample-ms={args.sample_ms}", *(["--override", *args.override] if args.override else [])]
    bench = [
        sys.executable,
        str(REPO / "experiments/bench/bench_step.py"),
        f"--shape={args.shape}",
        "--parts=c",
        "--sleep",
    ]
    return {
        "sync": [*me, "--staleness=0", *workload_flags(args)],
        "async": [*me, "--staleness=1", "--no-cli-plan", *workload_flags(args)],
        "gpu2": [*bench, "--gpus=2", *workload_flags(args)],
        "gpu1": [*bench, "--gpus=1", *workload_flags(args)],
    }


def stop_ray() -> None:
    """After a run that was killed or failed: its Ray processes (and their GPU memory) may remain."""
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    if Path(ray).exists():
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=60)


def run_child(cmd: list[str], run_dir: Path, timeout: float) -> tuple[object, float]:
    """Runs `cmd` in its own process session, log to run_dir/log.txt and the console; kills it at `timeout`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )

    def copy(log):
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)

    with open(run_dir / "log.txt", "w") as log:
        # a reader thread: processes the run leaves behind may hold the pipe open after it ends
        reader = threading.Thread(target=copy, args=(log,), daemon=True)
        reader.start()
        try:
            rc, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        reader.join(timeout=10)
    return ("timeout" if timed_out else rc), time.perf_counter() - t0


def step_lines(log: str) -> list[dict]:
    """The per-step JSON lines rlhf_steps prints: what a killed run still tells."""
    steps = []
    for line in log.splitlines():
        if line.startswith("{") and '"time/step_s"' in line:
            with contextlib.suppress(ValueError):
                steps.append(json.loads(line))
    return steps


def matrix(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    combined: dict = {"device": device_name_nvidia_smi(), "budget_s": args.budget, "runs": {}, "skipped": {}}
    write = lambda: write_reports(out, combined, args.record)  # noqa: E731
    ensure_models(args.shape, args.rm_shape)
    combined["build_s"] = time.perf_counter() - t0
    commands = run_commands(args)
    for i, name in enumerate(args.runs.split(",")):
        left = deadline - time.perf_counter()
        if left < args.min_run_s:
            combined["skipped"][name] = f"{left:.0f}s of the budget left, a run needs ~{args.min_run_s:g}s"
            print(f"== {name}: skipped ({combined['skipped'][name]})", flush=True)
            write()
            continue
        if i:
            wait_gpus_free()
        run_dir = out / name
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = commands[name] + [f"--out={run_dir}"]
        print(f"== {name} ({left:.0f}s left): {shlex.join(cmd)}", flush=True)
        # the 4-GPU runs sample memory themselves; for the baselines this process does
        sampler = (
            GpuSampler(run_dir / "gpu_samples.csv", args.sample_ms).start()
            if name.startswith("gpu")
            else None
        )
        rc, wall = run_child(cmd, run_dir, max(left - 5, 1))
        entry: dict = {"command": shlex.join(cmd), "rc": rc, "wall_s": round(wall, 1)}
        if sampler is not None:
            entry["memory_peaks"] = sampler.stop()["all"]
        result = run_dir / "result.json"
        if result.exists():
            data = json.loads(result.read_text())
            entry.update(data)
        if rc != 0:
            log = (run_dir / "log.txt").read_text()
            entry["log_tail"] = log[-6000:]
            entry["steps_from_log"] = step_lines(log)
            if (run_dir / "gpu_samples.csv").exists() and "memory_samples" not in entry:
                entry["memory_peaks"] = parse_samples((run_dir / "gpu_samples.csv").read_text())
            stop_ray()
        combined["runs"][name] = entry
        write()
        print(f"== {name}: rc={rc} in {wall:.0f}s; summary {json.dumps(entry.get('summary'))}", flush=True)
    combined["wall_s"] = time.perf_counter() - t0
    write()
    return combined


# ----------------------------------------------------------------------------------------- reports
def summary_entry(name: str, run: dict, record: str) -> dict | None:
    """A run as an experiments/results/gpu/summary.json entry (None without a summary)."""
    s, a = run.get("summary"), run.get("args", {})
    if not s:
        return None
    parts = s["breakdown_s"]
    r = lambda x, d=3: None if x is None else round(x, d)  # noqa: E731
    four = run.get("kind") == "four_gpu"
    rates = sync_rates(s, run.get("rlhf", {}).get("sync_alone") or []) if "gather_gbps" not in s else s
    e = {
        "record": record,
        "source": f"{record}/four_gpu.json:{name}",
        "device": run.get("device"),
        "gpus": 4 if four else a.get("gpus"),
        "mode": "disaggregated_4gpu" if four else a.get("mode"),
        "layout": (
            f"rollout {run['rollout']} on 2 GPUs; ZeRO-3 learner x2 + reference + reward model on 2 GPUs"
            if four
            else f"{a.get('gpus')} GPU(s) colocated, rollout sleeps while training"
        ),
        "tensor_parallel": a.get("tp", 1),
        "zero_stage": a.get("zero", 2),
        "max_staleness": a.get("staleness", 0),
        "eager": a.get("eager"),
        "workload": {k: a.get(k) for k in ("shape", "prompts", "n", "prompt_len", "new_tokens", "steps")},
        "step_s": r(s["step_s"]),
        "tokens_per_s": r(s["end_to_end_tokens_per_s"], 0),
        "generate_s": r(parts.get("generate")),  # async: producer side, not in the step
        "train_s": r(parts.get("train")),
        "sync_s": r(parts.get("sync")),
        "ref_logprobs_s": r(parts.get("ref_logprobs")),
        "reward_s": r(parts.get("reward")),
        "sync_alone_s": r(s.get("sync_alone_s"), 4),
        "sync_gbps": r(s.get("sync_gbps"), 2),
        "gather_gbps": r(rates.get("gather_gbps"), 2),
        "broadcast_gbps": r(rates.get("broadcast_gbps"), 2),
        "audit_logprob_diff": r(s.get("audit_logprob_diff"), 4) if s.get("audit_logprob_diff") else None,
    }
    if four and run.get("memory"):
        e["memory_gb"] = [
            {
                k: m.get(k)
                for k in ("gpu_index", "roles", "estimate_gb", "measured_peak_gb", "measured_over_estimate")
            }
            for m in run["memory"]
        ]
    return e


def write_reports(out: Path, combined: dict, record: str) -> None:
    entries = [e for name, run in combined["runs"].items() if (e := summary_entry(name, run, record))]
    combined["summary_entries"] = entries
    (out / "four_gpu.json").write_text(json.dumps(combined, indent=1, default=str))
    (out / "four_gpu.md").write_text(markdown(combined))


def markdown(combined: dict) -> str:
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [
        f"# 1.5B shape on one 4-GPU host ({combined.get('device')})",
        "",
        "| run | GPUs | layout | staleness | step s | tokens/s | generate s | train s | sync s | "
        "gather GB/s | broadcast GB/s | audit diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {e["source"].rsplit(":", 1)[1]: e for e in combined.get("summary_entries", [])}
    for name, e in names.items():
        cells = [e["gpus"], e["layout"], e["max_staleness"], e["step_s"], e["tokens_per_s"], e["generate_s"]]
        cells += [e["train_s"], e["sync_s"], e["gather_gbps"], e["broadcast_gbps"], e["audit_logprob_diff"]]
        lines.append(f"| {name} | " + " | ".join(fmt(c) for c in cells) + " |")
    for name, run in combined["runs"].items():
        if name not in names:
            lines.append(
                f"| {name} | failed: rc={run.get('rc')} after {run.get('wall_s')} s (log tail in four_gpu.json) |"
            )
    for name, why in combined.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} |")
    for name, run in combined["runs"].items():
        if not run.get("memory"):
            continue
        lines += ["", f"## {name}: plan estimate vs measured peak per GPU (nvidia-smi memory.used)", ""]
        lines += [
            "| GPU | plan GPU | roles | estimate GB | peak GB | peak in steps GB | peak / estimate |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in run["memory"]:
            cells = [m.get("gpu_index"), m["plan_gpu"], ", ".join(m["roles"]), m["estimate_gb"]]
            cells += [
                m.get("measured_peak_gb"),
                m.get("measured_peak_steps_gb"),
                m.get("measured_over_estimate"),
            ]
            lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
        if run.get("plan_text"):
            lines += ["", "Plan (the Trainer's, on the Ray cluster):", "", "```", run["plan_text"], "```"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- dry run
def dry_run(args: argparse.Namespace) -> dict:
    """Everything up to the GPU on a CPU: tiny model dirs (the reward model loaded and scoring with
    our reward-model class), the overrides rlhf_steps builds, load_config, and make_plan of the
    1.5B shape on the h100x4 inventory (a config-only 1.5B/0.5B model dir gives the plan its sizes)."""
    from rlhf.reward.model import RewardModelActor

    from rlhf.placement import load_inventory, make_plan

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    global CACHE
    CACHE = out / "models"
    tiny_policy, tiny_rm = build_models("tiny", "tiny")
    scores = RewardModelActor(str(tiny_rm)).score(["t1 t2", "t3"], [" t4", " t5 t6"])
    print(f"tiny reward model {tiny_rm}: scores {scores}", flush=True)
    # config-only directories of the real shapes: what the planner reads
    sizes = {}
    for name, shape in (("policy", args.shape), ("rm", args.rm_shape)):
        d = out / f"config-only-{name}-{shape}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({**SHAPES[shape], "model_type": "llama"}))
        sizes[name] = d
    prompts = write_prompts(
        out / "prompts.jsonl", [args.prompt_len] * (args.prompts * 4), SHAPES[args.shape]["vocab_size"]
    )
    result = {"reward_scores": scores, "plans": {}}
    for rollout in ROLLOUT_LAYOUTS:
        for staleness in (0, 1):
            args.rollout, args.staleness = rollout, staleness
            recipe, overrides, cfg = config_of_run(
                str(sizes["policy"]), str(prompts), run_args(args, str(sizes["rm"]))
            )
            inventory = load_inventory(REPO / "configs/inventories/h100x4.yaml")
            plan = make_plan(cfg, inventory)
            key = f"{rollout}/staleness{staleness}"
            result["plans"][key] = {"overrides": overrides, "plan": plan.describe()}
            print(
                f"== {key}\n$ rlhf plan {recipe} {shlex.join(overrides)} --inventory configs/inventories/h100x4.yaml"
            )
            print(plan.describe(), flush=True)
            # the pairing and the report, on fake samples: 1 GB over each estimate
            fake = {
                g: {"uuid": f"GPU-{g}", "mib": (u + 1) * 1e9 / 2**20, "total_mib": 81559, "samples": 1}
                for (_, g), (u, _) in plan.gpu_memory_usage().items()
            }
            result["plans"][key]["memory"] = pair_with_plan(plan, fake)
    (out / "dry_run.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"dry run ok: {out / 'dry_run.json'}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--rm-shape", default=RM_SHAPE, choices=sorted(SHAPES))
    ap.add_argument("--rollout", default="two_engines", choices=sorted(ROLLOUT_LAYOUTS))
    ap.add_argument("--staleness", type=int, default=0, help="rollout.max_staleness: 1 = asynchronous")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="the first is the warm-up, not counted")
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--util", type=float, default=0.5, help="rollout.gpu_memory_utilization")
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--eager", action="store_true", help="rollout.enforce_eager: no vLLM compile at start")
    ap.add_argument(
        "--audit-every", type=int, help="sync.audit_every (asynchronous default: every 10th step)"
    )
    ap.add_argument("--sample-ms", type=int, default=200)
    ap.add_argument("--override", nargs="*", default=[])
    ap.add_argument("--no-cli-plan", action="store_true", help="skip the `rlhf plan` child process")
    ap.add_argument("--runs", help="several runs in child processes, e.g. sync,async,gpu2,gpu1")
    ap.add_argument("--budget", type=float, default=500, help="--runs: seconds for all of them")
    ap.add_argument("--min-run-s", type=float, default=140, help="--runs: do not start a run with less left")
    ap.add_argument("--record", default="four_gpu", help="results folder name used in the summary entries")
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny models, the plan on h100x4.yaml, exit")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build_models(args.shape, args.rm_shape)
    elif args.dry_run:
        dry_run(args)
    elif args.runs:
        matrix(args)
    else:
        one_run(args)


if __name__ == "__main__":
    main()
