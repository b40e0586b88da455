"""Same batch, two trainers: does our GRPO step equal TRL's GRPOTrainer step? (on CPU)

On GPU TRL learned faster per sample than we did (experiments/learning/README.md). Before blaming
sampling, engines or precision, this checks the step itself: one fixed batch (SmolLM2-135M-Instruct,
arithmetic prompts rendered by our data pipeline, completions sampled with HF `generate` at T=1,
rewards from the `rlhf.tasks` checker), then

* ours: the real learner (`rlhf.trainer.learner.Learner` in-process with DeepSpeed, built by the helpers of
  tests/test_learner_reference.py) with configs/quickstart.yaml plus compare_trl's overrides;
* TRL: `GRPOTrainer.compute_loss` of TRL 1.16 (from --trl-path, never a package dependency) on the
  `inputs` dict its `_generate_and_score_completions` would build, advantages from its own formula;
  then its own optimizer (`create_optimizer`), clipping as `Trainer` does and one step;

and compares advantages, losses, gradients (cosine, norm ratio; overall and per parameter group) and
the update of one optimizer step. Each side runs in a subprocess of its own (DeepSpeed's process group
and accelerate's state are per process). With --bf16 also: ours with the GPU DeepSpeed config (bf16
module, fp32 masters) and TRL with bf16=True (fp32 weights under autocast), against the fp32 gradients,
with how many weights a step of lr 1e-5 actually changes.

  PYTHONPATH=$PWD DS_ACCELERATOR=cpu python experiments/learning/same_batch.py --bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TRL_PATH = "/tmp/trl-site"
GROUPS = ("embeddings", "attention", "mlp", "norms")
# compare_trl.py's budget in our config keys (ours_overrides, CPU branch)
OURS_OVERRIDES = [
    "model.path=smollm2-135m-instruct",
    "rollout.sampling.temperature=1.0",
    "rollout.sampling.max_new_tokens=48",
    "trainer.lr=1e-5",
    "trainer.min_lr_ratio=1.0",
    "trainer.warmup_steps=0",
    "algorithm.kl_coef=0.0",
    "algorithm.clip_low=0.2",
    "algorithm.clip_high=0.2",
    "placement.device=cpu",
    "steps=40",
]


def group_of(name: str) -> str:
    if "embed_tokens" in name:
        return "embeddings"
    if "self_attn" in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:
        return "norms"
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------- the batch
def build_batch(path: Path, prompts: int, n: int, max_new_tokens: int, seed: int) -> dict:
    """Prompts through our data pipeline; n samples each by HF generate (T=1, no top-k/top-p); keep the
    first `prompts - 1` groups with mixed rewards and one all-equal group (as most real groups are)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments.learning import prompts as P
    from rlhf.config.schema import DataConfig
    from rlhf.data.models import resolve_model_path
    from rlhf.data.prompts import PromptData
    from rlhf.tasks import get_task

    model_dir = resolve_model_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = P.train_rows(seed, 24, P.held_out_rows(256))
    train_file = P.write_jsonl(Path(tempfile.mkdtemp()) / "train.jsonl", rows)
    cfg = DataConfig(
        source=str(train_file),
        task_args={"task": P.TASK},
        system_prompt=P.SYSTEM_PROMPT,
        num_eval=0,
        seed=seed,
    )
    task, eos = get_task(P.TASK), tok.eos_token_id
    mixed, uniform, same_ids = [], [], True
    torch.manual_seed(seed)
    for prompt in PromptData(cfg, tok).prompts_in_order():
        ids = torch.tensor([prompt.token_ids])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, num_return_sequences=n,
                pad_token_id=tok.pad_token_id or eos,
            )  # fmt: skip
        group = []
        for seq in out[:, ids.shape[1] :].tolist():
            resp = seq[: seq.index(eos) + 1] if eos in seq else seq  # the engines keep the EOS token
            text = tok.decode(resp, skip_special_tokens=True)
            group.append(
                {"response_ids": resp, "text": text, "reward": float(task.check(text, prompt.label))}
            )
        entry = {"user": rows[prompt.index]["prompt"], "token_ids": prompt.token_ids, "label": prompt.label,
                 "samples": group}  # fmt: skip
        entry["trl_ids_equal"] = P.trl_ids(tok, entry["user"]) == prompt.token_ids
        same_ids &= entry["trl_ids_equal"]
        rewards = {s["reward"] for s in group}
        (mixed if len(rewards) > 1 else uniform).append(entry)
        if len(mixed) >= prompts - 1 and uniform:
            break
    groups = mixed[: prompts - 1] + uniform[:1]
    batch = {"model_dir": model_dir, "n": n, "max_new_tokens": max_new_tokens, "seed": seed,
             "synthetic_rewards": False, "prompt_ids_identical_both_sides": same_ids, "groups": groups}  # fmt: skip
    if len(mixed) < prompts - 1:  # the model scored too few mixed groups: alternate 0/1 (said in the JSON)
        batch["synthetic_rewards"] = True
        for g in groups:
            for i, s in enumerate(g["samples"]):
                s["reward"] = float(i % 2)
    path.write_text(json.dumps(batch))
    return batch


