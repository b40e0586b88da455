"""Tiny random models for tests: a real tokenizer and a real architecture, built in a second or two.

The tokenizer is a byte-level BPE trained on the spot (so any text round-trips, as with real LLM
tokenizers) and the model is a genuine LlamaForCausalLM / Qwen2ForCausalLM with random weights, so
vLLM, transformers and DeepSpeed treat it exactly like a downloaded checkpoint.
"""

from __future__ import annotations

import os
import random
from typing import Literal

import torch

from rlhf.data.models import portable_tokenizer_config

BOS, EOS, PAD = "<|endoftext|>", "<|im_end|>", "<|pad|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [BOS, IM_START, EOS, PAD]

# ChatML, the format of SmolLM2 and Qwen2. `bos_token` renders as nothing when the tokenizer has none.
CHAT_TEMPLATE = (
    "{{ bos_token if add_bos else '' }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "and",
    "is",
    "in",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "what",
    "how",
    "many",
    "compute",
    "answer",
    "number",
    "numbers",
    "sum",
    "difference",
    "product",
    "result",
    "equals",
    "plus",
    "minus",
    "times",
    "divided",
    "by",
    "using",
    "each",
    "once",
    "make",
    "target",
    "expression",
    "final",
    "just",
    "give",
    "step",
    "think",
    "let",
    "us",
    "first",
    "then",
    "so",
    "we",
    "get",
    "correct",
    "value",
    "total",
    "left",
    "right",
    "question",
    "user",
    "assistant",
    "system",
    "you",
    "are",
    "helpful",
    "please",
    "solve",
    "problem",
    "reason",
    "box",
    "tags",
]


def _corpus(rng: random.Random, lines: int = 3000) -> list[str]:
    """Arithmetic and plain-English lines: enough variety for a few hundred BPE merges."""
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*/")
        out.append(f"Compute {a} {op} {b}. Answer: {rng.randint(-999, 9999)}")
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ".")
        out.append(f"<answer>({a} + {b}) * {rng.randint(1, 99)}</answer>")
    return out


def build_tokenizer(vocab_size: int = 512, seed: int = 0, add_bos: bool = False):
    """Train a byte-level BPE tokenizer with chat special tokens; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(random.Random(seed)), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"vocab_size={vocab_size}: the tokenizer reached only {tok.get_vocab_size()} tokens")
    if add_bos:  # Llama style: the tokenizer itself prepends BOS to every encoded text
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        chat_template=CHAT_TEMPLATE.replace("add_bos", "true" if add_bos else "false"),
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    out_dir: str,
    arch: Literal["llama", "qwen2"] = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> str:
    """Save a random `arch` model + trained tokenizer to `out_dir` (deterministic in `seed`).

    head_dim = hidden_size // heads must be >= 32 for vLLM's CPU attention kernels. The llama
    variant's tokenizer prepends BOS (like Llama); the qwen2 variant's does not (like Qwen2).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if hidden_size % heads or hidden_size // heads < 32:
        raise ValueError(f"hidden_size/heads = {hidden_size}/{heads}: head_dim must be an integer >= 32")
    tokenizer = build_tokenizer(vocab_size, seed, add_bos=arch == "llama")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,  # SmolLM2 and the small Qwen2.5 models tie them
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    if arch == "llama":
        config, model_cls = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "qwen2":
        config, model_cls = Qwen2Config(**common, use_sliding_window=False), Qwen2ForCausalLM
    else:
        raise ValueError(f"arch={arch!r}: expected 'llama' or 'qwen2'")
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = model_cls(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    portable_tokenizer_config(os.path.join(out_dir, "tokenizer_config.json"), config.max_position_embeddings)
    return out_dir


def random_token_rows(rows: int, width: int, prompt: int, generator):
    """Right-padded random token rows of different lengths (at least prompt + 3 tokens), for learner
    tests: (input_ids, attention_mask, loss_mask), the loss on everything after the first `prompt`."""
    import torch

    lengths = torch.randint(prompt + 3, width + 1, (rows,), generator=generator)
    attention = (torch.arange(width)[None] < lengths[:, None]).long()
    input_ids = torch.randint(3, 500, (rows, width), generator=generator) * attention
    loss_mask = attention.float()
    loss_mask[:, :prompt] = 0
    return input_ids, attention, loss_mask


def random_train_batch(rows: int, width: int, prompt: int, generator):
    """A right-padded TrainBatch of random rows (`random_token_rows`) for learner tests: pi_old and the
    engine's logprobs around -2 (so ratios start near 1), one random advantage per row."""
    from rlhf.types import TrainBatch

    input_ids, attention, loss_mask = random_token_rows(rows, width, prompt, generator)
    old = (-2.0 + 0.3 * torch.randn(rows, width, generator=generator)) * loss_mask
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=loss_mask,
        rollout_logprobs=old.clone(),
        advantages=(torch.randn(rows, 1, generator=generator) * loss_mask).contiguous(),
        rewards=torch.zeros(rows),
        old_logprobs=old,
    )


