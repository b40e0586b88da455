"""The one evaluation for both sides: greedy decoding on the held-out prompts with one vLLM engine.

Run as `python -m experiments.learning.greedy_eval SPEC.json`. The engine starts once from the base
model; every other model's safetensors are loaded into it the way our engines take a weight sync (prefix
cache off), so each policy is scored by the same engine, dtype, prompts and batch. The base model is scored
first and again last: equal accuracies show that the weight swaps reached the engine and back.
Appends one JSON line per model to SPEC's out file as it goes (a crash keeps the models before it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def load_state_dict(model_dir: str) -> dict:
    """All tensors of an HF directory's safetensors files, on the CPU."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors file")
    tensors: dict = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def load_into_worker(worker, tensors: dict) -> int:
    """Runs inside the vLLM worker: our engines' reload path (rlhf/sync/engine_extension.py), direct
    `load_weights` on a GPU, vLLM's layer-wise reload on the CPU (whose backend repacks GEMM weights
    after loading, so a plain `load_weights` finds empty parameters). Returns the tensors loaded."""
    import torch

    from rlhf.sync.engine_extension import _layerwise_reload_api, _reprocess, _tied_followers, reload_mode

    model = worker.rlhf_model()
    api = _layerwise_reload_api() if reload_mode(model, "auto") == "layerwise" else None
    tied = _tied_followers(model) if api else []
    with worker.rlhf_config_context(), torch.no_grad():
        if api:
            api[0](model)
        names = model.load_weights(tensors.items())
        if api:
            api[1](model, worker.vllm_config.model_config)
            _reprocess(tied)
    return len(names or ())


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = (
        "0"  # in-process engine: collective_rpc takes our function and tensors as they are
    )
    from rlhf.rollout.engine import WORKER_EXTENSION
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from experiments.learning.prompts import TASK, held_out_prompts
    from rlhf.tasks import get_task

    base = spec["base_model"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = held_out_prompts(Path(spec["held_out_file"]), tokenizer)
    on_cpu = spec["device"] == "cpu"
    kwargs = dict(
        model=base,
        dtype=spec["dtype"],
        seed=0,
        max_model_len=spec.get("max_model_len", 512),
        enforce_eager=on_cpu,
        enable_prefix_caching=False,  # a cached prefix would carry the previous model's KV
        worker_extension_cls=WORKER_EXTENSION,  # rlhf_model / rlhf_config_context for the reload
    )
    if on_cpu:
        import psutil

        kwargs["distributed_executor_backend"] = "uni"
        kwargs["kv_cache_memory_bytes"] = int(0.05 * psutil.virtual_memory().total)
    else:
        kwargs["gpu_memory_utilization"] = spec.get("gpu_memory_utilization", 0.3)
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"], seed=0)
    inputs = [TokensPrompt(prompt_token_ids=p.token_ids) for p in prompts]
    task = get_task(TASK)
    out = Path(spec["out_file"])
    current = base
    for item in [{"key": "base", "path": base}, *spec["models"], {"key": "base_recheck", "path": base}]:
        t0 = time.perf_counter()
        record: dict = {"key": item["key"], "path": item["path"]}
        try:
            if item["path"] != current:
                tensors = load_state_dict(item["path"])
                loaded = llm.collective_rpc(load_into_worker, args=(tensors,))
                record["tensors_loaded"] = loaded[0]
                current = item["path"]
            record["engine_checksum"] = llm.collective_rpc("rlhf_weight_checksum")[0]  # differs per model
            completions = llm.generate(inputs, params, use_tqdm=False)
            texts = [c.outputs[0].text for c in completions]
            scores = [task.check(text, p.label) for text, p in zip(texts, prompts)]
            record.update(
                accuracy=sum(scores) / len(scores),
                num_prompts=len(scores),
                mean_tokens=sum(len(c.outputs[0].token_ids) for c in completions) / len(completions),
                examples=[
                    {"prompt": p.metadata["raw_prompt"], "response": t} for p, t in zip(prompts[:2], texts)
                ],
            )
        except Exception as e:  # one bad checkpoint must not lose the others
            record["error"] = f"{type(e).__name__}: {e}"
            current = None  # a half-loaded engine: load the next model whatever it is
        record["eval_s"] = time.perf_counter() - t0
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"greedy {item['key']}: {record.get('accuracy', record.get('error'))}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
