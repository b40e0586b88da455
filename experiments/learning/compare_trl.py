"""Ours against TRL's GRPOTrainer on the same model, prompts, budget and checker; one greedy evaluation.

For each seed, our trainer (`python -m rlhf train configs/quickstart.yaml` with the shared budget as
overrides, and any ablation variants) and TRL (trl_baseline.py, TRL from an experiment-only path)
train on the same train pool in the same per-step batches; then greedy_eval.py scores the base model
and every final (and mid-run) policy on a fixed held-out set with one vLLM engine. Every run is a
process of its own with a timeout, so a failure keeps the others. State lives in --work and is merged
across invocations (a 10-minute GPU call can do part of the runs); --out gets summary.json,
train_reward.png and compare_trl.log, rewritten after every run. See README.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from experiments.learning import prompts as P
from experiments.learning import summary as S

REPO = Path(__file__).resolve().parents[2]
SHARED_KEYS = (
    "steps",
    "prompts_per_step",
    "n",
    "max_new_tokens",
    "lr",
    "temperature",
    "held_out",
    "device",
    "model",
)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts-per-step", type=int, default=32)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--held-out", type=int, default=256, help="held-out prompts (never trained on)")
    ap.add_argument("--mid-step", type=int, default=None, help="also evaluate here (default steps/2; 0: no)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--only", choices=["ours", "trl"], default=None)
    ap.add_argument("--ours-override", nargs="+", action="extend", default=[], metavar="K=V")
    ap.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", '"K=V K=V"'),
                    help="an extra variant of ours (label ours:NAME), run for every seed")  # fmt: skip
    ap.add_argument(
        "--trl-arg", nargs="+", action="extend", default=[], metavar="K=V", help="GRPOConfig extras"
    )
    ap.add_argument(
        "--trl-micro-batch", type=int, default=None, help="default 64 on cuda, the whole batch on cpu"
    )
    ap.add_argument("--trl-path", default="/tmp/trl-site", help="prepended to PYTHONPATH for TRL only")
    ap.add_argument("--timeout", type=float, default=1500, help="seconds per run (and for the evaluation)")
    ap.add_argument("--work", default="/tmp/compare_trl", help="runs, checkpoints and merged state")
    ap.add_argument("--out", default=str(REPO / "experiments/results/learning"))
    ap.add_argument("--fresh", action="store_true", help="wipe --work first")
    ap.add_argument("--force", action="store_true", help="rerun runs already done in --work")
    ap.add_argument(
        "--merge-from",
        nargs="+",
        default=[],
        metavar="WORK",
        help="first take the finished runs (and evaluations) of these --work dirs' state.json: runs of one "
        "comparison made in parallel, one --work per GPU, then scored together. A summary.json file (a "
        "recorded comparison) merges the same way, except that this evaluation scores the base model again",
    )
    ap.add_argument(
        "--variants-only",
        action="store_true",
        help="train only the --variant runs of ours (the default ours runs are recorded elsewhere)",
    )
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mid_step is None:
        args.mid_step = args.steps // 2 or None
    args.mid_step = args.mid_step or None
    return args


class Log:
    """Orchestrator lines to the console and to --out/compare_trl.log (run logs stay in --work)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def run_process(cmd: list[str], log_file: Path, timeout: float, env: dict) -> tuple[int | str, float]:
    """Run in a new process session (its Ray/vLLM children die with it on timeout); output to log_file."""
    t0 = time.perf_counter()
    with log_file.open("w") as sink:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    return rc, time.perf_counter() - t0


