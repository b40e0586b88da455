"""KubeRay RayJob manifests, checked against the real RayJob CRD schema."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from rlhf.cli.main import main
from rlhf.config.loader import load_config
from rlhf.placement import load_inventory
from rlhf.placement.k8s import manifest_yaml, rayjob_manifest, validate_manifest

REPO = Path(__file__).resolve().parents[1]
# KubeRay's RayJob CRD, copied into the repository (provenance and licence: tests/data/kuberay/README.md)
CRD = REPO / "tests" / "data" / "kuberay" / "ray.io_rayjobs.yaml"

jsonschema = pytest.importorskip(
    "jsonschema", reason="jsonschema (a vLLM dependency) validates the CRD schema"
)


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "grpo_7b.yaml"
    path.write_text(
        "model: {path: Qwen/Qwen2.5-7B-Instruct}\n"
        "rollout: {sampling: {n: 8}, tensor_parallel: 2}\n"
        "placement:\n"
        "  device: cuda\n"
        "  learner: {replicas: 8, accelerator_type: H100, cpus: 8}\n"
        "  rollout: {replicas: 4, accelerator_type: L4, cpus: 4}\n"
        "trainer: {zero_stage: 3}\n"
    )
    return path


def test_heterogeneous_manifest_is_valid(recipe):
    cfg = load_config(recipe)
    inventory = load_inventory(REPO / "configs/inventories/h100x8_l4x8.yaml")
    manifest = rayjob_manifest(cfg, "ghcr.io/example/rlhf:0.1", inventory=inventory, overrides=["steps=100"])
    validate_manifest(manifest, CRD)

    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert manifest["metadata"]["name"] == "rlhf-grpo-7b"
    spec = manifest["spec"]
    assert spec["entrypoint"] == f"rlhf train {recipe} steps=100"
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["PYTHONUNBUFFERED"] == "1"
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs only the driver
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert sorted(groups) == ["h100-workers", "l4-workers"]
    for name, product in (("h100-workers", "NVIDIA-H100-80GB-HBM3"), ("l4-workers", "NVIDIA-L4")):
        pod = groups[name]["template"]["spec"]
        assert groups[name]["replicas"] == 1
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": product}  # from the inventory labels
        assert groups[name]["rayStartParams"]["num-gpus"] == "8"


def test_manifest_sized_from_the_recipe(recipe):
    manifest = rayjob_manifest(load_config(recipe, ["placement.learner.replicas=2"]), "img:1")
    validate_manifest(manifest, CRD)
    groups = {g["groupName"]: g for g in manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    h100 = groups["h100-workers"]
    # Two learner ranks x (1 GPU, 8 CPUs): a 2-GPU node with the bundles' 16 CPUs + 2 spare.
    assert h100["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "18",
        "memory": f"{2 * 80 + 4 * 18}Gi",
        "nvidia.com/gpu": 2,
    }
    assert h100["rayStartParams"] == {"num-cpus": "18", "num-gpus": "2"}
    # Four TP=2 engines fill one 8-GPU L4 node.
    assert (
        groups["l4-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        == 8
    )


def test_cpu_manifest_with_custom_resources(tmp_path):
    path = tmp_path / "cpu.yaml"
    path.write_text("placement: {device: cpu, learner: {resources: {ssd: 1}}}\nrollout: {sampling: {n: 2}}\n")
    manifest = rayjob_manifest(load_config(path), "img:1")
    validate_manifest(manifest, CRD)
    (group,) = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu-workers"
    assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert group["rayStartParams"]["resources"] == "'{\"ssd\": 1.0}'"  # passed through a shell by ray start


def test_validator_rejects_bad_manifests(recipe):
    good = rayjob_manifest(load_config(recipe), "img:1")
    misspelt = copy.deepcopy(good)
    misspelt["spec"]["shutdownAfterJobFinish"] = True  # Kubernetes would silently drop this field
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        validate_manifest(misspelt, CRD)
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="'one' is not of type 'integer'"):
        validate_manifest(wrong_type, CRD)
    no_name = copy.deepcopy(good)
    del no_name["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="'groupName' is a required property"):
        validate_manifest(no_name, CRD)


def test_cli_writes_manifest(recipe, tmp_path, capsys):
    out = tmp_path / "job.yaml"
    assert main(["k8s", str(recipe), "--image", "img:2", "-o", str(out), "steps=5"]) == 0
    manifest = yaml.safe_load(out.read_text())
    validate_manifest(manifest, CRD)
    assert manifest["spec"]["entrypoint"].endswith("steps=5")
    assert (
        manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        == "img:2"
    )
    assert manifest_yaml(manifest) == out.read_text()
    assert capsys.readouterr().err == f"wrote {out}\n"
    # A recipe that cannot be placed fails before any YAML is written.
    h100x1 = str(REPO / "configs/inventories/h100x1.yaml")
    assert main(["k8s", str(recipe), "--inventory", h100x1, "-o", str(tmp_path / "no.yaml")]) == 3
    assert (
        capsys.readouterr().err
        == "error: placement.learner: needs 8 GPUs of type H100 but the cluster has 1 (H100: 1)\n"
    )
    assert not (tmp_path / "no.yaml").exists()