def whole_batch_step(batch, micro_batch_tokens: int, padded: bool = False) -> dict:
    """The step dict `Learner.train` takes for one optimizer step on all of `batch`'s rows, packed into
    micro-batches of `micro_batch_tokens` (padded: rows x longest), normalised over the whole batch."""
    from rlhf.algorithms.losses import loss_normalizers
    from rlhf.trainer.packing import pack_micro_batches, row_lengths

    num_tokens, num_sequences = loss_normalizers(batch.loss_mask)
    return {
        "micro_batches": pack_micro_batches(row_lengths(batch), micro_batch_tokens, padded=padded),
        "num_micro": None,
        "global_num_tokens": num_tokens,
        "global_num_sequences": num_sequences,
    }


def vllm_model_on_cpu(model_dir: str, dtype: str = "float32", quantization: str | None = None):
    """vLLM's own model class for `model_dir`, built in this process on CPU with its weight loaders.

    No engine: the parameters are as vLLM creates them, before any post-load processing, so tests can
    drive `model.load_weights` (vLLM's real name mapping and stacked-parameter loaders) directly.
    `quantization` (e.g. `fp8_per_channel`): vLLM's online quantization, whose layers quantize when
    their weights are loaded; the model also records what vLLM's layer-wise reload needs, as vLLM's
    model loader does.
    Initialises vLLM's single-rank parallel state (gloo) once per process. Returns (model, config)."""
    import socket

    from vllm.config import DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.model_executor.model_loader.utils import get_model_architecture

    model_config = ModelConfig(model=model_dir, dtype=dtype, quantization=quantization)
    config = VllmConfig(model_config=model_config, device_config=DeviceConfig("cpu"))
    with set_current_vllm_config(config):
        if not model_parallel_is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, backend="gloo")
            initialize_model_parallel(1, 1)
        model_cls, _ = get_model_architecture(model_config)
        if quantization is None:
            model = model_cls(vllm_config=config, prefix="")
        else:
            from vllm.model_executor.model_loader.utils import initialize_model
            from vllm.utils.torch_utils import set_default_torch_dtype

            with set_default_torch_dtype(model_config.dtype):
                model = initialize_model(vllm_config=config, model_class=model_cls)
    return model, config


def step_record(run_dir, step: int) -> tuple[list, dict]:
    """What a run did at `step`: its dumped samples as (prompt index, epoch, response) and its metrics
    row; resume tests compare a resumed run's record with the uninterrupted run's."""
    import json
    from pathlib import Path

    from rlhf.production.metrics import read_metrics

    run_dir = Path(run_dir)
    samples = [json.loads(r) for r in (run_dir / "samples.jsonl").read_text().splitlines()]
    metrics = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] == step]
    return [(s["index"], s["epoch"], s["response"]) for s in samples if s["step"] == step], metrics[0]


def rewind_run(run: str, step: int) -> None:
    """Make run directory `run` (a path or a storage URI) look as if the run had died right after its
    `step` checkpoint: later checkpoints removed, `latest.json` pointing at it, the metrics and samples
    of later steps dropped. Resume tests then check that a resume redoes the next step the same way."""
    import json

    from rlhf.production import storage

    root = f"{run}/checkpoints"
    for name in storage.list_names(root):
        if name.startswith("step_") and name[5:].isdigit() and int(name[5:]) > step:
            storage.delete(f"{root}/{name}")
    storage.write_json(f"{root}/latest.json", {"step": step, "dir": f"step_{step:06d}"})
    for name in ("metrics.jsonl", "samples.jsonl"):
        rows = storage.read_bytes(f"{run}/{name}").decode().splitlines()
        kept = [r for r in rows if json.loads(r)["step"] <= step]
        storage.write_bytes(f"{run}/{name}", "".join(r + "\n" for r in kept).encode())
