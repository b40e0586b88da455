"""Prompt pipeline: sources, key mapping, chat templates, deterministic resumable batches."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
from transformers import AutoTokenizer

from rlhf.config.schema import DataConfig
from rlhf.data.prompts import PromptData
from rlhf.tasks import get_task


@pytest.fixture(scope="module")
def llama_tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def qwen_tok(tiny_qwen_dir):
    return AutoTokenizer.from_pretrained(tiny_qwen_dir)


def builtin(**kw) -> DataConfig:
    return DataConfig(**{"source": "builtin:arithmetic", "num_train": 50, "num_eval": 8, **kw})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


QA = [{"question": f"Compute {i} + {i}.", "solution": 2 * i, "extra": "x"} for i in range(20)]


def test_builtin_prompts_are_chat_formatted_with_one_bos(llama_tok):
    data = PromptData(builtin(task_args={"difficulty": 1}), llama_tok)
    assert data.task is get_task("arithmetic") and len(data) == 50
    prompt = data.next_batch(1)[0]
    user = prompt.metadata["raw_prompt"]
    assert prompt.text == f"<|endoftext|><|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.token_ids == llama_tok(prompt.text, add_special_tokens=False).input_ids
    assert prompt.token_ids.count(llama_tok.bos_token_id) == 1  # the template's BOS, not a second one
    assert llama_tok.decode(prompt.token_ids) == prompt.text
    assert get_task("arithmetic").check(str(prompt.label), prompt.label) == 1.0
    assert prompt.metadata["task"] == "arithmetic" and prompt.metadata["difficulty"] == 1
    products = get_task("arithmetic").generate(20, seed=0, difficulty=2, operators="*")
    assert all(" * " in r["prompt"] and "+" not in r["prompt"] and " - " not in r["prompt"] for r in products)
    with pytest.raises(ValueError, match="operators"):
        get_task("arithmetic").generate(1, seed=0, operators="/")


def test_system_prompt_and_raw_text(qwen_tok, llama_tok):
    chat = PromptData(builtin(system_prompt="Be brief."), qwen_tok).next_batch(1)[0]
    assert chat.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    raw = PromptData(builtin(apply_chat_template=False), llama_tok).next_batch(1)[0]
    assert raw.text == raw.metadata["raw_prompt"]
    # Without a template the tokenizer's own specials are added once (Llama style: BOS first).
    assert raw.token_ids == [llama_tok.bos_token_id] + llama_tok(raw.text, add_special_tokens=False).input_ids


def test_jsonl_with_key_mapping(tmp_path, qwen_tok):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    cfg = DataConfig(
        source=path, input_key="question", label_key="solution", num_eval=4, task_args={"task": "arithmetic"}
    )
    data = PromptData(cfg, qwen_tok)
    assert data.task is get_task("arithmetic")
    assert len(data) == 16 and len(data.eval_prompts()) == 4
    everything = data.next_batch(16) + data.eval_prompts()
    assert sorted(p.index for p in everything) == list(range(20))  # train and eval partition the file
    for p in everything:
        assert p.metadata["raw_prompt"] == QA[p.index]["question"] and p.label == QA[p.index]["solution"]
        assert p.text.endswith("<|im_start|>assistant\n")


def test_parquet_and_arrow_dir(tmp_path, qwen_tok):
    ds = datasets.Dataset.from_list(QA)
    ds.to_parquet(str(tmp_path / "qa.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for source in (str(tmp_path / "qa.parquet"), str(tmp_path / "saved")):
        data = PromptData(
            DataConfig(source=source, input_key="question", label_key="solution", num_eval=2), qwen_tok
        )
        assert len(data) == 18 and data.task is None
        assert {p.label for p in data.next_batch(18)} | {p.label for p in data.eval_prompts()} == {
            2 * i for i in range(20)
        }


def test_chat_message_column(tmp_path, qwen_tok):
    rows = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": f"q{i}"}]}
        for i in range(3)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    data = PromptData(DataConfig(source=path, input_key="messages", num_eval=0), qwen_tok)
    texts = sorted(p.text for p in data.next_batch(3))
    assert (
        texts[0] == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq0<|im_end|>\n<|im_start|>assistant\n"
    )
    assert all(p.label is None for p in data.next_batch(3))


def test_missing_keys_list_the_columns(tmp_path, qwen_tok):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    with pytest.raises(KeyError, match=r"data.input_key 'prompt'.*columns: question, solution, extra"):
        PromptData(DataConfig(source=path, num_eval=2), qwen_tok)
    with pytest.raises(KeyError, match=r"data.label_key 'answer'.*columns: question, solution, extra"):
        PromptData(
            DataConfig(source=path, input_key="question", num_eval=2, task_args={"task": "arithmetic"}),
            qwen_tok,
        )


def test_missing_file_and_bad_extension(tmp_path, qwen_tok):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        PromptData(DataConfig(source=str(tmp_path / "nope.jsonl")), qwen_tok)
    (tmp_path / "data.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type"):
        PromptData(DataConfig(source=str(tmp_path / "data.txt")), qwen_tok)


def test_rows_without_a_usable_prompt_are_skipped_and_counted(tmp_path, qwen_tok, caplog):
    rows = [
        {"prompt": None, "answer": "1"},
        {"prompt": "  ", "answer": "2"},
        {"prompt": 17, "answer": "3"},
        {"prompt": [{"role": "user"}], "answer": "4"},
        *({"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)),
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level("WARNING"):
        data = PromptData(DataConfig(source=path, num_eval=0), qwen_tok)
    assert data.num_skipped_rows == 4
    (line,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    for what in ("a null prompt (first: row 0)", "an empty prompt (first: row 1)", "type int"):
        assert what in line, line
    assert "malformed chat messages" in line
    served = data.next_batch(6)
    assert sorted(p.index for p in served) == list(range(4, 10))  # dataset rows keep their index
    assert all("None" not in p.text for p in served)


def test_a_file_without_usable_prompts_or_rows_is_one_line(tmp_path, qwen_tok):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="is an empty file"):
        PromptData(DataConfig(source=str(tmp_path / "empty.jsonl")), qwen_tok)
    path = write_jsonl(tmp_path / "nulls.jsonl", [{"prompt": None, "answer": "1"}] * 3)
    with pytest.raises(ValueError, match=r"no usable prompt in 3 row\(s\): 3 with a null prompt"):
        PromptData(DataConfig(source=path, num_eval=0), qwen_tok)


def test_tokenizer_without_chat_template_or_pad_token(tmp_path, qwen_tok, caplog):
    import copy

    bare = copy.deepcopy(qwen_tok)
    bare.chat_template = None
    bare.pad_token = None
    with caplog.at_level("WARNING"):
        data = PromptData(builtin(), bare)
    assert any("no chat template" in r.getMessage() for r in caplog.records)
    prompt = data.next_batch(1)[0]
    assert prompt.text == prompt.metadata["raw_prompt"]  # raw text, no template markup
    # the driver pads with EOS when the tokenizer has no pad token
    assert bare.pad_token_id is None and bare.eos_token_id is not None


def test_long_prompts_dropped_and_counted(tmp_path, qwen_tok, caplog):
    rows = [{"prompt": "word " * (300 if i % 4 == 0 else 3), "answer": i} for i in range(20)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    data = PromptData(DataConfig(source=path, num_eval=0, max_prompt_tokens=64), qwen_tok)
    with caplog.at_level(logging.WARNING, logger="rlhf.data.prompts"):
        first_epoch = data.next_batch(15)
        data.next_batch(15)  # finishes epoch 0, so every row has been seen
    assert sorted(p.label for p in first_epoch) == [i for i in range(20) if i % 4]
    assert data.num_dropped == 5 and "longer than data.max_prompt_tokens=64" in caplog.text
    assert all(len(p.token_ids) <= 64 for p in first_epoch)


def test_all_prompts_too_long(tmp_path, qwen_tok):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 300, "answer": i} for i in range(3)])
    data = PromptData(DataConfig(source=path, num_eval=0, max_prompt_tokens=64), qwen_tok)
    with pytest.raises(ValueError, match="every prompt is longer"):
        data.next_batch(1)


def test_batches_are_deterministic_and_cover_each_epoch(qwen_tok):
    a, b = PromptData(builtin(), qwen_tok), PromptData(builtin(), qwen_tok)
    first = [p.index for p in a.next_batch(50)]
    assert first == [p.index for p in b.next_batch(50)]
    assert sorted(first) == list(range(50)) and first != list(range(50))  # a shuffled permutation
    assert a.state_dict() == {"epoch": 0, "position": 50, "seed": 0, "requeued": []}
    other_seed = PromptData(builtin(seed=1), qwen_tok)
    assert {p.text for p in other_seed.next_batch(50)} != {p.text for p in b.next_batch(50)}


def test_epoch_wrap(qwen_tok):
    data = PromptData(builtin(), qwen_tok)
    batches = [[p.index for p in data.next_batch(7)] for _ in range(8)]  # 56 prompts: 50 + 6
    flat = sum(batches, [])
    epoch0, epoch1 = flat[:50], flat[50:]
    assert sorted(epoch0) == list(range(50)) and len(set(epoch1)) == 6
    assert data.state_dict() == {"epoch": 1, "position": 6, "seed": 0, "requeued": []}
    rest = [p.index for p in data.next_batch(44)]
    assert sorted(epoch1 + rest) == list(range(50)) and epoch1 + rest != epoch0  # reshuffled


def test_requeued_prompts_come_first_keep_their_epoch_and_survive_a_resume(qwen_tok):
    data = PromptData(builtin(), qwen_tok)
    first = data.next_batch(4)
    assert {p.metadata["epoch"] for p in first} == {0}
    data.requeue(first[1:3])  # their samples went stale
    again = data.next_batch(3)
    assert [p.index for p in again[:2]] == [first[1].index, first[2].index]
    assert again[2].index not in {p.index for p in first}
    # a checkpoint saves requeued and pending (handed out, not trained) prompts; a resume serves them first
    data.requeue(again[:1])
    state = data.state_dict(pending=[again[2]])
    assert state["requeued"] == [(again[0].index, 0), (again[2].index, 0)]
    resumed = PromptData(builtin(), qwen_tok)
    resumed.load_state_dict(state)
    served = resumed.next_batch(3)
    assert [p.index for p in served[:2]] == [again[0].index, again[2].index]
    assert served[2].index == data.next_batch(2)[1].index  # then the stream goes on where it was


def test_resume_continues_with_the_next_prompts(qwen_tok):
    straight = PromptData(builtin(), qwen_tok)
    for _ in range(9):  # into the second epoch
        straight.next_batch(6)
    state = json.loads(json.dumps(straight.state_dict()))  # as a checkpoint stores it
    expected = [p.index for p in straight.next_batch(20)]

    resumed = PromptData(builtin(), qwen_tok)
    resumed.load_state_dict(state)
    assert [p.index for p in resumed.next_batch(20)] == expected

    with pytest.raises(ValueError, match="seed 0 but data.seed is 5"):
        PromptData(builtin(seed=5), qwen_tok).load_state_dict(state)


def test_eval_is_disjoint_from_train(qwen_tok):
    # difficulty 1 has 2 * 100 * 100 distinct prompts; 3000 train prompts make collisions likely.
    data = PromptData(builtin(num_train=3000, num_eval=200), qwen_tok)
    train = {row["prompt"] for row in data.train_rows}
    evals = [p.metadata["raw_prompt"] for p in data.eval_prompts()]
    assert len(evals) == 200 and len(set(evals)) == 200
    assert not train & set(evals)
    assert all(p.metadata["split"] == "eval" for p in data.eval_prompts())
    assert data.eval_prompts() == PromptData(builtin(num_train=3000, num_eval=200), qwen_tok).eval_prompts()


def test_countdown_builtin(qwen_tok):
    data = PromptData(builtin(source="builtin:countdown", task_args={"num_numbers": 3}), qwen_tok)
    prompt = data.next_batch(1)[0]
    assert len(prompt.label["numbers"]) == 3 and data.task.name == "countdown"
    assert data.task.check("<answer>0</answer>", prompt.label) == 0.0
