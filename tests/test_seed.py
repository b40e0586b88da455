"""The top-level `seed` seeds the whole run: data order, held-out split, sampling and initialisation,
unless `data.seed` / `rollout.seed` are set."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config.loader import load_config

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs/quickstart.yaml"


def test_sub_seeds_follow_the_top_level_seed_unless_set():
    cfg = load_config(QUICKSTART, ["seed=3"])
    assert (cfg.seed, cfg.data.seed, cfg.rollout.seed) == (3, 3, 3)
    cfg = load_config(QUICKSTART, ["seed=3", "data.seed=7"])
    assert (cfg.seed, cfg.data.seed, cfg.rollout.seed) == (3, 7, 3)
    cfg = load_config(QUICKSTART, ["rollout.seed=5"])
    assert (cfg.seed, cfg.data.seed, cfg.rollout.seed) == (0, 0, 5)


def test_seed_changes_the_data_order_and_the_held_out_split(tiny_model_dir):
    from transformers import AutoTokenizer

    from rlhf.data.prompts import PromptData

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def first(seed: int) -> tuple[list[int], list[str]]:
        cfg = load_config(QUICKSTART, [f"seed={seed}", f"model.path={tiny_model_dir}"])
        data = PromptData(cfg.data, tok)
        return [p.index for p in data.next_batch(8)], [p.text for p in data.eval_prompts()][:8]

    assert first(1) == first(1)
    order_1, held_1 = first(1)
    order_2, held_2 = first(2)
    assert order_1 != order_2
    assert held_1 != held_2


@pytest.mark.slow
def test_seed_changes_the_samples(tiny_model_dir):
    """The engine samples from `rollout.seed` (the top-level seed unless set, above): the same seed
    gives the same samples for the same prompts, another seed others (a real CPU vLLM engine)."""
    from rlhf.rollout.engine import RolloutEngine
    from transformers import AutoTokenizer

    from rlhf.types import Prompt

    cfg = load_config(QUICKSTART, ["seed=1", f"model.path={tiny_model_dir}", "rollout.max_model_len=256"])
    cfg.rollout.gpu_memory_utilization = 0.01
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [Prompt(i, t, tok(t)["input_ids"]) for i, t in enumerate(["Compute 12 + 7.", "The sum of"])]
    engine = RolloutEngine(tiny_model_dir, cfg.rollout, "cpu")
    try:

        def samples(seed: int) -> list[list[int]]:
            engine.cfg.seed = seed
            return [s.response_ids for s in engine.generate(prompts, n=4)]

        first = samples(1)
        assert samples(2) != first
        assert samples(1) == first
    finally:
        engine.shutdown()