# ---------------------------------------------------------------------------------------------- ours
def unflatten_masters(wrapper, names: dict[int, str], which: str) -> dict[str, torch.Tensor]:
    """Per-parameter views of DeepSpeed ZeRO-1/2's flat fp32 partition (world size 1: the whole group),
    `which` = "master" (the weights) or "grad" (what Adam steps on)."""
    out = {}
    for params, flat in zip(wrapper.round_robin_bit16_groups, wrapper.single_partition_of_fp32_groups):
        src = flat if which == "master" else flat.grad
        offset = 0
        for p in params:
            out[names[id(p)]] = src[offset : offset + p.numel()].view(p.shape).detach().clone()
            offset += p.numel()
    return out


def run_ours(batch: dict, dtype: str) -> dict:
    """One step of our learner on the batch (fp32: CPU config; bf16: the config a GPU learner gets)."""
    from rlhf.algorithms.advantages import compute_advantages
    from rlhf.config.loader import load_config
    from rlhf.loop.batch import make_train_batch
    from rlhf.types import Prompt, Sample
    from tests.test_learner_reference import learner_run_steps, make_learner

    cfg = load_config("configs/quickstart.yaml", [*OURS_OVERRIDES, f"model.dtype={dtype}"])
    if dtype == "bfloat16":  # as test_learner_reference.bf16_learner: make_ds_config refuses bf16 on CPU
        import rlhf.trainer.ds_config as ds_config

        gpu_config = ds_config.make_ds_config
        ds_config.make_ds_config = lambda tc, device, dt, ws, **kw: gpu_config(tc, "cuda", dt, ws, **kw)
    learner = make_learner(cfg, batch["model_dir"])
    samples = [
        Sample(
            group=g,
            prompt=Prompt(index=g, text="", token_ids=e["token_ids"], label=e["label"]),
            response_ids=s["response_ids"],
            response_text=s["text"],
            logprobs=None,
            finish_reason="stop",
            reward=s["reward"],
        )  # fmt: skip
        for g, e in enumerate(batch["groups"])
        for s in e["samples"]
    ]
    tb = make_train_batch(samples, 0)
    tb.advantages = compute_advantages(cfg.algorithm, tb.rewards, tb.group, tb.loss_mask)
    module = learner.engine.module
    names = {id(p): n for n, p in module.named_parameters()}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    adam, wrapper = learner.engine.basic_optimizer, learner.optimizer
    seen = {}

    def grab(opt, args, kwargs):  # gradients as Adam gets them (after DeepSpeed's clipping)
        if dtype == "float32":
            seen["grads"] = {
                names[id(p)]: p.grad.detach().float().clone() for g in opt.param_groups for p in g["params"]
            }
        else:
            seen["grads"] = unflatten_masters(wrapper, names, "grad")
            seen["masters_before"] = unflatten_masters(wrapper, names, "master")

    handle = adam.register_step_pre_hook(grab)
    (stats,) = learner_run_steps(learner, tb, 1)
    handle.remove()
    grads = seen["grads"]
    clipped = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
    scale = stats["grad_norm"] / clipped  # undo the clip: pre-clip gradients (a uniform factor)
    after = {n: p.detach().clone() for n, p in module.named_parameters()}
    out = {
        "loss": stats["loss"], "grad_norm": stats["grad_norm"], "lr": stats["lr"],
        "advantages": tb.advantages.sum(1).div(tb.loss_mask.sum(1).clamp(min=1)).tolist(),
        "grads": {n: g * scale for n, g in grads.items()},
        "num_tokens": float(tb.loss_mask.sum()),
    }  # fmt: skip
    if dtype == "float32":
        out["delta"] = {n: after[n] - before[n] for n in before}
    else:
        masters = unflatten_masters(wrapper, names, "master")
        out["delta"] = {n: masters[n] - seen["masters_before"][n] for n in masters}
        out["changed_module_weights"] = sum(int((after[n] != before[n]).sum()) for n in before)
        out["changed_masters"] = sum(int((out["delta"][n] != 0).sum()) for n in masters)
    out["numel"] = sum(p.numel() for p in before.values())
    return out


