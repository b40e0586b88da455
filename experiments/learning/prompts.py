"""The prompt sets both sides share: one fixed held-out set and, per seed, a train pool disjoint from it.

The held-out set comes from its own generator seed and is the same for every seed and invocation, so
greedy accuracies from separate calls can be merged. Each seed's train pool holds exactly the prompts
the budget consumes (steps x prompts_per_step, one epoch) with every held-out prompt removed, so the
held-out prompts are never trained on by construction, not by luck of the generator.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from rlhf.tasks import get_task

TASK = "arithmetic"
TASK_ARGS = {"difficulty": 1}  # configs/quickstart.yaml
SYSTEM_PROMPT = "You are a calculator. Reply with the result."  # configs/quickstart.yaml
HELD_OUT_SEED = 987_654_321  # far from the training seeds (0, 1, 2, ...) and from data.EVAL_SEED_OFFSET


def held_out_rows(n: int) -> list[dict]:
    """n distinct prompts from the held-out generator seed (the same n always gives the same rows)."""
    rows, seen, chunk = [], set(), 0
    while len(rows) < n:
        for row in get_task(TASK).generate(4 * n, seed=HELD_OUT_SEED + chunk, **TASK_ARGS):
            if row["prompt"] not in seen and len(rows) < n:
                seen.add(row["prompt"])
                rows.append(row)
        chunk += 1
        if chunk > 10:
            raise ValueError(f"held-out: only {len(rows)} distinct prompts, asked for {n}")
    return rows


def train_rows(seed: int, n: int, held_out: list[dict]) -> list[dict]:
    """n prompts from the training generator at `seed`, none of them a held-out prompt."""
    banned = {row["prompt"] for row in held_out}
    rows: list[dict] = []
    size = n + len(held_out)
    while len(rows) < n:
        rows = [r for r in get_task(TASK).generate(size, seed=seed, **TASK_ARGS) if r["prompt"] not in banned]
        size *= 2
    return rows[:n]


def messages(user: str) -> list[dict]:
    """The chat both sides render: quickstart's system prompt, then the task prompt."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def fingerprint(rows: list[dict]) -> str:
    """Short hash of prompts and answers, to check that merged results saw the same set."""
    text = json.dumps([[r["prompt"], r["answer"]] for r in rows])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_overrides(train_file: Path, seed: int, num_train: int) -> list[str]:
    """Our config overrides that make `rlhf train` read exactly this pool (nothing held out of it)."""
    return [
        f"data.source={train_file}",
        "data.task_args={task: " + TASK + "}",
        f"data.system_prompt={SYSTEM_PROMPT}",
        f"data.num_train={num_train}",
        "data.num_eval=0",
        f"data.seed={seed}",
    ]


def served_order(train_file: Path, seed: int, steps: int, per_step: int, tokenizer: Any) -> list[Any]:
    """The prompts our driver serves, step by step (rlhf.data.prompts.PromptData with the run's data config);
    TRL gets its dataset in this order with shuffling off, so both train on the same batches."""
    from rlhf.config.schema import DataConfig
    from rlhf.data.prompts import PromptData

    cfg = DataConfig(
        source=str(train_file),
        task_args={"task": TASK},
        system_prompt=SYSTEM_PROMPT,
        num_train=steps * per_step,
        num_eval=0,
        seed=seed,
    )
    data = PromptData(cfg, tokenizer)
    return [p for _ in range(steps) for p in data.next_batch(per_step)]


def held_out_prompts(held_out_file: Path, tokenizer: Any) -> list[Any]:
    """Held-out prompts rendered and tokenized by our data pipeline (the evaluator's input)."""
    from rlhf.config.schema import DataConfig
    from rlhf.data.prompts import PromptData

    cfg = DataConfig(
        source=str(held_out_file), task_args={"task": TASK}, system_prompt=SYSTEM_PROMPT, num_eval=0
    )
    return PromptData(cfg, tokenizer).prompts_in_order()


def trl_ids(tokenizer: Any, user: str) -> list[int]:
    """Token ids as TRL's GRPOTrainer builds them for a conversational prompt (apply_chat_template with
    tokenize=True), to check they equal ours (chat template as text, then tokenized without specials)."""
    out = tokenizer.apply_chat_template(
        [messages(user)], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(out["input_ids"][0])
