"""Placement planning on inventories, memory estimates, the cost model, the CLI and real Ray groups."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf.cli.main import main
from rlhf.config.loader import ConfigError, load_config
from rlhf.placement import (
    Inventory,
    Node,
    PlacementError,
    estimate_params,
    learner_bytes_per_param,
    load_inventory,
    make_plan,
    overrides_to_args,
    params_from_hf_config,
    propose_plan,
)
from rlhf.placement.memory import activation_bytes_per_token, learner_memory, logits_bytes

REPO = Path(__file__).resolve().parents[1]
INVENTORIES = REPO / "configs" / "inventories"


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps: 2\nrollout:\n  sampling: {n: 4}\n")
    return path


def inventory(name: str) -> Inventory:
    return load_inventory(INVENTORIES / f"{name}.yaml")


ALL_ROLES = [
    "algorithm.kl_coef=0.05",
    "algorithm.advantage=gae",
    "trainer.critic.enabled=true",
    "reward.sources=[{kind: model, path: /models/rm}]",
]


# ---------------------------------------------------------------------------------------------- planning


def test_laptop_plan_shares_two_cores_between_five_roles(recipe):
    cfg = load_config(recipe, [*ALL_ROLES, "placement.learner.replicas=2"])
    plan = make_plan(cfg, inventory("laptop"))
    assert plan.device == "cpu"
    assert plan.roles == ["rollout", "learner", "reference", "critic", "reward_model"]
    replicas = [a for role in plan.roles for a in plan.assignments[role]]
    assert len(replicas) == 6
    assert all(a.num_gpus == 0 and a.gpus == [] and a.node == "laptop" for a in replicas)
    # 6 replicas asking 1 CPU each are scaled to 75% of the 2 cores: 1.5 / 6 = 0.25 each.
    assert [a.num_cpus for a in replicas] == [0.25] * 6
    assert sum(b["CPU"] for g in plan.groups for b in g.bundles) == pytest.approx(1.5)


def test_inactive_roles_are_not_planned(recipe):
    plan = make_plan(load_config(recipe), inventory("laptop"))
    assert plan.roles == ["rollout", "learner"] and not plan.has_role("reference")


def test_heterogeneous_placement_follows_accelerator_types(recipe):
    cfg = load_config(
        recipe,
        [
            "placement.learner={replicas: 8, accelerator_type: H100}",
            "placement.rollout={replicas: 8, accelerator_type: L4}",
        ],
    )
    plan = make_plan(cfg, inventory("h100x8_l4x8"))
    assert plan.device == "cuda"
    assert {a.node for a in plan.assignments["learner"]} == {"h100"}
    assert {a.node for a in plan.assignments["rollout"]} == {"l4"}
    assert sorted(g for a in plan.assignments["learner"] for g in a.gpus) == list(range(8))
    assert all(a.num_gpus == 1 for a in plan.assignments["rollout"])
    assert plan.groups[0].bundles[0] == {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001}
    assert plan.gpu_types() == {"H100": 8, "L4": 8}
    table = plan.describe()
    assert "role     replica  node  gpu  num_gpus  num_cpus  peak/GPU  host" in table
    assert "l4 gpu 0,1,2,3,4,5,6,7: ~21.9 GB / 26 GB each" in table  # 0.85 x 24 GiB (25.8 GB) per engine


def test_too_few_gpus_of_a_type(recipe):
    cfg = load_config(recipe, ["placement.learner={replicas: 4, accelerator_type: H100}"])
    with pytest.raises(PlacementError) as info:
        make_plan(cfg, inventory("h100x1"))
    assert str(info.value) == "placement.learner: needs 4 GPUs of type H100 but the cluster has 1 (H100: 1)"


def test_gpus_used_up_by_earlier_roles(recipe):
    cfg = load_config(
        recipe,
        [
            "algorithm.kl_coef=0.1",
            "placement.learner={replicas: 8, accelerator_type: H100}",
            "placement.reference={replicas: 1, accelerator_type: H100}",
        ],
    )
    with pytest.raises(PlacementError) as info:
        make_plan(cfg, inventory("h100x8_l4x8"))
    assert str(info.value) == (
        "placement.reference: needs 1 GPUs of type H100 but only 0 are free after placing learner "
        "(H100: 8, L4: 8); colocate roles or lower replicas"
    )
    cfg = load_config(recipe, ["algorithm.kl_coef=0.1", "placement.colocate=[[learner, reference]]",
                               "placement.learner={replicas: 8, accelerator_type: H100}",
                               "placement.reference={replicas: 8}"])  # fmt: skip
    plan = make_plan(cfg, inventory("h100x8_l4x8"))
    assert [a.gpus for a in plan.assignments["reference"]] == [[g] for g in range(8)]


def test_cuda_without_gpus(recipe):
    with pytest.raises(PlacementError, match=r"^placement.device: cuda but .*laptop.yaml has no GPUs$"):
        make_plan(load_config(recipe, ["placement.device=cuda"]), inventory("laptop"))


def test_colocation_shares_each_gpu(recipe):
    cfg = load_config(recipe, ["algorithm.kl_coef=0.1", "placement.colocate=[[rollout, learner, reference]]"])
    plan = make_plan(cfg, inventory("h100x1"))
    assert [g.name for g in plan.groups] == ["rollout+learner+reference"]
    assert plan.groups[0].bundles == [{"CPU": 3.0, "GPU": 1.0}]
    for role in plan.roles:
        (a,) = plan.assignments[role]
        assert (a.gpus, a.num_gpus, a.bundle) == ([0], 0.3333, 0)
    assert plan.colocated("rollout", "learner") and plan.rollout_sleeps


def test_explicit_gpu_fractions(recipe):
    cfg = load_config(recipe, ["placement.colocate=[[rollout, learner]]", "placement.rollout.gpus=0.6"])
    plan = make_plan(cfg, inventory("h100x1"))
    assert plan.gpu_share == {"rollout": 0.6, "learner": 0.4}
    assert plan.assignments["learner"][0].num_gpus == 0.4


def test_tensor_parallel_engine_spans_gpus(recipe):
    cfg = load_config(
        recipe, ["rollout.tensor_parallel=2", "placement.rollout={replicas: 2, accelerator_type: L4}"]
    )
    plan = make_plan(cfg, inventory("h100x8_l4x8"))
    rollout = plan.assignments["rollout"]
    assert [(a.node, a.gpus, a.bundles, a.num_gpus) for a in rollout] == [
        ("l4", [0, 1], [0, 1], 0.0),  # vLLM's workers take the GPUs of the engine's bundles
        ("l4", [2, 3], [2, 3], 0.0),
    ]


def test_memory_does_not_fit(recipe):
    cfg = load_config(
        recipe, ["placement.learner={replicas: 1, accelerator_type: L4}", "trainer.zero_stage=2"]
    )
    with pytest.raises(PlacementError) as info:
        make_plan(cfg, inventory("h100x8_l4x8"), param_count=7e9)
    # 7e9 params x (16 bytes of states + 4 of fp32 gradients at the optimizer step; 1 rank: nothing
    # to shard) + 2 GB overhead = 142 GB on a 24 GB L4 (a size from a name: no activations counted).
    assert str(info.value).startswith(
        "placement.learner: needs ~142.0 GB on l4 gpu 0 (learner ~142.0) but a L4 has 26 GB; add learner"
    )
    # Eight ZeRO-3 ranks: 20/8 = 2.5 bytes/param -> 17.5 + 2 = 19.5 GB fits on H100s.
    cfg = load_config(
        recipe, ["placement.learner={replicas: 8, accelerator_type: H100}", "trainer.zero_stage=3"]
    )
    plan = make_plan(cfg, inventory("h100x8_l4x8"), param_count=7e9)
    assert plan.assignments["learner"][0].memory_gb == pytest.approx(19.5)


def test_rollout_weights_must_fit_the_engine(recipe):
    cfg = load_config(
        recipe,
        [
            "placement.rollout={replicas: 1, accelerator_type: L4}",
            "placement.learner={replicas: 8, accelerator_type: H100}",
            "trainer.zero_stage=3",
        ],
    )
    with pytest.raises(
        PlacementError, match=r"^placement.rollout: bf16 weights ~20.0 GB per GPU \(tensor_parallel=1\)"
    ):
        make_plan(cfg, inventory("h100x8_l4x8"), param_count=10e9)


def test_host_memory_on_cpu(recipe):
    cfg = load_config(recipe, ["model.path=Qwen/Qwen2.5-7B-Instruct"])
    with pytest.raises(
        PlacementError, match=r"^placement.learner: the roles need ~\d+ GB of host RAM for a 7.0B"
    ):
        make_plan(cfg, inventory("laptop"))


def test_strategies(recipe):
    nodes = [Node(f"n{i}", cpus=4, memory_gb=16, gpus=4, gpu_type="A10G", gpu_memory_gb=24) for i in range(2)]
    cluster = Inventory(nodes, source="two nodes")
    spread = load_config(recipe, ["placement.rollout={replicas: 2, strategy: SPREAD}"])
    assert [a.node for a in make_plan(spread, cluster).assignments["rollout"]] == ["n0", "n1"]
    # PACK fills n0 (after the learner on its GPU 0) before n1.
    pack = load_config(recipe, ["placement.rollout={replicas: 2, strategy: PACK}"])
    assert [a.node for a in make_plan(pack, cluster).assignments["rollout"]] == ["n0", "n0"]
    strict = load_config(recipe, ["placement.rollout={replicas: 3, strategy: STRICT_SPREAD}"])
    with pytest.raises(
        PlacementError, match=r"^placement.rollout: cannot place 3 bundle\(s\) .* on distinct nodes"
    ):
        make_plan(strict, cluster)
    strict_pack = load_config(recipe, ["placement.rollout={replicas: 5, strategy: STRICT_PACK}"])
    with pytest.raises(PlacementError, match=r"on one node \(STRICT_PACK\)"):
        make_plan(strict_pack, cluster)


def test_custom_resources(recipe):
    cluster = Inventory([Node("n0", cpus=8, memory_gb=32, resources={"ssd": 1})], source="one node")
    cfg = load_config(recipe, ["placement.device=cpu", "placement.learner.resources={ssd: 1}"])
    plan = make_plan(cfg, cluster)
    assert plan.assignments["learner"][0].resources == {"ssd": 1.0}
    cfg = load_config(
        recipe, ["placement.device=cpu", "placement.learner={replicas: 2, resources: {ssd: 1}}"]
    )
    with pytest.raises(
        PlacementError, match=r"^placement.learner.resources.ssd: needs 2 in total but the cluster has 1$"
    ):
        make_plan(cfg, cluster)


# ---------------------------------------------------------------------------------------------- estimates


def test_params_from_hf_config_matches_transformers():
    hf = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100, "tie_word_embeddings": True,
    }  # fmt: skip
    # embed 100*64 = 6400; per layer: q,o 2*64*64 + k,v 2*64*32 = 12288, mlp 3*64*128 = 24576, norms 128
    assert params_from_hf_config(hf) == 6400 + 2 * (12288 + 24576 + 128) + 64
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**hf))
    assert params_from_hf_config(hf) == sum(p.numel() for p in model.parameters())


def test_estimate_params(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 10, "intermediate_size": 16,'
        ' "num_attention_heads": 2, "tie_word_embeddings": false}'
    )
    # embed 80 + layer (attn 4*64 + mlp 3*8*16 + norms 16 = 656) + final norm 8 + head 80
    assert estimate_params(str(tmp_path)) == 80 + 656 + 8 + 80
    assert estimate_params("Qwen/Qwen2.5-7B-Instruct") == 7e9
    assert estimate_params("meta-llama/Llama-3.1-70B") == 70e9
    assert estimate_params("smollm2-135m-instruct") == 135e6
    assert estimate_params("some/model") is None


def test_learner_bytes_per_param():
    assert learner_bytes_per_param(0, 8, False) == 16  # 2 weights + 2 grads + 12 Adam (fp32 master, m, v)
    assert learner_bytes_per_param(1, 4, False) == 2 + 2 + 3
    assert learner_bytes_per_param(2, 8, False) == 2 + 0.25 + 1.5
    assert learner_bytes_per_param(3, 4, False) == 4
    assert learner_bytes_per_param(0, 1, True) == 4


# ---------------------------------------------------------------------------------------------- cost model


def test_propose_heterogeneous_puts_learners_on_h100_and_rollout_on_l4(recipe):
    cfg = load_config(recipe, ["algorithm.kl_coef=0.05", "model.path=Qwen/Qwen2.5-7B-Instruct"])
    proposal = propose_plan(cfg, inventory("h100x8_l4x8"))
    assert proposal == {
        "placement": {
            "device": "cuda",
            "colocate": [["learner", "reference"]],
            "learner": {"replicas": 8, "accelerator_type": "H100"},
            "reference": {"replicas": 8, "accelerator_type": "H100"},
            # 7B bf16 = 14 GB > half of 0.85 x 24 GB: two L4s per engine.
            "rollout": {"replicas": 4, "accelerator_type": "L4"},
        },
        "rollout": {"tensor_parallel": 2},
    }
    proposed = load_config(
        recipe,
        [*overrides_to_args(proposal), "algorithm.kl_coef=0.05", "model.path=Qwen/Qwen2.5-7B-Instruct"],
    )
    plan = make_plan(proposed, inventory("h100x8_l4x8"))
    assert {a.node for a in plan.assignments["learner"] + plan.assignments["reference"]} == {"h100"}
    assert {a.node for a in plan.assignments["rollout"]} == {"l4"}


def test_propose_homogeneous_and_cpu(recipe):
    cfg = load_config(recipe, ["model.path=Qwen/Qwen2.5-32B"])
    proposal = propose_plan(cfg, inventory("h100x1"))
    # 32B x 16 B = 512 GB: ZeRO-3 on one rank does not help, so the optimizer goes to the CPU.
    assert proposal["placement"]["colocate"] == [["rollout", "learner"]]
    assert proposal["trainer"] == {"zero_stage": 3, "offload_optimizer": True}
    assert propose_plan(cfg, inventory("laptop")) == {"placement": {"device": "cpu"}}
    assert overrides_to_args({"placement": {"colocate": [["a", "b"]], "device": "cuda"}, "x": None}) == [
        'placement.colocate=[["a", "b"]]',
        "placement.device=cuda",
        "x=null",
    ]


# ---------------------------------------------------------------------------------------------- inventory


def test_inventory_file_errors(tmp_path):
    def bad(text: str) -> str:
        path = tmp_path / "inv.yaml"
        path.write_text(textwrap.dedent(text))
        with pytest.raises(ConfigError) as info:
            load_inventory(path)
        return str(info.value).replace(str(path), "inv.yaml")

    assert bad("nodes: [{gpus: 2}]") == "inv.yaml: nodes[0].gpu_type: required when gpus > 0 (e.g. H100, L4)"
    assert bad("nodes: [{gpu: 2}]") == "inv.yaml: nodes[0].gpu: unknown key; did you mean 'nodes[0].gpus'?"
    assert bad("nodes: [{cpus: many}]") == "inv.yaml: nodes[0].cpus: must be a number (got 'many')"
    assert bad("nodes: []") == "inv.yaml: nodes: must be a non-empty list of nodes"
    path = tmp_path / "ok.yaml"
    path.write_text("nodes: [{name: a10, count: 3, gpus: 4, gpu_type: A10G}]")
    inv = load_inventory(path)
    assert [n.name for n in inv.nodes] == ["a10-0", "a10-1", "a10-2"]
    assert inv.gpu_counts() == {"A10G": 12} and inv.nodes[0].gpu_memory_gb == 24


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_plan_with_inventory(recipe, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["plan", str(recipe), "--inventory", str(INVENTORIES / "h100x8_l4x8.yaml"), "--propose"])
    out = capsys.readouterr().out
    assert code == 0
    assert "proposed overrides:\n  placement.device=cuda\n" in out
    assert "placement.learner.accelerator_type=H100" in out and "placement.rollout.accelerator_type=L4" in out
    assert "placement group 1 (rollout): PACK, 8 bundle(s)" in out


def test_cli_plan_errors(recipe, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    h100 = str(INVENTORIES / "h100x1.yaml")
    assert main(["plan", str(recipe), "placement.learner.replicas=2", "--inventory", h100]) == 3
    assert (
        capsys.readouterr().err == "error: placement.learner: needs 2 GPUs but the cluster has 1 (H100: 1)\n"
    )
    assert main(["plan", str(recipe), "--inventory", str(recipe.parent / "none.yaml")]) == 2
    assert "inventory file not found" in capsys.readouterr().err
    assert main(["plan", str(recipe)]) == 0  # this machine
    assert "inventory: local machine" in capsys.readouterr().out


def test_planner_does_not_import_ray():
    """`rlhf plan` / `rlhf validate --inventory` plan, propose and fail on a laptop without Ray."""
    code = textwrap.dedent(
        """
        import sys
        from rlhf.config.loader import load_config
        from rlhf.placement.inventory import load_inventory
        from rlhf.placement.plan import PlacementError, make_plan
        from rlhf.placement.propose import overrides_to_args, propose_plan

        inv = load_inventory(sys.argv[1])
        cfg = load_config(sys.argv[2])
        assert overrides_to_args(propose_plan(cfg, inv))
        assert "placement group 0" in make_plan(cfg, inv).describe()
        try:
            make_plan(load_config(sys.argv[2], ["placement.learner.replicas=64"]), inv)
        except PlacementError:
            pass
        loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
        assert not loaded, loaded[:3]
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(INVENTORIES / "h100x8_l4x8.yaml"), str(REPO / "configs/grpo.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_placement_on_cpu(recipe, ray_cluster, tiny_model_dir):
    from rlhf.placement import RayPlacement, inventory_from_ray

    ray = ray_cluster
    live = inventory_from_ray()
    assert sum(n.cpus for n in live.nodes) == 2 and live.total_gpus == 0

    # A tiny model: the memory check must not depend on how much RAM the machine has free.
    cfg = load_config(recipe, [*ALL_ROLES, "placement.learner.replicas=2", f"model.path={tiny_model_dir}"])
    placement = RayPlacement(cfg)  # plans on the live cluster

    @ray.remote
    class Probe:
        def where(self):
            ctx = ray.get_runtime_context()
            return ctx.get_placement_group_id(), ctx.get_assigned_resources()

    try:
        actors = {
            role: [Probe.options(**o).remote() for o in placement.actor_options(role)]
            for role in placement.plan.roles
        }
        assert [len(a) for a in actors.values()] == [1, 2, 1, 1, 1]
        seen = {
            role: ray.get([a.where.remote() for a in group], timeout=60) for role, group in actors.items()
        }
        for role, results in seen.items():
            pg_id = placement.placement_group(role).id.hex()
            assert all(pg == pg_id for pg, _ in results)
            assert all(res == {"CPU": pytest.approx(0.25)} for _, res in results)  # 6 x 0.25 CPUs on 2 cores
        assert placement.gpu_share("rollout") == 0.0
        with pytest.raises(PlacementError, match=r"^placement.nope: role is not active"):
            placement.actor_options("nope")
        for group in actors.values():
            for actor in group:
                ray.kill(actor)
    finally:
        placement.remove()
    states = {pg["state"] for pg in ray.util.placement_group_table().values()}
    assert states == {"REMOVED"}


@pytest.mark.slow
def test_ray_placement_timeout_is_clear(recipe, ray_cluster):
    from rlhf.placement import RayPlacement

    cfg = load_config(recipe, ["placement.device=cpu", "placement.learner.cpus=16"])
    big = Inventory([Node("big", cpus=64, memory_gb=64)], source="imaginary")
    with pytest.raises(
        PlacementError, match=r"^placement.learner: placement group learner not ready after 2s"
    ):
        RayPlacement(make_plan(cfg, big), timeout_s=2)


# ---------------------------------------------------------------------------------------------- four GPUs
FOUR_GPU_RUN = [
    "placement.device=cuda",
    "trainer.zero_stage=3",
    "algorithm.kl_coef=0.05",
    "reward.sources=[{kind: model, path: /models/rm}]",
    "placement.learner.replicas=2",
    "placement.colocate=[[learner, reference, reward_model]]",
]


@pytest.mark.parametrize(
    "rollout", [["rollout.tensor_parallel=2"], ["placement.rollout.replicas=2"]], ids=["tp2", "two_engines"]
)
def test_four_gpu_plan_for_the_1_5b_shape(recipe, rollout):
    """The 1.5B-shape 4-GPU run, planned on the 4 x H100 inventory: the engines on two GPUs, a ZeRO-3
    learner over the other two with the reference and the reward model beside it; and the weight
    sync the planned layout gets (one NCCL broadcast from learner rank 0 to every engine worker)."""
    from rlhf.sync.routes import plan_routes

    cfg = load_config(recipe, [*FOUR_GPU_RUN, *rollout])
    plan = make_plan(cfg, inventory("h100x4"), param_count=1.54e9)
    gpus = {role: [a.gpus for a in plan.assignments[role]] for role in plan.roles}
    engine_gpus = {g for a in gpus["rollout"] for g in a}
    learner_gpus_ = {g for a in gpus["learner"] for g in a}
    assert len(engine_gpus) == len(learner_gpus_) == 2 and engine_gpus | learner_gpus_ == {0, 1, 2, 3}
    assert all(len(a) == 1 for a in gpus["learner"])  # one ZeRO-3 rank per GPU
    assert {g for a in gpus["reference"] + gpus["reward_model"] for g in a} <= learner_gpus_
    for role in ("learner", "reference", "reward_model"):
        assert all(a.num_gpus < 1 for a in plan.assignments[role])  # sharing the learner's GPUs
    # memory: ZeRO-3 over 2 ranks keeps 1.54e9 x 16 / 2 bytes + overhead per GPU, well inside 80 GB
    for (node, gpu), (used, total) in plan.gpu_memory_usage().items():
        assert used < total == 80 * 2**30 / 1e9, (node, gpu, used)  # H100: 80 GiB
    learner_gpus = [f"g{a.gpus[0]}" for a in plan.assignments["learner"]]
    worker_gpus = [[f"g{g}" for g in a.gpus] for a in plan.assignments["rollout"]]
    channels, routes = plan_routes("auto", "cuda", learner_gpus, worker_gpus)
    assert [(c.transport, c.sender) for c in channels] == [("broadcast", 0)]
    assert sum(len(r) for r in routes) == 2


# ------------------------------------------------------------------------------------ peak memory
def test_learner_memory_by_hand():
    """One rank, ZeRO-2, bf16 + fp32 Adam, a micro-batch of 1000 tokens of a made-up shape."""
    from rlhf.config.schema import TrainerConfig

    shape = {
        "hidden_size": 100,
        "intermediate_size": 300,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
    }
    # activations: 16 x 100 + 4 x 50 (2 KV heads of 25) + 8 x 300 = 4200 bytes per token and layer
    assert activation_bytes_per_token(shape, checkpointing=False) == 2 * 4200
    # checkpointed: each layer's input (2 x 100 bytes) plus one layer recomputed
    assert activation_bytes_per_token(shape, checkpointing=True) == 2 * 200 + 4200
    # logits: 4 bytes per token and vocabulary entry, plus two float32 chunks of 1024 tokens
    assert logits_bytes(shape, 1000) == 1000 * 1000 * 4 + 2 * 1024 * 1000 * 4
    trainer = TrainerConfig(zero_stage=2, micro_batch_tokens=1000)
    p = 1e9
    m = learner_memory(p, shape, trainer, ranks=1)
    work = 1000 * 8400 + logits_bytes(shape, 1000)  # 0.0206 GB, less than the step's 4 GB
    assert m.peak_gpu_gb == pytest.approx((2 + 2 + 12 + 4) * p / 1e9 + 2.0)  # the optimizer step's peak
    assert work < 4 * p
    assert m.resident_gpu_gb == m.peak_gpu_gb  # the caching allocator keeps the training peak
    assert m.host_gb == pytest.approx(3.0)
    released = learner_memory(p, shape, TrainerConfig(zero_stage=2, release_cache_before_wake=True), 1)
    assert released.resident_gpu_gb == pytest.approx((2 + 12) * p / 1e9)  # weights and Adam stay
    off = learner_memory(
        p, shape, TrainerConfig(zero_stage=2, micro_batch_tokens=1000, offload_optimizer=True), 1
    )
    assert off.peak_gpu_gb == pytest.approx((2 + 2) * p / 1e9 + work / 1e9 + 2.0)
    assert off.resident_gpu_gb == off.peak_gpu_gb
    assert off.host_gb == pytest.approx(3.0 + 16 * p / 1e9)  # fp32 master, m, v and gradients, pinned
    half = TrainerConfig(zero_stage=3, micro_batch_tokens=1000, offload_optimizer=True, offload_ratio=0.5)
    partial = learner_memory(p, shape, half, 1)
    assert partial.peak_gpu_gb == pytest.approx((2 + 2 + 6 + 2) * p / 1e9 + 2.0)  # half the states and step
    # the other half, plus what stage 3 pins besides: bf16 gradient partitions (2) and the GPU half's
    # fp32 gradient buffers, made on the host first (4 x 0.5)
    assert partial.host_gb == pytest.approx(3.0 + (8 + 2 + 2) * p / 1e9)
    parked = learner_memory(p, shape, TrainerConfig(zero_stage=2, offload_during_generation=True), 2)
    assert parked.resident_gpu_gb == 0.0
    assert parked.host_gb == pytest.approx(3.0 + (2 + 6) * p / 1e9)  # weights and this rank's Adam share


def test_7b_shape_on_one_h200_needs_the_optimizer_offloaded(seven_b_on_one_gpu):
    """Qwen2.5-7B colocated on one H200: without offload the fp32 Adam states do not fit, and validation
    says which key to set; with it the plan shows the GPU and the host memory."""
    overrides = seven_b_on_one_gpu
    cfg = load_config(REPO / "configs/quickstart.yaml", overrides)
    with pytest.raises(PlacementError) as info:
        make_plan(cfg, inventory("h200x1"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("placement.learner: needs ~") and "but a H200 has 151 GB" in message  # 141 GiB
    assert message.endswith("set trainer.offload_optimizer=true (then ~119 GB per GPU, ~145 GB host)"), (
        message
    )

    cfg.trainer.offload_optimizer = True
    plan = make_plan(cfg, inventory("h200x1"))
    params = estimate_params("qwen2.5-7b")
    assert params == pytest.approx(7.62e9, rel=0.01)
    learner = plan.assignments["learner"][0]
    assert learner.host_gb == pytest.approx(3.0 + 16 * params / 1e9)
    ((used, total),) = plan.gpu_memory_usage().values()
    assert used < total == 141 * 2**30 / 1e9  # 141 GiB
    assert "h200 host memory: ~" in plan.describe()
    # A host of 125 GB cannot pin the offloaded states: one line about host memory, naming partial
    # offload (half the optimizer states on the GPU) as the fix ...
    small = Inventory(
        [Node("h200", cpus=16, memory_gb=125, gpus=1, gpu_type="H200", gpu_memory_gb=141)], source="one H200"
    )
    with pytest.raises(PlacementError) as info:
        make_plan(cfg, small)
    message = str(info.value)
    assert re.match(r"placement.learner: needs ~\d+ GB of host memory on h200 \(", message), message
    fix = (
        "set trainer.zero_stage=3, trainer.offload_ratio=0.5 and trainer.release_cache_before_wake=true "
        "(then ~144 GB per GPU, ~115 GB host)"
    )
    assert message.endswith(fix), message
    # ... which then fits: 7.6B x (2 + 2 + 6 + 2) bytes on the GPU (the step's fp32 gradient half after
    # the activations: 16k tokens of a checkpointed 7B with its 152k vocabulary take ~18 GB).
    for key, value in (("zero_stage", 3), ("offload_ratio", 0.5), ("release_cache_before_wake", True)):
        setattr(cfg.trainer, key, value)
    plan = make_plan(cfg, small)
    learner = plan.assignments["learner"][0]
    assert learner.host_gb == pytest.approx(3.0 + (8 + 2 + 2) * params / 1e9)
    assert learner.memory_gb == pytest.approx((2 + 2 + 6) * params / 1e9 + 18.0 + 2.0, abs=0.1)
    assert learner.resident_gb == pytest.approx((2 + 2 + 6) * params / 1e9)  # ZeRO-3 keeps its gradients
    # vLLM sleep level 2 drops the engine's host copy of its bf16 weights.
    engine_host = plan.assignments["rollout"][0].host_gb
    cfg.rollout.sleep_level = 2
    assert make_plan(cfg, small).assignments["rollout"][0].host_gb == pytest.approx(
        engine_host - 2 * params / 1e9
    )
    # The same line from `rlhf validate`, exit code 3 (a placement error).
    shipped = str(INVENTORIES / "h200x1.yaml")
    assert main(["validate", str(REPO / "configs/quickstart.yaml"), "--inventory", shipped, *overrides]) == 3