# ---------------------------------------------------------------------------------------------- TRL
def run_trl(batch: dict, dtype: str, trl_path: str) -> dict:
    """TRL's compute_loss on the inputs `_generate_and_score_completions` would build, then its optimizer."""
    sys.path.insert(0, trl_path)
    import datasets
    import trl
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import nanstd

    from experiments.learning.prompts import messages

    n, rows = batch["n"], len(batch["groups"]) * batch["n"]
    ds = datasets.Dataset.from_list(
        [{"prompt": messages(e["user"]), "answer": e["label"]} for e in batch["groups"]]
    )
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=rows, gradient_accumulation_steps=1,
        num_generations=n, max_completion_length=batch["max_new_tokens"], temperature=1.0, learning_rate=1e-5,
        lr_scheduler_type="constant", beta=0.0, epsilon=0.2, use_vllm=False, use_cpu=True,
        bf16=dtype == "bfloat16", report_to="none", shuffle_dataset=False, logging_steps=1,
    )  # fmt: skip
    trainer = GRPOTrainer(model=batch["model_dir"], reward_funcs=lambda **kw: [0.0] * len(kw["prompts"]),
                          args=args, train_dataset=ds)  # fmt: skip
    tok, model = trainer.processing_class, trainer.model
    pad = tok.pad_token_id
    samples = [(e, s) for e in batch["groups"] for s in e["samples"]]
    p_len = max(len(e["token_ids"]) for e, _ in samples)
    c_len = max(len(s["response_ids"]) for _, s in samples)
    prompt_ids = torch.tensor([[pad] * (p_len - len(e["token_ids"])) + e["token_ids"] for e, _ in samples])
    prompt_mask = torch.tensor(
        [[0] * (p_len - len(e["token_ids"])) + [1] * len(e["token_ids"]) for e, _ in samples]
    )
    completion_ids = torch.tensor(
        [s["response_ids"] + [pad] * (c_len - len(s["response_ids"])) for _, s in samples]
    )
    completion_mask = torch.tensor([[1] * len(s["response_ids"]) + [0] * (c_len - len(s["response_ids"])) for _, s in samples])  # fmt: skip
    # Advantages as grpo_trainer.py (TRL 1.16, `_generate_and_score_completions`, multi_objective_aggregation
    # "sum_then_normalize", scale_rewards "group") computes them, with its own nanstd (unbiased):
    rewards = torch.tensor([s["reward"] for _, s in samples])
    mean = torch.nanmean(rewards.view(-1, n), dim=1).repeat_interleave(n, dim=0)
    std = nanstd(rewards.view(-1, n), dim=1).repeat_interleave(n, dim=0)
    advantages = torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)
    assert trainer.scale_rewards == "group" and trainer.loss_type == "dapo"
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": None,
              "num_items_in_batch": completion_mask.sum()}  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one window = the whole batch
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = trainer.compute_loss(model, inputs)
    trainer.accelerator.backward(loss)
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters()}
    optimizer = trainer.create_optimizer()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)  # as Trainer does
    optimizer.step()
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    delta = {k: after[k] - before[k] for k in before}
    return {
        "loss": float(loss), "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"],
        "advantages": advantages.tolist(), "grads": grads, "delta": delta,
        "num_tokens": float(completion_mask.sum()), "trl": trl.__version__,
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "weight_dtype": str(next(model.parameters()).dtype),
        "changed_fp32_weights": sum(int((delta[k] != 0).sum()) for k in delta),
        "changed_bf16_weights": sum(int((after[k].bfloat16() != before[k].bfloat16()).sum()) for k in delta),
        "numel": sum(p.numel() for p in before.values()),
        "optimizer": type(optimizer).__name__, "weight_decay": args.weight_decay,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- compare
