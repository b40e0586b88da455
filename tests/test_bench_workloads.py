"""The long-tailed benchmark workload: a random model rewired to end its answers at a set rate."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.bench.workloads import geometric_quantile, learning_rate, set_eos_rate, varied_prompt_lengths


def tiny_random_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=600,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        attention_bias=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_geometric_lengths_by_hand():
    rate = 1 - 0.5 ** (1 / 300)  # median 300 tokens
    assert geometric_quantile(rate, 0.5) == pytest.approx(300)
    assert geometric_quantile(rate, 0.95) == pytest.approx(300 * math.log(20) / math.log(2))
    lengths = varied_prompt_lengths(1000, 64, 1024)
    assert min(lengths) >= 64 and max(lengths) <= 1024 and len(set(lengths)) > 500
    assert lengths == varied_prompt_lengths(1000, 64, 1024)  # the same for every system


@pytest.mark.parametrize("tie", [True, False])
def test_sampled_answers_end_at_the_set_rate(tie):
    model = tiny_random_llama(tie)
    eos = 599
    with torch.no_grad():
        before = torch.softmax(model(input_ids=torch.randint(0, 598, (4, 32))).logits.float(), -1)[..., eos]
    assert float(before.mean()) < 0.01  # a random model ends answers as rarely as it says any token
    measured = set_eos_rate(model, eos, rate=0.05)
    assert measured == pytest.approx(0.05, rel=1e-3)  # on the probes, by construction
    # Sampling at temperature 1 from fresh prompts: the answers end at about that rate.
    torch.manual_seed(1)
    prompts = torch.randint(0, 598, (64, 16))
    out = model.generate(
        prompts,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=120,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    answers = out[:, 16:]
    ended = (answers == eos).any(dim=1)
    lengths = torch.where(
        ended, (answers == eos).int().argmax(dim=1) + 1, torch.full_like(ended, 120, dtype=torch.long)
    )
    # Geometric with p = 0.05: mean length min(...) ~ 20 * (1 - 0.95^120) = 19.6; 64 answers.
    assert 0.85 < float(ended.float().mean()) <= 1.0
    assert 12 < float(lengths.float().mean()) < 30


def test_every_system_trains_at_one_learning_rate_and_longtail_keeps_its_weights():
    assert learning_rate("fixed") == 1e-6
    assert learning_rate("longtail") == 1e-10  # lengths come from the weights: updates must not move them
    assert learning_rate("longtail", 3e-6) == 3e-6