def child_env(extra_path: str | None = None) -> dict:
    env = dict(os.environ)
    parts = [str(REPO), *([extra_path] if extra_path else []), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_MODE", "disabled")
    return env


def ours_overrides(args, seed: int, train_file: Path, run_root: Path, extra: list[str]) -> list[str]:
    """The shared budget in our config keys (rlhf/config/schema.py), then the device, then the variant."""
    steps, mid = args.steps, args.mid_step
    out = [
        f"model.path={args.model}",
        f"steps={steps}",
        f"rollout.prompts_per_step={args.prompts_per_step}",
        f"rollout.sampling.n={args.n}",
        f"rollout.sampling.temperature={args.temperature}",
        f"rollout.sampling.max_new_tokens={args.max_new_tokens}",
        f"trainer.lr={args.lr}",
        "trainer.min_lr_ratio=1.0",
        "trainer.warmup_steps=0",
        "algorithm.kl_coef=0.0",
        "algorithm.clip_low=0.2",
        "algorithm.clip_high=0.2",
        f"seed={seed}",
        f"rollout.seed={seed}",
        "eval_every=0",
        f"checkpoint.every={mid or 0}",
        f"checkpoint.keep_last={steps // mid + 1 if mid else 1}",
        "checkpoint.save_optimizer=false",
        f"logging.output_dir={run_root}",
        "logging.run_name=run",
        "logging.wandb_mode=disabled",
        "logging.plot=false",
        *P.data_overrides(train_file, seed, steps * args.prompts_per_step),
    ]
    if args.device == "cuda":  # as our earlier H100 run (experiments/results/gpu/smollm2_grpo_learning)
        out += [
            "placement.device=cuda",
            "placement.colocate=[[rollout,learner]]",
            "rollout.gpu_memory_utilization=0.4",
            "trainer.micro_batch_tokens=16384",
        ]
    else:
        out += ["placement.device=cpu"]
    return out + list(args.ours_override) + extra


OURS_STEP_KEYS = (
    "train/grad_norm",
    "train/entropy",
    "train/loss",
    "train/num_tokens",
    "response/length_mean",
    "sync/audit_logprob_diff",
)


def run_ours(args, label: str, seed: int, files: dict, extra: list[str]) -> dict:
    run_root = Path(args.work) / "runs" / f"{label.replace(':', '-')}-s{seed}"
    shutil.rmtree(run_root, ignore_errors=True)
    run_root.mkdir(parents=True)
    overrides = ours_overrides(args, seed, files["train"][seed], run_root, extra)
    cmd = [sys.executable, "-m", "rlhf", "train", "configs/quickstart.yaml", *overrides]
    rc, wall = run_process(cmd, run_root / "log.txt", args.timeout, child_env())
    record = {"command": shlex.join(cmd), "rc": rc, "wall_s": wall, "log": str(run_root / "log.txt")}
    run_dir = run_root / "run"
    curve: list[float | None] = [None] * args.steps
    # per-step learner figures beside the reward, for diagnosing a slow start (TRL's log history
    # has its own grad_norm and entropy)
    learner = {key: [None] * args.steps for key in OURS_STEP_KEYS}
    step_s = []
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            if 1 <= m.get("step", 0) <= args.steps and "reward/mean" in m:
                curve[m["step"] - 1] = m["reward/mean"]
                step_s.append(m.get("time/step_s"))
                for key in OURS_STEP_KEYS:
                    learner[key][m["step"] - 1] = m.get(key)
    record["train_reward"] = curve
    record["per_step"] = learner
    record["step_s_mean"] = S.curve_mean(step_s[1:] or step_s)
    record["batches_match"] = ours_batches_match(
        run_dir / "samples.jsonl", files["trl_train"][seed], args.prompts_per_step
    )
    record["models"] = {}
    for step in filter(None, (args.mid_step, args.steps)):
        hf = run_dir / "checkpoints" / f"step_{step:06d}" / "policy" / "hf"
        if (hf / "config.json").is_file():
            record["models"][str(step)] = str(hf)
    return record


def step_batches(trl_file: Path, per_step: int) -> list[set[str]]:
    """The user prompts of each step, from TRL's dataset (our served order)."""
    users = [json.loads(line)["prompt"] for line in trl_file.read_text().splitlines()]
    return [set(users[i : i + per_step]) for i in range(0, len(users), per_step)]


def ours_batches_match(samples_file: Path, trl_file: Path, per_step: int) -> bool | None:
    """Whether every sample our run logged (samples.jsonl) answers a prompt of that step's batch in the
    TRL's dataset: the two sides trained on the same batches. None without logged samples."""
    if not samples_file.is_file():
        return None
    batches = step_batches(trl_file, per_step)
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return bool(samples) and all(
        any(f"\n{u}<|im_end|>" in s["prompt"] for u in batches[s["step"] - 1]) for s in samples
    )


def run_trl(args, seed: int, files: dict) -> dict:
    run_root = Path(args.work) / "runs" / f"trl-s{seed}"
    shutil.rmtree(run_root, ignore_errors=True)
    run_root.mkdir(parents=True)
    batch = args.prompts_per_step * args.n
    micro = args.trl_micro_batch or (min(64, batch) if args.device == "cuda" else batch)
    import yaml

    spec = {
        "model_dir": files["model_dir"],
        "train_file": str(files["trl_train"][seed]),
        "out_dir": str(run_root / "trl"),
        "steps": args.steps,
        "mid_step": args.mid_step,
        "prompts_per_step": args.prompts_per_step,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "lr": args.lr,
        "seed": seed,
        "device": args.device,
        "micro_batch": micro,
        "extra": {k: yaml.safe_load(v) for k, _, v in (a.partition("=") for a in args.trl_arg)},
    }
    (run_root / "spec.json").write_text(json.dumps(spec, indent=1))
    cmd = [sys.executable, "-m", "experiments.learning.trl_baseline", str(run_root / "spec.json")]
    rc, wall = run_process(cmd, run_root / "log.txt", args.timeout, child_env(args.trl_path))
    record = {
        "command": shlex.join(cmd),
        "spec": spec,
        "rc": rc,
        "wall_s": wall,
        "log": str(run_root / "log.txt"),
    }
    result_file = run_root / "trl" / "result.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        record.update(
            {k: result[k] for k in ("train_reward", "models", "versions", "config", "defaults_kept")}
        )
        record["log_history"] = result["log_history"]
        record["train_s"] = result["train_s"]
        record["last_completions"] = result.get("last_completions")
        if result.get("last_batch_prompts"):  # TRL's last generation batch, as TRL logged it
            last = step_batches(files["trl_train"][seed], args.prompts_per_step)[args.steps - 1]
            record["batches_match"] = set(result["last_batch_prompts"]) == last
    return record