def cos_and_ratio(a: dict, b: dict, keys) -> dict:
    """cosine(a, b), |a| / |b| over the given parameter names (float64)."""
    dot = na = nb = 0.0
    for k in keys:
        x, y = a[k].double().flatten(), b[k].double().flatten()
        dot, na, nb = dot + float(x @ y), na + float(x @ x), nb + float(y @ y)
    return {"cosine": dot / math.sqrt(na * nb) if na and nb else float("nan"),
            "norm_ratio": math.sqrt(na / nb) if nb else float("nan")}  # fmt: skip


def compare(a: dict, b: dict) -> dict:
    """a against b (b the reference): overall and per group."""
    keys = sorted(b)
    out = {"all": cos_and_ratio(a, b, keys)}
    for g in GROUPS:
        out[g] = cos_and_ratio(a, b, [k for k in keys if group_of(k) == g])
    diff = math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys))
    ref = math.sqrt(sum(float(b[k].double().square().sum()) for k in keys))
    out["rel_l2_diff"] = diff / ref
    return out


def visible_drift(model_dir: str, delta: dict, ks=(1, 2, 5, 10, 20)) -> dict:
    """What a bf16 forward sees of k equal updates `delta` (Adam's early steps are ~lr * sign(g), so
    k x the first step is the drift of a steady gradient), from two starting points: the fp32 checkpoint
    (TRL: fp32 weights, autocast rounds them per matmul) and the checkpoint rounded to bf16 (ours: the
    module is loaded in bf16, so the fp32 masters start on the bf16 grid). Per k: the fraction of
    elements whose bf16 value moved, the projection <v, k delta> / |k delta|^2 of the visible change
    v = round(w0 + k delta) - round(w0) on the intended one (1: all of it, on average), and |v| / |k delta|
    (above the projection: rounding noise)."""
    from safetensors.torch import load_file

    ckpt = load_file(str(Path(model_dir) / "model.safetensors"))
    out = {
        "not_bf16_representable_in_checkpoint": sum(
            int((w != w.bfloat16().float()).sum()) for w in ckpt.values()
        )
    }
    numel = sum(d.numel() for d in delta.values())
    for label, start in (
        ("from_fp32_checkpoint", lambda w: w),
        ("from_bf16_grid", lambda w: w.bfloat16().float()),
    ):
        rows = []
        for k in ks:
            moved = seen = wanted = along = 0.0
            for name, d in delta.items():
                w0 = start(ckpt[name].float())
                step = (w0 + k * d).bfloat16().double() - w0.bfloat16().double()
                moved += int((step != 0).sum())
                seen += float(step.square().sum())
                along += float((step * (k * d.double())).sum())
                wanted += float((k * d.double()).square().sum())
            rows.append(
                {"k": k, "fraction_changed": moved / numel, "visible_projection": along / wanted,
                 "visible_norm_ratio": math.sqrt(seen / wanted)}
            )  # fmt: skip
        out[label] = rows
    return out


