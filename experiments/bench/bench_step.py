"""GPU step benchmark: our overhead over what vLLM and DeepSpeed themselves need.

Measures, in one run, on the same model shape and batch:
  (a) vLLM alone generating the step's prompts            (raw `vllm.LLM`, separate process)
  (b) DeepSpeed alone doing the same training work        (raw DeepSpeed engine, separate process)
  (c) the full RL step through rlhf (Ray actors, rewards, advantages, train, sync, audit)
  (d) weight sync alone (learner -> engine)
and reports tok/s, sync time and GB/s, the step-time breakdown and the overhead ratio
  step / (generation + logprob passes + training + sync).

  python experiments/bench/bench_step.py --shape qwen2.5-0.5b --prompts 64 --n 8 --new-tokens 512 \
      --out experiments/results/gpu/h100_qwen05b_colocated
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from experiments.bench.workloads import learning_rate  # noqa: E402
from rlhf.data.shapes import MODEL_SHAPES as SHAPES  # noqa: E402


def build_model_dir(
    shape: str,
    out: Path,
    max_positions: int = 4096,
    eos_rate: float | None = None,
    untied: bool = False,
) -> Path:
    """Random-weight model of the given shape (bf16) + a word-level tokenizer covering the whole vocab.

    Every shape is written as a Llama config; the Qwen2.5 ones with attention biases (Qwen2 = Llama +
    q/k/v biases; Llama adds an o_proj bias too, 0.01% more parameters): transformers maps a `qwen2`
    model type to Qwen2Tokenizer, which cannot read a word-level tokenizer. With `eos_rate` the model
    ends its answers at that rate per token (experiments/bench/workloads.py); `untied`: a separate
    lm_head even where the released model ties it to the input embeddings."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    spec = dict(SHAPES[shape], **({"tie_word_embeddings": False} if untied else {}))
    vocab = {f"t{i}": i for i in range(spec["vocab_size"] - 2)}
    vocab["<pad>"] = spec["vocab_size"] - 2
    vocab["<eos>"] = spec["vocab_size"] - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    hf_tok.save_pretrained(out)
    cfg = LlamaConfig(
        **spec,
        max_position_embeddings=max_positions,
        bos_token_id=vocab["<eos>"],
        eos_token_id=vocab["<eos>"],
        # No padding_idx: it would leave the <pad> row at zero, and vLLM samples every id of a random
        # model, <pad> included. A zero embedding makes the first RMSNorms amplify the gradient
        # ~1/sqrt(eps) per layer, to inf in bf16 (every step of the earlier runs was skipped).
        pad_token_id=None,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if eos_rate is not None:
        from experiments.bench.workloads import set_eos_rate

        measured = set_eos_rate(model, vocab["<eos>"], eos_rate)
        (out / "eos_rate.json").write_text(json.dumps({"target": eos_rate, "on_probes": measured}))
    model.save_pretrained(out)
    return out


def write_prompts(path: Path, lengths: list[int], vocab: int, seed: int = 0) -> Path:
    """One prompt per length, of that many word-level tokens."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i, prompt_len in enumerate(lengths):
            words = " ".join(f"t{rng.randrange(vocab - 2)}" for _ in range(prompt_len))
            f.write(json.dumps({"prompt": words, "answer": str(i)}) + "\n")
    return path


def prompt_lengths(args, num: int) -> list[int]:
    """The workload's prompt lengths: all `--prompt-len` (fixed), or spread over `--prompt-lens`."""
    if args.workload == "fixed":
        return [args.prompt_len] * num
    from experiments.bench.workloads import varied_prompt_lengths

    low, high = args.prompt_lens
    return varied_prompt_lengths(num, low, high)


def workload_model_dir(args) -> Path:
    """The workload's random model (long-tailed: rewired to its EOS rate), built once per cache."""
    cache = Path(os.environ.get("RLHF_BENCH_CACHE", "/tmp/rlhf-bench"))
    name = args.shape if args.workload == "fixed" else f"{args.shape}-eos-median-{args.eos_median}"
    untied = getattr(args, "untied_embeddings", False)
    return build_model_dir(
        args.shape,
        cache / (name + ("-untied" if untied else "")),
        max_positions=max(32768, longest_prompt(args) + args.new_tokens + 16),
        eos_rate=eos_rate(args),
        untied=untied,
    )


def longest_prompt(args) -> int:
    return args.prompt_len if args.workload == "fixed" else args.prompt_lens[1]


def eos_rate(args) -> float | None:
    """Per-token end probability of the long-tailed workload (answers of median `--eos-median`)."""
    return None if args.workload == "fixed" else 1 - 0.5 ** (1 / args.eos_median)


# ----------------------------------------------------------------------------------------- (a) vLLM alone
def vllm_alone(model_dir: str, args, fp8: bool = False) -> dict:
    """`fp8`: the same with the engine quantizing the bf16 weights to FP8 (`rollout.quantization: fp8`)."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    n, new_tokens, fixed = args.n, args.new_tokens, args.workload == "fixed"
    t0 = time.perf_counter()
    quantization = {}
    if fp8:
        from rlhf.sync.fp8 import vllm_quantization

        quantization = {"quantization": vllm_quantization("tensor")}
    llm = LLM(
        model_dir,
        dtype="bfloat16",
        **quantization,
        gpu_memory_utilization=args.util,
        enforce_eager=args.eager,
        seed=0,
        max_model_len=longest_prompt(args) + new_tokens + 16,
    )
    startup = time.perf_counter() - t0
    rng = random.Random(0)
    batch = [
        TokensPrompt(prompt_token_ids=[rng.randrange(1000, 100000) for _ in range(length)])
        for length in prompt_lengths(args, args.prompts)
    ]
    # Fixed: every answer runs to new_tokens; long-tailed: answers end where the model emits EOS.
    sp = SamplingParams(
        n=n,
        temperature=1.0,
        max_tokens=new_tokens,
        min_tokens=new_tokens if fixed else 0,
        ignore_eos=fixed,
        logprobs=0,
    )
    llm.generate(batch[:4], sp, use_tqdm=False)  # warm-up
    # Full-size batches, alternating with / without returned logprobs (the learner could recompute
    # them): the first full-size batch may pay one-off costs, so neither variant always goes first.
    llm.generate(batch, sp, use_tqdm=False)
    # "lean": how RolloutEngine asks (flat logprobs, no per-token detokenization in vLLM; the
    # engine decodes each whole response once), with and without logprobs.
    lean = sp.clone()
    lean.flat_logprobs, lean.detokenize = True, False
    params = {
        "logprobs": sp,
        "none": _without_logprobs(sp),
        "lean_logprobs": lean,
        "lean_none": _without_logprobs(lean),
    }
    times: dict[str, list[float]] = {k: [] for k in params}
    order = ["none", "logprobs", "lean_logprobs", "lean_none"]
    for variant in order + order[::-1]:
        t0 = time.perf_counter()
        outs = llm.generate(batch, params[variant], use_tqdm=False)
        times[variant].append(time.perf_counter() - t0)
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    # The sequences (prompt, answer) lengths of the last batch: (b) trains on the same lengths.
    lengths = [[len(o.prompt_token_ids), len(c.token_ids)] for o in outs for c in o.outputs]
    (Path(args.out) / "lengths.json").write_text(json.dumps(lengths))
    gen = sum(times["logprobs"]) / 2
    gen_no_logprobs = sum(times["none"]) / 2
    sched = llm.llm_engine.vllm_config.scheduler_config
    return {
        "startup_s": startup,
        "generate_s": gen,
        "generate_no_logprobs_s": gen_no_logprobs,
        "generate_lean_logprobs_s": sum(times["lean_logprobs"]) / 2,
        "generate_lean_no_logprobs_s": sum(times["lean_none"]) / 2,
        "generate_runs_s": times,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / gen,
        "max_num_seqs": getattr(sched, "max_num_seqs", None),
        "max_num_batched_tokens": getattr(sched, "max_num_batched_tokens", None),
    }


def _without_logprobs(sp):
    plain = sp.clone()
    plain.logprobs = None
    return plain


# ----------------------------------------------------------------------------------------- (b) DeepSpeed alone
def deepspeed_alone(model_dir: str, args) -> dict:
    """A plain DeepSpeed loop (ZeRO `--zero`, `--offload-ratio` as (c)) on the step's sequences:
    fixed-length rows, or (long-tailed) the lengths (a) generated, in right-padded micro-batches of
    `--micro-batch-tokens` (rows x longest)."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model.gradient_checkpointing_enable()
    seqs, prompt_len = args.prompts * args.n, args.prompt_len
    lengths_file = Path(args.out) / "lengths.json"
    if args.workload == "fixed":
        rows = [[prompt_len, args.new_tokens]] * seqs
    elif lengths_file.exists():
        rows = json.loads(lengths_file.read_text())
    else:
        raise SystemExit("--workload longtail: part b trains on the lengths part a generated; run a,b")
    from rlhf.trainer.packing import pack_micro_batches

    totals = [p + r for p, r in rows]
    micro_tokens = getattr(args, "raw_micro_batch_tokens", None) or args.micro_batch_tokens
    micro = pack_micro_batches(totals, micro_tokens)
    per_micro = max(len(m) for m in micro)
    zero = {"stage": args.zero}
    if args.offload_ratio is not None:  # the same (partial) offload as (c): DeepSpeed's CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True, "ratio": args.offload_ratio}
        zero["sub_group_size"] = sum(p.numel() for p in model.parameters()) // 20
        optim = DeepSpeedCPUAdam(
            model.parameters(), lr=learning_rate(args.workload, args.lr), adamw_mode=True
        )
    else:  # torch's fused AdamW: no JIT-compiled DeepSpeed op needed on the host.
        optim = torch.optim.AdamW(model.parameters(), lr=learning_rate(args.workload, args.lr), fused=True)
    ds_cfg = {
        "train_micro_batch_size_per_gpu": per_micro,
        "gradient_accumulation_steps": len(micro),
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optim, config=ds_cfg)
    batches = []
    for m in micro:
        width = max(totals[i] for i in m)
        ids = torch.randint(1000, 100000, (len(m), width), device=engine.device)
        mask = torch.zeros(len(m), width, device=engine.device)
        for j, i in enumerate(m):
            mask[j, rows[i][0] : totals[i]] = 1.0  # the answer's tokens
        batches.append((ids, mask))

    def one_step():
        for ids, mask in batches:
            logits = engine(input_ids=ids).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            loss = -(logp * mask[:, 1:]).sum() / mask.sum()
            engine.backward(loss)
            engine.step()
        torch.cuda.synchronize()

    one_step()  # warm-up
    t0 = time.perf_counter()
    one_step()
    train = time.perf_counter() - t0
    tokens = sum(totals)
    computed = sum(len(m) * max(totals[i] for i in m) for m in micro)
    return {
        "train_s": train,
        "trained_tokens": tokens,
        "padding_frac": 1 - tokens / computed,
        "tokens_per_s": tokens / train,
        "micro_batch_size": per_micro,
        "micro_batch_tokens": micro_tokens,
        "grad_accum": ds_cfg["gradient_accumulation_steps"],
        "sequences": len(rows),
        "grad_norm": float(engine.get_global_grad_norm() or float("nan")),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
    }


# ----------------------------------------------------------------------------------------- (l) our learner alone
def learner_alone(model_dir: str, args) -> dict:
    """Our `Learner` (the class the Ray actor wraps) in this process, on (b)'s tokens: no Ray, no vLLM.

    Separates the learner's own cost from colocation effects. Reports the logprob pass, two timed
    train steps (the first pays the optimizer's lazy state), the grad norm, allocator retries and,
    with --profile, the top CUDA kernels of one step.
    """
    import torch
    from rlhf.trainer.learner import Learner
    from rlhf.trainer.packing import pack_micro_batches, row_lengths

    from rlhf.algorithms import losses
    from rlhf.config.loader import load_config
    from rlhf.types import TrainBatch

    if args.logprob_impl == "naive":  # A/B of the training loss: autograd through per-chunk slices
        losses.token_logprobs_and_entropy = naive_logprobs_and_entropy
    compiled = args.logprob_impl == "compiled"
    cfg = load_config(
        REPO / "configs/quickstart.yaml",
        [
            f"model.path={model_dir}",
            "trainer.zero_stage=2",
            "trainer.gradient_checkpointing=true",
            f"trainer.micro_batch_tokens={args.micro_batch_tokens}",
            f"trainer.lr={learning_rate(args.workload, args.lr)}",
            "algorithm.advantage=grpo",
            "algorithm.kl_coef=0",
            "rollout.sampling.temperature=1.0",
            "placement.device=cuda",
            f"trainer.compile_logprobs={str(compiled).lower()}",
        ]
        + args.override,
    )
    _, port = Learner.node_ip_and_free_port()
    learner = Learner(cfg, model_dir, "policy", "cuda", 0, 1, "127.0.0.1", port)
    seqs, width = args.prompts * args.n, args.prompt_len + args.new_tokens
    gen = torch.Generator().manual_seed(0)
    loss_mask = torch.zeros(seqs, width)
    loss_mask[:, args.prompt_len :] = 1.0
    batch = TrainBatch(
        input_ids=torch.randint(1000, 100000, (seqs, width), generator=gen),
        attention_mask=torch.ones(seqs, width, dtype=torch.long),
        loss_mask=loss_mask,
        rollout_logprobs=torch.zeros(seqs, width),
        advantages=torch.randn(seqs, 1, generator=gen) * loss_mask,
        rewards=torch.zeros(seqs),
    )
    micro = pack_micro_batches(row_lengths(batch), args.micro_batch_tokens)
    num_tokens, num_sequences = losses.loss_normalizers(loss_mask)
    step = {
        "micro_batches": micro,
        "num_micro": None,
        "global_num_tokens": num_tokens,
        "global_num_sequences": num_sequences,
    }

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    logprobs, logprob_s = timed(lambda: learner.logprobs(batch))
    batch.rollout_logprobs = logprobs * loss_mask  # on-policy: ratio 1, like a real first epoch
    trains = []
    for _ in range(2):
        (stats,), seconds = timed(lambda: learner.train(batch, [step]))
        trains.append({"train_s": seconds, "grad_norm": stats["grad_norm"], "loss": stats["loss"]})
    result = {
        "logprob_impl": args.logprob_impl,
        "logprob_pass_s": logprob_s,
        "train": trains,
        "train_s": trains[-1]["train_s"],
        "trained_tokens": seqs * width,
        "tokens_per_s": seqs * width / trains[-1]["train_s"],
        "micro_batches": len(micro),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
    }
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            learner.train(batch, [step])
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        (Path(args.out) / f"profile_learner_{args.logprob_impl}.txt").write_text(table)
        print(table, flush=True)
    return result


def naive_logprobs_and_entropy(logits, input_ids, *, temperature=1.0, chunk_size=1024, compiled=False):
    """The earlier implementation, kept for the A/B: float32 chunk slices through autograd."""
    import torch

    from rlhf.algorithms.losses import _shifted_chunks

    logp = [torch.zeros_like(input_ids[:, :1], dtype=torch.float32)]
    entropy = [torch.zeros_like(input_ids[:, :1], dtype=torch.float32)]
    for t0, t1, chunk in _shifted_chunks(logits, chunk_size):
        z = chunk.float() / temperature
        norm = torch.logsumexp(z, dim=-1)
        logp.append(z.gather(-1, input_ids[:, t0:t1, None]).squeeze(-1) - norm)
        with torch.no_grad():
            entropy.append(norm - (torch.softmax(z, dim=-1) * z).sum(dim=-1))
    return torch.cat(logp, dim=1), torch.cat(entropy, dim=1)


# ----------------------------------------------------------------------------------------- (c)+(d) rlhf
def rlhf_steps(model_dir: str, prompts_file: str, args) -> dict:
    from rlhf.config.loader import load_config
    from rlhf.loop.driver import Trainer

    overrides = [
        f"model.path={model_dir}",
        f"data.source={prompts_file}",
        "data.apply_chat_template=false",
        "data.num_eval=0",
        f"data.max_prompt_tokens={longest_prompt(args) + 8}",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.sampling.n={args.n}",
        f"rollout.sampling.max_new_tokens={args.new_tokens}",
        f"rollout.sampling.ignore_eos={str(args.workload == 'fixed').lower()}",
        # Temperature 1 as (a) and TRL: the long-tailed model's EOS rate holds at temperature 1 only.
        "rollout.sampling.temperature=1.0",
        f"rollout.max_num_seqs={args.prompts * args.n}",
        f"rollout.max_model_len={longest_prompt(args) + args.new_tokens + 16}",
        f"rollout.enforce_eager={str(args.eager).lower()}",
        f"rollout.gpu_memory_utilization={args.util}",
        f"rollout.sleep_between_steps={str(args.sleep).lower()}",
        "reward.sources=[{kind: rule, name: 'experiments.bench.bench_reward:token_parity'}]",
        f"trainer.micro_batch_tokens={args.micro_batch_tokens}",
        f"trainer.lr={learning_rate(args.workload, args.lr)}",
        f"trainer.zero_stage={args.zero}",
        "trainer.gradient_checkpointing=true",
        "algorithm.advantage=grpo",
        "algorithm.kl_coef=0",
        f"steps={args.steps}",
        "logging.wandb_mode=disabled",
        "logging.plot=false",
        f"logging.output_dir={args.out}/runs",
        "placement.device=cuda",
        f"placement.colocate={'[[rollout, learner]]' if args.mode == 'colocated' else '[]'}",
        *gpu_layout(args),
        f"sync.transport={args.transport}",
        f"sync.bucket_mb={args.bucket_mb}",
        f"rollout.max_staleness={args.staleness}",
        f"rollout.sleep_level={args.sleep_level}",
        *offload_overrides(args),
        f"rollout.quantization={args.quantization}",
    ] + args.override
    cfg = load_config(REPO / "configs/quickstart.yaml", overrides)
    trainer = Trainer(cfg)
    probe = trainer.data.next_batch(1)[0]
    print(
        f"tokenizer {type(trainer.tokenizer).__name__}: first prompt has {len(probe.token_ids)} tokens; "
        f"'t1 t2' -> {trainer.tokenizer('t1 t2').input_ids}",
        flush=True,
    )
    trainer.data.load_state_dict({"epoch": 0, "position": 0, "seed": cfg.data.seed})
    from experiments.bench.gpu_memory import GpuSampler, HostSampler
    from rlhf.placement import make_plan

    gpu_sampler = GpuSampler(Path(args.out) / "gpu_samples.csv").start()
    host_sampler = HostSampler().start()
    trainer.roles = trainer.start_roles()
    gpu_sampler.mark("steps")
    plan = make_plan(cfg)  # the plan the run was placed by, now that Ray is up
    steps = []
    try:
        if cfg.rollout.max_staleness > 0:  # asynchronous: the engines generate ahead of the learner
            from rlhf.loop.async_loop import AsyncLoop

            trainer.loop = AsyncLoop(trainer)
            trainer.loop.start()
        for _ in range(cfg.steps):
            m = trainer.run_step()
            trainer.step += 1
            steps.append(m)
            print(
                json.dumps(
                    {k: round(v, 4) for k, v in m.items() if k.startswith(("time/", "perf/", "sync/"))}
                ),
                flush=True,
            )
        if trainer.loop is not None:
            trainer.loop.stop()
            trainer.loop = None
        syncs = []
        for _ in range(5):
            syncs.append(trainer.roles.sync.push())
    finally:
        measured = gpu_sampler.stop()
        host = host_sampler.stop()
        trainer.shutdown()
    return {"steps": steps, "sync_alone": syncs, "memory": memory_beside_plan(plan, measured, host)}


def memory_beside_plan(plan, measured: dict, host: dict) -> dict:
    """The planner's peak GPU and host memory next to the measured peaks (nvidia-smi during the
    steps; host: used memory during the whole run, less what was used before it)."""
    gpu_plan = max((used for used, _ in plan.gpu_memory_usage().values()), default=None)
    peak_mib = max((g["mib"] for g in measured.get("steps", measured.get("all", {})).values()), default=None)
    from rlhf.placement.memory import memory_by_host

    host_plan = sum(used for used, _ in memory_by_host(plan).values())
    out = {
        "planned_gpu_gb": round(gpu_plan, 2) if gpu_plan is not None else None,
        "peak_gpu_gb": round(peak_mib * 2**20 / 1e9, 2) if peak_mib is not None else None,
        "planned_host_gb": round(host_plan, 2),
        "peak_host_gb": round(host["peak_gb"] - host["before_gb"], 2),
        "per_role": {
            role: [
                {"gpu_gb": a.memory_gb, "resident_gb": a.resident_gb, "host_gb": a.host_gb}
                for a in assignments
            ]
            for role, assignments in plan.assignments.items()
        },
    }
    print("memory (plan vs measured): " + json.dumps(out), flush=True)
    return out


def offload_overrides(args) -> list[str]:
    """(c)'s keys for `--offload-ratio`: the optimizer states partly in host memory (ZeRO-3), the
    learner's cached blocks returned before the engine wakes."""
    if args.offload_ratio is None:
        return []
    return [
        "trainer.offload_optimizer=true",
        f"trainer.offload_ratio={args.offload_ratio}",
        "trainer.release_cache_before_wake=true",
    ]


def gpu_layout(args) -> list[str]:
    """Replica counts for `--gpus` GPUs: colocated, every GPU holds one learner rank and one engine
    worker (GPUs / TP engines); disaggregated, the first half of the GPUs generate, the rest train."""
    tp = args.tp
    if args.mode == "colocated":
        engines, ranks = args.gpus // tp, args.gpus
    else:
        engines, ranks = max(1, args.gpus // 2) // tp, max(1, args.gpus - args.gpus // 2)
    if engines < 1:
        raise SystemExit(f"--gpus {args.gpus} cannot hold one engine of --tp {tp}")
    return [
        f"rollout.tensor_parallel={tp}",
        f"placement.rollout.replicas={engines}",
        f"placement.learner.replicas={ranks}",
    ]


def summarise(res: dict, args) -> dict:
    steps = res["rlhf"]["steps"][1:] or res["rlhf"]["steps"]  # the first step includes warm-up
    avg = lambda key: sum(s.get(key, 0.0) for s in steps) / len(steps)  # noqa: E731
    audited = any("sync/audit_logprob_diff" in s for s in steps)
    sync = sorted(s["sync/time_s"] for s in res["rlhf"]["sync_alone"])[len(res["rlhf"]["sync_alone"]) // 2]
    gen, train = avg("time/generate_s"), avg("time/train_s")
    logprob_passes = avg("time/ref_logprobs_s") + avg("time/old_logprobs_s")
    step = avg("time/step_s")
    ideal = gen + logprob_passes + train + avg("time/sync_s")
    out = {
        "step_s": step,
        "generated_tokens_per_step": avg("perf/generated_tokens"),
        "end_to_end_tokens_per_s": avg("perf/generated_tokens") / step,
        "breakdown_s": {
            k[5:-2]: avg(k) for k in sorted({k for s in steps for k in s if k.startswith("time/")})
        },
        "overhead_ratio": step / ideal,
        "sync_alone_s": sync,
        "sync_gbps": res["rlhf"]["sync_alone"][0].get("sync/bytes", 0) / sync / 1e9,
        # where the time of a push goes (medians of the pushes timed alone), see docs/weight_sync.md
        "sync_phases_s": {
            key[5:]: sorted(p.get(key, 0.0) for p in res["rlhf"]["sync_alone"])[
                len(res["rlhf"]["sync_alone"]) // 2
            ]
            for key in res["rlhf"]["sync_alone"][0]
            if key.startswith(("sync/learner_", "sync/engine_"))
        },
        # None where no step audited (engines without logprobs, e.g. asynchronous with no correction)
        "audit_logprob_diff": avg("sync/audit_logprob_diff") if audited else None,
        "audit_logprob_diff_max": max(s.get("sync/audit_logprob_diff_max", 0.0) for s in steps)
        if audited
        else None,
    }
    if "train/padding_frac" in steps[0]:
        out["padding_frac"] = avg("train/padding_frac")
    if "memory" in res["rlhf"]:
        out["memory"] = {k: v for k, v in res["rlhf"]["memory"].items() if k != "per_role"}
    if args is not None:
        out["shape"], out["packing"] = args.shape, "trainer.packing=false" not in " ".join(args.override)
        out["workload"] = args.workload
        out["mean_answer_tokens"] = avg("perf/generated_tokens") / (args.prompts * args.n)
    if "vllm" in res:
        out["vllm_alone_generate_s"] = res["vllm"]["generate_s"]
        out["vllm_alone_generate_no_logprobs_s"] = res["vllm"]["generate_no_logprobs_s"]
        out["ours_generate_vs_vllm"] = gen / res["vllm"]["generate_s"]
    if "deepspeed" in res:
        out["deepspeed_alone_train_s"] = res["deepspeed"]["train_s"]
        out["deepspeed_alone_padding_frac"] = res["deepspeed"].get("padding_frac")
        out["ours_train_vs_deepspeed"] = train / res["deepspeed"]["train_s"]
        if "vllm" in res:
            raw = res["vllm"]["generate_no_logprobs_s"] + res["deepspeed"]["train_s"]
            out["overhead_vs_raw_parts"] = step / (raw + sync)
            # The 1-GPU target: step <= 1.15 x (raw generation without logprobs + raw
            # DeepSpeed train + one forward pass, about a third of a train step).
            out["target_1gpu_s"] = 1.15 * (raw + res["deepspeed"]["train_s"] / 3)
    return out


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=512, help="answer length (fixed) or limit (longtail)")
    ap.add_argument(
        "--workload",
        default="fixed",
        choices=["fixed", "longtail"],
        help="fixed: every answer --new-tokens long; longtail: the model ends answers at a set rate "
        "(geometric lengths of median --eos-median, cut at --new-tokens) and prompts vary over --prompt-lens",
    )
    ap.add_argument("--eos-median", type=int, default=300, help="longtail: median answer length")
    ap.add_argument(
        "--untied-embeddings",
        action="store_true",
        help="build the shape with a separate lm_head (the 7B and 8B shapes have one already)",
    )
    ap.add_argument(
        "--prompt-lens",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        default=(64, 1024),
        help="longtail: prompt lengths, uniform over LOW,HIGH",
    )
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--lr",
        type=float,
        help="learning rate of (b) and (c) (default 1e-6; 1e-10 on longtail: workloads.py)",
    )
    ap.add_argument("--mode", default="colocated", choices=["colocated", "disaggregated"])
    ap.add_argument("--gpus", type=int, default=1, help="GPUs the rlhf step (c) uses (see gpu_layout)")
    ap.add_argument("--tp", type=int, default=1, help="rollout.tensor_parallel for (c)")
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="trainer.zero_stage for (c)")
    ap.add_argument("--staleness", type=int, default=0, help="rollout.max_staleness for (c): 1 = async")
    ap.add_argument(
        "--offload-ratio",
        type=float,
        help="optimizer states in host memory for (b) and (c), ZeRO-3 partial offload when < 1 (with --zero 3)",
    )
    ap.add_argument("--sleep-level", type=int, default=1, choices=[1, 2], help="rollout.sleep_level for (c)")
    ap.add_argument("--transport", default="auto")
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--util", type=float, default=0.5)
    ap.add_argument("--sleep", action="store_true", help="vLLM sleeps while the learners train")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (fast start, slower decode)")
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument(
        "--raw-micro-batch-tokens",
        type=int,
        default=None,
        help="(b)'s micro-batches, default --micro-batch-tokens: a plain HF forward holds the whole "
        "[tokens x vocab] logits, which at the 7B shape does not fit beside ZeRO-3 at 16k tokens",
    )
    ap.add_argument(
        "--parts",
        default="a,b,c",
        help="which of a (vLLM), b (DeepSpeed), l (our learner alone), c (rlhf + sync) to run",
    )
    ap.add_argument("--out", default="experiments/results/gpu/bench")
    ap.add_argument("--override", nargs="*", default=[])
    ap.add_argument(
        "--quantization",
        default="none",
        choices=["none", "fp8"],
        help="fp8: (c) runs rollout.quantization=fp8 and (a) runs raw vLLM twice, bf16 and fp8",
    )
    ap.add_argument(
        "--logprob-impl",
        default="compiled",
        choices=["compiled", "eager", "naive"],
        help="(l) only: torch.compile'd fused kernels, the same in eager mode, or autograd through slices",
    )
    ap.add_argument("--profile", action="store_true", help="(l): torch profiler table of one train step")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = workload_model_dir(args)

    if args.part in ("a", "a_fp8"):
        r = vllm_alone(str(model_dir), args, fp8=args.part == "a_fp8")
        print("RESULT " + json.dumps(r))
        return
    if args.part == "b":
        r = deepspeed_alone(str(model_dir), args)
        print("RESULT " + json.dumps(r))
        return
    if args.part == "l":
        print("RESULT " + json.dumps(learner_alone(str(model_dir), args)))
        return

    results: dict = {"device": device_name(), "args": vars(args), "command": " ".join(sys.argv)}
    parts = args.parts.split(",")
    if "a" in parts and args.quantization == "fp8":
        parts.append("a_fp8")
    for part, key in (("a", "vllm"), ("a_fp8", "vllm_fp8"), ("b", "deepspeed"), ("l", "learner")):
        if part in parts:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--part", part]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                print(p.stdout[-3000:], p.stderr[-6000:], file=sys.stderr)
                results[key] = {"error": p.stderr[-2000:]}
                continue
            results[key] = json.loads(line[-1][7:])
            print(key, json.dumps(results[key]), flush=True)
            (out / "result.json").write_text(json.dumps(results, indent=2, default=str))
    if "c" in parts:
        vocab = SHAPES[args.shape]["vocab_size"]
        prompts_file = write_prompts(out / "prompts.jsonl", prompt_lengths(args, args.prompts * 4), vocab)
        results["rlhf"] = rlhf_steps(str(model_dir), str(prompts_file), args)
        results["summary"] = summarise(results, args)
        print(json.dumps(results["summary"], indent=2))
    (out / "result.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