def evaluate(args, state: dict, files: dict, log: Log) -> None:
    """Greedy accuracy of the base model and of every model not scored yet, in one engine."""
    todo = []
    for key, run in state["runs"].items():
        for step, path in run.get("models", {}).items():
            if path not in state["evals"]:
                todo.append({"key": f"{key}@{step}", "path": path})
    if not todo and "base" in state["evals"]:
        return
    out_file = Path(args.work) / f"evals-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    spec = {
        "base_model": files["model_dir"],
        "held_out_file": str(files["held_out"]),
        "models": todo,
        "device": args.device,
        "dtype": "bfloat16" if args.device == "cuda" else "float32",
        "max_new_tokens": args.max_new_tokens,
        "out_file": str(out_file),
    }
    spec_file = Path(args.work) / "eval_spec.json"
    spec_file.write_text(json.dumps(spec, indent=1))
    log(f"greedy evaluation of the base model and {len(todo)} model(s)")
    cmd = [sys.executable, "-m", "experiments.learning.greedy_eval", str(spec_file)]
    rc, wall = run_process(cmd, Path(args.work) / "eval_log.txt", args.timeout, child_env())
    records = [json.loads(line) for line in out_file.read_text().splitlines()] if out_file.is_file() else []
    log(f"evaluation rc={rc} in {wall:.0f}s, {len(records)} record(s)")
    if rc != 0:
        log("evaluation log tail:\n" + tail(Path(args.work) / "eval_log.txt", 40))
    for r in records:
        if "error" in r:
            log(f"  {r['key']}: ERROR {r['error']}")
            continue
        log(
            f"  {r['key']}: greedy {r['accuracy']:.4f} ({r['num_prompts']} prompts, {r['mean_tokens']:.1f} tokens)"
        )
        key = r["key"] if r["key"] in ("base", "base_recheck") else r["path"]
        state["evals"][key] = {
            k: r[k] for k in ("key", "accuracy", "num_prompts", "mean_tokens", "eval_s", "examples")
        }