def run_part(part: str, batch_file: Path, out_file: Path, trl_path: str) -> None:
    side, dtype = part.split(":")
    batch = json.loads(batch_file.read_text())
    torch.manual_seed(0)
    result = run_ours(batch, dtype) if side == "ours" else run_trl(batch, dtype, trl_path)
    torch.save(result, out_file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--prompts", type=int, default=5, help="groups: prompts-1 with mixed rewards, 1 all-equal"
    )
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="also ours bf16 (GPU config) and TRL bf16 autocast")
    ap.add_argument("--trl-path", default=TRL_PATH)
    ap.add_argument("--work", default="/tmp/same_batch")
    ap.add_argument("--out", default="experiments/results/learning/same_batch_cpu.json")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    batch_file = work / "batch.json"
    if args.part:
        return run_part(args.part, batch_file, Path(args.part_out), args.trl_path)

    # an earlier call's parts used this batch: keep it (another --work for a new one)
    if batch_file.is_file():
        batch = json.loads(batch_file.read_text())
    else:
        batch = build_batch(batch_file, args.prompts, args.n, args.max_new_tokens, args.seed)
    parts = ["ours:float32", "trl:float32"] + (["ours:bfloat16", "trl:bfloat16"] if args.bf16 else [])
    res = {}
    for part in parts:
        out_file = work / (part.replace(":", "_") + ".pt")
        if not out_file.is_file():
            cmd = [sys.executable, __file__, "--part", part, "--part-out", str(out_file), "--work", str(work),
                   "--trl-path", args.trl_path]  # fmt: skip
            subprocess.run(cmd, check=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
        res[part] = torch.load(out_file, weights_only=False)
    ours, theirs = res["ours:float32"], res["trl:float32"]
    adv_o, adv_t = torch.tensor(ours["advantages"]), torch.tensor(theirs["advantages"])
    nz = adv_t.abs() > 0
    summary = {
        "what": "one GRPO step on one fixed batch: ours (Learner + DeepSpeed) vs TRL GRPOTrainer.compute_loss",
        "batch": {"groups": len(batch["groups"]), "n": batch["n"], "max_new_tokens": batch["max_new_tokens"],
                  "rewards": [[s["reward"] for s in g["samples"]] for g in batch["groups"]],
                  "synthetic_rewards": batch["synthetic_rewards"], "num_tokens": ours["num_tokens"],
                  "prompt_ids_identical_both_sides": batch["prompt_ids_identical_both_sides"],
                  "response_lengths": [[len(s["response_ids"]) for s in g["samples"]] for g in batch["groups"]]},
        "trl": {k: theirs[k] for k in ("trl", "optimizer", "weight_decay", "lr")},
        "fp32": {
            "advantages_ours": ours["advantages"], "advantages_trl": theirs["advantages"],
            "advantage_ratio_trl_over_ours": (adv_t[nz] / adv_o[nz]).tolist(),
            "loss_ours": ours["loss"], "loss_trl": theirs["loss"],
            "num_tokens_ours": ours["num_tokens"], "num_tokens_trl": theirs["num_tokens"],
            "grad_norm_ours": ours["grad_norm"], "grad_norm_trl": theirs["grad_norm"], "lr": [ours["lr"], theirs["lr"]],
            "grad_ours_vs_trl": compare(ours["grads"], theirs["grads"]),
            "update_ours_vs_trl": compare(ours["delta"], theirs["delta"]),
            "update_max_abs": [max(float(d.abs().max()) for d in r["delta"].values()) for r in (ours, theirs)],
        },
    }  # fmt: skip
    if args.bf16:
        ob, tb = res["ours:bfloat16"], res["trl:bfloat16"]
        summary["bf16"] = {
            "trl_mixed_precision": tb["mixed_precision"], "trl_weight_dtype": tb["weight_dtype"],
            "loss": {"ours": ob["loss"], "trl": tb["loss"]}, "grad_norm": {"ours": ob["grad_norm"], "trl": tb["grad_norm"]},
            "grad_ours_bf16_vs_ours_fp32": compare(ob["grads"], ours["grads"]),
            "grad_trl_bf16_vs_trl_fp32": compare(tb["grads"], theirs["grads"]),
            "grad_ours_bf16_vs_trl_bf16": compare(ob["grads"], tb["grads"]),
            "update_ours_bf16_vs_ours_fp32": compare(ob["delta"], ours["delta"]),
            "update_trl_bf16_vs_trl_fp32": compare(tb["delta"], theirs["delta"]),
            "numel": ob["numel"],
            "ours_changed_bf16_module_weights": ob["changed_module_weights"],
            "ours_changed_fp32_masters": ob["changed_masters"],
            "trl_changed_fp32_weights": tb["changed_fp32_weights"],
            "trl_changed_bf16_roundings": tb["changed_bf16_weights"],
        }  # fmt: skip
        summary["bf16"]["visible_drift_of_k_steps"] = visible_drift(batch["model_dir"], ours["delta"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "batch"}, indent=1))


if __name__ == "__main__":
    main()
