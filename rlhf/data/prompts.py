"""Prompt pipeline: load or generate prompts, apply the chat template, tokenize, serve batches.

Batches walk a seeded permutation per epoch, so `(seed, epoch, position)` pins down exactly which
prompts come next: that triple is all a checkpoint needs to resume the stream.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np

from rlhf.config.schema import DataConfig
from rlhf.data.formats import LAYOUTS, layout_problem, resolve_format
from rlhf.tasks import Task, get_task
from rlhf.types import Prompt

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
EVAL_SEED_OFFSET = 1_000_003  # eval prompts of built-in tasks come from another seed stream


def column_problems(cfg: DataConfig, columns: list[str], task: str | None) -> tuple[str | None, str | None]:
    """(error, warning) for a data file's columns against input_key and label_key: a missing input
    column, or a missing label column where a task checker needs labels, is an error; a missing label
    column otherwise a warning. With a GSM8K/MATH `data.format`, a missing column of that layout is an
    error. Shared by loading (PromptData) and `rlhf validate` (rlhf/cli/preflight.py)."""
    fmt = resolve_format(cfg.format, columns)
    if fmt in LAYOUTS:
        return layout_problem(fmt, cfg.source, columns), None
    shown = ", ".join(columns) or "none"
    if cfg.input_key not in columns:
        return f"data.input_key {cfg.input_key!r} is not a column of {cfg.source} (columns: {shown})", None
    if cfg.label_key in columns:
        return None, None
    message = f"data.label_key {cfg.label_key!r} is not a column of {cfg.source} (columns: {shown})"
    return (message + f"; task {task!r} needs labels", None) if task else (None, message)


class PromptData:
    """Train/eval prompts for one run; `task` is the checker for the labels (None without one)."""

    def __init__(self, cfg: DataConfig, tokenizer: Any):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.seed = 0 if cfg.seed is None else cfg.seed  # null outside a RunConfig: seed 0
        self.epoch = 0
        self.position = 0
        self.num_dropped = 0
        self.requeued: list[Prompt] = []  # served again before new prompts (see `requeue`)
        generator_args = {k: v for k, v in cfg.task_args.items() if k != "task"}

        if cfg.source.startswith(BUILTIN_PREFIX):
            self.task: Task | None = get_task(cfg.source.removeprefix(BUILTIN_PREFIX))
            if hasattr(self.task, "rows"):  # a fixed built-in set (humaneval): held out like a file
                train_rows, eval_rows = self._hold_out(self.task.rows())
            else:
                train_rows, eval_rows = self._generate(self.task, generator_args)
        else:
            name = cfg.task_args.get("task")
            self.task = get_task(name) if name else None
            train_rows, eval_rows = self._load_rows()

        # Train prompts are rendered and tokenized when first served (cheap start-up for 100k-row
        # datasets); eval prompts up front. Over-long prompts are skipped and counted.
        if cfg.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            logger.warning(
                "data.apply_chat_template: the tokenizer has no chat template; prompts are used as raw text"
            )
        self.train_rows = train_rows
        self._train_cache: dict[int, Prompt | None] = {}
        self.eval = [p for p in self._encode(eval_rows, "eval") if p is not None]
        if not self.train_rows:
            raise ValueError(f"data.source {cfg.source!r}: no training prompts")
        self._order = self._permutation(self.epoch)

    # ----------------------------------------------------------------------------- loading
    def _generate(self, task: Task, args: dict) -> tuple[list[dict], list[dict]]:
        """Train from `seed`; eval from other seeds, with any prompt seen in train removed."""
        cfg = self.cfg
        train = [
            {**row, "index": i} for i, row in enumerate(task.generate(cfg.num_train, seed=self.seed, **args))
        ]
        seen = {row["prompt"] for row in train}
        evals: list[dict] = []
        for attempt in range(10):
            if len(evals) >= cfg.num_eval:
                break
            for row in task.generate(
                max(cfg.num_eval, 16), seed=self.seed + EVAL_SEED_OFFSET + attempt, **args
            ):
                if row["prompt"] not in seen and len(evals) < cfg.num_eval:
                    seen.add(row["prompt"])
                    evals.append({**row, "index": len(evals)})
        if len(evals) < cfg.num_eval:
            logger.warning(
                "%s: only %d eval prompts are disjoint from the %d train prompts (asked for %d)",
                cfg.source,
                len(evals),
                len(train),
                cfg.num_eval,
            )
        return train, evals

    def _load_dataset(self):
        import datasets

        cfg = self.cfg
        path = os.path.expanduser(cfg.source)
        if os.path.isdir(path):
            if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
                os.path.join(path, "dataset_dict.json")
            ):
                ds = datasets.load_from_disk(path)  # save_to_disk output
                if isinstance(ds, datasets.DatasetDict):
                    if cfg.split not in ds:
                        raise ValueError(f"data.split {cfg.split!r} not in {path} (splits: {', '.join(ds)})")
                    ds = ds[cfg.split]
                return ds
            return datasets.load_dataset(path, split=cfg.split)  # a folder of jsonl/parquet/... files
        if os.path.isfile(path):
            ext = os.path.splitext(path)[1].lower()
            if ext not in FILE_FORMATS:
                raise ValueError(
                    f"data.source {path!r}: unsupported file type (use {', '.join(FILE_FORMATS)})"
                )
            if os.path.getsize(path) == 0:
                raise ValueError(f"data.source {path!r} is an empty file")
            return datasets.load_dataset(FILE_FORMATS[ext], data_files=path, split="train")
        if path.startswith(("/", ".", "~")) or os.path.splitext(path)[1].lower() in FILE_FORMATS:
            raise FileNotFoundError(f"data.source {cfg.source!r}: no such file or directory")
        try:
            return datasets.load_dataset(cfg.source, cfg.subset, split=cfg.split)
        except Exception as e:
            raise ConnectionError(
                f"data.source {cfg.source!r} is not a local file, directory or built-in task "
                f"(builtin:<task>), and loading it from the Hugging Face hub failed: {e}"
            ) from e

    def _load_rows(self) -> tuple[list[dict], list[dict]]:
        cfg = self.cfg
        ds = self._load_dataset()
        error, label_warning = column_problems(cfg, ds.column_names, self.task.name if self.task else None)
        if error:
            raise KeyError(error)
        has_labels = label_warning is None
        if label_warning:
            logger.warning("%s; prompts get label=None", label_warning)
        layout = LAYOUTS.get(resolve_format(cfg.format, ds.column_names))
        if layout is not None:  # GSM8K / MATH: the label comes out of the worked solution, once
            inputs = ds[layout.input_key]
            labels = [layout.label_of(solution) for solution in ds[layout.solution_key]]
        else:
            inputs = ds[cfg.input_key]
            labels = ds[cfg.label_key] if has_labels else [None] * len(ds)
        rows, skipped = [], {}
        for i, (p, a) in enumerate(zip(inputs, labels)):
            problem = prompt_problem(p) or (layout.missing if layout is not None and a is None else None)
            if problem:
                skipped.setdefault(problem, []).append(i)
                continue
            rows.append({"prompt": p, "answer": a, "index": i})
        what = "; ".join(f"{len(at)} with {problem} (first: row {at[0]})" for problem, at in skipped.items())
        if not rows:
            raise ValueError(
                f"data.source {cfg.source!r}: no usable prompt in {len(ds)} row(s): {what or 'empty'}"
            )
        if skipped:
            self.num_skipped_rows = sum(len(at) for at in skipped.values())
            logger.warning("data.source %s: skipped %d row(s): %s", cfg.source, self.num_skipped_rows, what)
        return self._hold_out(rows)

    def _hold_out(self, rows: list[dict]) -> tuple[list[dict], list[dict]]:
        """Hold out num_eval rows (a seeded choice) for evaluation; train on the rest."""
        cfg = self.cfg
        rows = [{**row, "index": row.get("index", i)} for i, row in enumerate(rows)]
        if cfg.num_eval >= len(rows):
            raise ValueError(
                f"data.num_eval={cfg.num_eval} leaves no training rows in {cfg.source} ({len(rows)} rows)"
            )
        held_out = set(np.random.default_rng(self.seed).permutation(len(rows))[: cfg.num_eval].tolist())
        train = [r for r in rows if r["index"] not in held_out]
        evals = [r for r in rows if r["index"] in held_out]
        return train, evals

    # ---------------------------------------------------------------------------- encoding
    num_skipped_rows = 0  # file rows without a usable prompt (see `prompt_problem`)

    def _render(self, user: Any) -> tuple[str, bool]:
        """Prompt text, and whether it came from the chat template (which adds its own specials)."""
        cfg, tok = self.cfg, self.tokenizer
        messages = user if isinstance(user, list) else [{"role": "user", "content": str(user)}]
        if cfg.apply_chat_template and getattr(tok, "chat_template", None):
            if cfg.system_prompt and messages[0].get("role") != "system":
                messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), True
        if isinstance(user, list):
            raise ValueError(
                f"data.source {cfg.source!r}: prompts are chat messages but the tokenizer has no chat "
                "template (or data.apply_chat_template is false)"
            )
        text = str(user)
        return (f"{cfg.system_prompt}\n\n{text}" if cfg.system_prompt else text), False

    def _encode(self, rows: list[dict], split: str) -> list[Prompt | None]:
        """Prompts for `rows`, None where one exceeds max_prompt_tokens (counted and logged)."""
        tok = self.tokenizer
        rendered = [self._render(row["prompt"]) for row in rows]
        prompts: list[Prompt | None] = []
        for row, (text, _), ids in zip(rows, rendered, self._tokenize(rendered)):
            bos = tok.bos_token_id
            if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
                ids = ids[1:]  # raw text that already began with BOS
            if len(ids) > self.cfg.max_prompt_tokens:
                prompts.append(None)
                continue
            extra = {k: v for k, v in row.items() if k not in ("prompt", "answer", "index")}
            metadata = {"split": split, "raw_prompt": row["prompt"], **extra}
            if self.task is not None:
                metadata["task"] = self.task.name
            prompts.append(
                Prompt(index=row["index"], text=text, token_ids=ids, label=row["answer"], metadata=metadata)
            )
        dropped = sum(p is None for p in prompts)
        if split == "train":
            self.num_dropped += dropped
        if dropped:
            logger.warning(
                "%s (%s): dropped %d prompt(s) longer than data.max_prompt_tokens=%d%s",
                self.cfg.source,
                split,
                dropped,
                self.cfg.max_prompt_tokens,
                f" ({self.num_dropped} of {len(self.train_rows)} so far)" if split == "train" else "",
            )
        return prompts

    def _tokenize(self, rendered: list[tuple[str, bool]]) -> list[list[int]]:
        """Chat templates already write BOS etc., so their text is tokenized without adding specials."""
        ids: list[list[int]] = [[] for _ in rendered]
        for is_chat in (True, False):
            where = [i for i, (_, chat) in enumerate(rendered) if chat == is_chat]
            if where:
                encoded = self.tokenizer([rendered[i][0] for i in where], add_special_tokens=not is_chat)
                for i, row_ids in zip(where, encoded["input_ids"]):
                    ids[i] = list(row_ids)
        return ids

    # ----------------------------------------------------------------------------- serving
    def __len__(self) -> int:
        """Training rows, including any that turn out too long when served."""
        return len(self.train_rows)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.train_rows))

    def next_batch(self, k: int) -> list[Prompt]:
        """The next k training prompts; crossing the end of an epoch reshuffles and continues.

        Prompts handed back with `requeue` come first. Each prompt's `metadata["epoch"]` says which
        pass over the data it belongs to."""
        batch: list[Prompt] = []
        while self.requeued and len(batch) < k:
            batch.append(self.requeued.pop(0))
        while len(batch) < k:
            if self.position >= len(self._order):
                if self.num_dropped == len(self.train_rows):
                    raise ValueError(
                        f"data.source {self.cfg.source!r}: every prompt is longer than "
                        f"data.max_prompt_tokens={self.cfg.max_prompt_tokens}"
                    )
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = self._order[self.position : self.position + k - len(batch)].tolist()
            self.position += len(take)
            new = [i for i in take if i not in self._train_cache]
            for i, prompt in zip(new, self._encode([self.train_rows[i] for i in new], "train")):
                self._train_cache[i] = prompt
            batch += [
                dataclasses.replace(
                    self._train_cache[i], metadata={**self._train_cache[i].metadata, "epoch": self.epoch}
                )
                for i in take
                if self._train_cache[i] is not None
            ]
        return batch

    def requeue(self, prompts: list[Prompt]) -> None:
        """Serve these prompts again before any new one (asynchronous RL: their samples went stale)."""
        self.requeued.extend(prompts)

    def eval_prompts(self) -> list[Prompt]:
        return list(self.eval)

    def prompts_in_order(self, limit: int | None = None) -> list[Prompt]:
        """The first `limit` usable rows in file order, encoded as eval prompts (an evaluation set
        read whole, where nothing is held out)."""
        rows = self.train_rows[:limit] if limit else self.train_rows
        return [p for p in self._encode(rows, "eval") if p is not None]

    def state_dict(self, pending: list[Prompt] = ()) -> dict:
        """Position in the prompt stream. `pending`: prompts handed out but not trained on yet (an
        asynchronous run's buffer); they are saved with the requeued ones and served first on resume."""
        again = [(p.index, p.metadata.get("epoch", self.epoch)) for p in [*self.requeued, *pending]]
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "requeued": again}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"data state was saved with seed {state['seed']} but data.seed is {self.seed}; "
                "resuming would replay a different prompt stream"
            )
        if not 0 <= state["position"] <= len(self.train_rows):
            raise ValueError(f"data state position {state['position']} outside 0..{len(self.train_rows)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
        self.requeued = []
        position_of = {row["index"]: pos for pos, row in enumerate(self.train_rows)}
        for index, epoch in state.get("requeued", []):
            pos = position_of[index]  # Prompt.index is the dataset row; the cache is by train position
            if pos not in self._train_cache:
                (self._train_cache[pos],) = self._encode([self.train_rows[pos]], "train")
            prompt = self._train_cache[pos]
            self.requeued.append(dataclasses.replace(prompt, metadata={**prompt.metadata, "epoch": epoch}))


def is_fixed_set(source: str | None) -> bool:
    """A built-in source that is a fixed set of rows (humaneval): read whole, in order, not generated."""
    if not source or not source.startswith(BUILTIN_PREFIX):
        return False
    try:
        return hasattr(get_task(source.removeprefix(BUILTIN_PREFIX)), "rows")
    except KeyError:
        return False


def prompt_problem(prompt: Any) -> str | None:
    """Why a dataset row's prompt cannot be used (None when it can): text or chat messages only."""
    if prompt is None:
        return "a null prompt"
    if isinstance(prompt, str):
        return None if prompt.strip() else "an empty prompt"
    if isinstance(prompt, list):
        ok = prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        )
        return None if ok else "malformed chat messages (expected [{role, content}, ...] strings)"
    return f"a prompt of type {type(prompt).__name__} (expected text or chat messages)"