def tail(path: Path, lines: int) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def versions() -> dict:
    out = {}
    for name in ("torch", "vllm", "transformers", "deepspeed", "ray", "datasets", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["rlhf_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["rlhf_commit"] = None
    return out


def device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_outputs(args, state: dict, out: Path) -> None:
    """summary.json (settings, per-run records, aggregates, curves) and the PNG, after every run."""
    for run in state["runs"].values():
        run["greedy"] = {
            step: state["evals"][path]["accuracy"]
            for step, path in run.get("models", {}).items()
            if path in state["evals"]
        }
    base = state["evals"].get("base", {}).get("accuracy")
    agg = S.aggregate(list(state["runs"].values()), args.steps, args.mid_step, base)
    summary = {
        "device": state["device"],
        "versions": state["versions"],
        "settings": state["settings"],
        "base_greedy": base,
        "base_recheck_greedy": state["evals"].get("base_recheck", {}).get("accuracy"),
        **{k: v for k, v in agg.items() if k.endswith("_mean") and not isinstance(v, dict)},
        "curves": {
            label: {
                "mean": e["train_reward_curve_mean"],
                "per_seed": {
                    str(r["seed"]): r["train_reward"]
                    for r in state["runs"].values()
                    if r["label"] == label and r.get("status") == "ok"
                },
            }
            for label, e in agg["by_label"].items()
        },  # fmt: skip
        "by_label": agg["by_label"],
        "runs": state["runs"],
        "evals": state["evals"],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (Path(args.work) / "state.json").write_text(json.dumps(state, indent=1, default=str))
    if agg["by_label"]:
        title = (
            f"{state['device']}: {args.steps} steps x {args.prompts_per_step} prompts x {args.n} samples, "
            f"{args.max_new_tokens} new tokens, lr {args.lr}, T {args.temperature}"
        )
        S.plot(agg, str(out / "train_reward.png"), title)


def prepare(args, log: Log) -> tuple[dict, dict]:
    """Prompt files, TRL's ordered datasets, and the state merged from earlier invocations."""
    from transformers import AutoTokenizer

    from rlhf.data.models import resolve_model_path

    work = Path(args.work)
    model_dir = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    held_out = P.held_out_rows(args.held_out)
    files: dict = {"model_dir": model_dir, "held_out": P.write_jsonl(work / "held_out.jsonl", held_out)}
    files["train"], files["trl_train"] = {}, {}
    same_ids = True
    for seed in args.seeds:
        pool = P.train_rows(seed, args.steps * args.prompts_per_step, held_out)
        files["train"][seed] = P.write_jsonl(work / f"train-s{seed}.jsonl", pool)
        served = P.served_order(files["train"][seed], seed, args.steps, args.prompts_per_step, tokenizer)
        rows = [{"prompt": p.metadata["raw_prompt"], "answer": p.label} for p in served]
        files["trl_train"][seed] = P.write_jsonl(work / f"trl-train-s{seed}.jsonl", rows)
        same_ids &= all(p.token_ids == P.trl_ids(tokenizer, p.metadata["raw_prompt"]) for p in served)
        overlap = {r["prompt"] for r in pool} & {r["prompt"] for r in held_out}
        if overlap:
            raise RuntimeError(f"seed {seed}: {len(overlap)} held-out prompt(s) in the train pool")
    held = P.held_out_prompts(files["held_out"], tokenizer)
    same_ids &= all(p.token_ids == P.trl_ids(tokenizer, p.metadata["raw_prompt"]) for p in held)
    settings = {
        "steps": args.steps, "prompts_per_step": args.prompts_per_step, "n": args.n,
        "max_new_tokens": args.max_new_tokens, "lr": args.lr, "temperature": args.temperature,
        "held_out": args.held_out, "device": args.device, "model": args.model,
        "mid_step": args.mid_step, "held_out_fingerprint": P.fingerprint(held_out),
        "held_out_seed": P.HELD_OUT_SEED, "task": P.TASK, "task_args": P.TASK_ARGS,
        "system_prompt": P.SYSTEM_PROMPT, "eval": "greedy (temperature 0), one vLLM engine, rlhf.tasks checker",
        "prompt_ids_identical_both_sides": same_ids,
        "trl_order": "our driver's served order, shuffle_dataset=False",
    }  # fmt: skip
    log(f"held-out {len(held)} prompts ({settings['held_out_fingerprint']}); token ids identical: {same_ids}")
    state_file = work / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else None
    if state and any(state["settings"].get(k) != settings.get(k) for k in SHARED_KEYS):
        raise SystemExit(f"{state_file} holds runs with other settings; pass --fresh or another --work")
    if state is None:
        state = {"runs": {}, "evals": {}, "device": device_name(args.device), "versions": versions()}
    state["settings"] = {**state.get("settings", {}), **settings}
    state["settings"].setdefault("train_fingerprints", {}).update(
        {
            str(s): P.fingerprint([json.loads(x) for x in f.read_text().splitlines()])
            for s, f in files["train"].items()
        }
    )
    return files, state


def load_merge_source(path: Path) -> dict:
    """A --work dir's state.json, or a recorded summary.json: its base-model scores are dropped, so that
    this evaluation scores the base again (equal scores show the two evaluations agree)."""
    if path.is_dir():
        return json.loads((path / "state.json").read_text())
    other = json.loads(path.read_text())
    evals = {k: v for k, v in other["evals"].items() if k not in ("base", "base_recheck")}
    return {**other, "evals": evals}


def merge_state(state: dict, other: dict) -> list[str]:
    """Take `other`'s finished runs and evaluations that `state` lacks (same settings required)."""
    if any(other["settings"].get(k) != state["settings"].get(k) for k in SHARED_KEYS):
        raise SystemExit("--merge-from: that state holds runs with other settings")
    taken = [k for k, r in other["runs"].items() if r.get("status") == "ok" and k not in state["runs"]]
    state["runs"].update({k: other["runs"][k] for k in taken})
    for key, result in other["evals"].items():
        state["evals"].setdefault(key, result)
    fingerprints = state["settings"].setdefault("train_fingerprints", {})
    fingerprints.update(other["settings"].get("train_fingerprints", {}))
    return taken


def main(argv=None) -> None:
    args = parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "compare_trl.log")
    log(f"compare_trl {' '.join(sys.argv[1:])}")
    files, state = prepare(args, log)
    for other in args.merge_from:
        merged = merge_state(state, load_merge_source(Path(other)))
        log(f"merged from {other}: {', '.join(merged) or 'nothing new'}")
    plan: list[tuple[str, list[str]]] = []
    if args.only in (None, "ours"):
        if not args.variants_only:
            plan.append(("ours", []))
        plan += [(f"ours:{name}", shlex.split(extra)) for name, extra in args.variant]
    if args.only in (None, "trl"):
        plan.append(("trl", []))
    for seed in [] if args.eval_only else args.seeds:
        for label, extra in plan:
            key = f"{label}/s{seed}"
            if state["runs"].get(key, {}).get("status") == "ok" and not args.force:
                log(f"{key}: done in {work}, skipped")
                continue
            log(f"{key}: training")
            if label == "trl":
                record = run_trl(args, seed, files)
            else:
                record = run_ours(args, label, seed, files, extra)
            complete = all(v is not None for v in record.get("train_reward", [None]))
            record.update(label=label, seed=seed, variant_overrides=extra)
            record["status"] = (
                "ok"
                if record["rc"] == 0 and complete
                else ("timeout" if record["rc"] == "timeout" else "failed")
            )
            if record["status"] != "ok":
                record["log_tail"] = tail(Path(record["log"]), 60)
                log(f"{key}: {record['status']} (rc {record['rc']}); log tail:\n{record['log_tail']}")
            rewards = [r for r in record.get("train_reward", []) if r is not None]
            log(
                f"{key}: {record['status']} in {record['wall_s']:.0f}s; train reward first/last "
                f"{rewards[0] if rewards else None} / {rewards[-1] if rewards else None}; models {list(record.get('models', {}))}"
            )
            state["runs"][key] = record
            write_outputs(args, state, out)
    if not args.no_eval:
        evaluate(args, state, files, log)
    write_outputs(args, state, out)
    summary = json.loads((out / "summary.json").read_text())
    log(
        "summary: "
        + json.dumps({k: v for k, v in summary.items() if k.endswith("_mean") or k.startswith("base")})
    )


if __name__ == "__main__":
    main()
