"""A real 2-node Ray cluster on loopback: runs submitted with `ray job submit` checkpoint to a real
S3-protocol server, and a fresh job resumes from the URI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.slow,
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_ports() -> list[str]:
    """Per-node agent ports: the defaults (52365, ...) collide with any other Ray on this machine,
    and a head whose job agent cannot bind answers every submission with "No available agent"."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def ray_cmd() -> str:
    ray = BIN / "ray"
    return str(ray) if ray.exists() else shutil.which("ray")


@pytest.fixture()
def two_node_cluster(tmp_path):
    """Head + worker started with `ray start --block`; terminating them tears the cluster down."""
    gcs, dash = free_port(), free_port()
    temp_dir = Path("/tmp") / f"rlhf-ray-{os.getpid()}"
    # Ray 2.60 turns on token authentication for new clusters; the CLI clients of this test would
    # need the token, so this loopback-only cluster runs without it.
    # A loaded 2-core host can stall a node's heartbeats for many seconds; the default (5 missed
    # checks, 3 s apart) then marks the worker dead mid-test. Allow about two minutes.
    env = dict(
        os.environ,
        RAY_DEDUP_LOGS="0",
        RAY_AUTH_MODE="disabled",
        RAY_health_check_failure_threshold="40",
    )
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            ray_cmd(),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--num-cpus=2",
            "--resources",
            '{"node_a": 1}',
            "--include-dashboard=true",
            f"--dashboard-port={dash}",
            f"--temp-dir={temp_dir}",
            "--dashboard-host=127.0.0.1",
            *private_ports(),
        ],
        env=env,
        stdout=(tmp_path / "head.log").open("w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    procs = [head]
    try:
        wait_for(lambda: _ok([ray_cmd(), "status", f"--address=127.0.0.1:{gcs}"], env), 90, "head node")
        worker = subprocess.Popen(
            [
                ray_cmd(),
                "start",
                "--block",
                f"--address=127.0.0.1:{gcs}",
                "--num-cpus=2",
                "--resources",
                '{"node_b": 1}',
                *private_ports(),
            ],
            env=env,
            stdout=(tmp_path / "worker.log").open("w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(worker)
        wait_for(lambda: _count_nodes(gcs, env) >= 2, 90, "second node")
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        # `ray start --block` does not always take gcs_server/raylet with it: end every process of
        # this cluster (they all carry its private temp dir on their command line).
        subprocess.run(["pkill", "-9", "-f", str(temp_dir)], check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ok(cmd, env) -> bool:
    return subprocess.run(cmd, env=env, capture_output=True, timeout=60).returncode == 0


def _count_nodes(gcs: int, env) -> int:
    code = f"import ray; ray.init(address='127.0.0.1:{gcs}', log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(2)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture()
def s3_bucket():
    """A real S3-protocol server (moto's, in its own process) with one bucket; the storage client
    of this process talks to it through the environment."""
    pytest.importorskip("moto")
    from s3_server import CREDENTIALS, S3Server  # beside the tests

    saved = dict(os.environ)
    server = S3Server()
    server.create_bucket("cluster")
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=server.endpoint)
    try:
        yield server, CREDENTIALS
    finally:
        server.close()
        os.environ.clear()
        os.environ.update(saved)


def submit(cluster: dict, job_id: str, args: list[str], env_vars: dict) -> str:
    """`ray job submit` of `rlhf train` with `args`; waits for the job and returns its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    cmd = [
        ray_cmd(),
        "job",
        "submit",
        f"--address={cluster['dashboard']}",
        "--no-wait",
        f"--submission-id={job_id}",
        f"--working-dir={REPO}",
        "--runtime-env-json",
        json.dumps({"env_vars": {"WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu", **env_vars}}),
        "--",
        sys.executable,
        "-m",
        "rlhf",
        "train",
        "configs/quickstart.yaml",
        *args,
    ]
    for _ in range(20):  # the job agent comes up a little after the cluster answers
        submitted = subprocess.run(
            cmd, env=cluster["env"], capture_output=True, text=True, timeout=120, cwd=REPO
        )
        if submitted.returncode == 0 or "No available agent" not in submitted.stderr:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    # Submitted with the CLI above; polled through the SDK (the CLI's status text is for humans:
    # "Job 'x' succeeded" in colour codes).
    client = JobSubmissionClient(cluster["dashboard"])
    deadline = time.time() + 600
    status = None
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(3)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id}: {status}\n--- logs ---\n{logs[-5000:]}"
    return logs


def test_ray_job_submit_two_nodes_checkpoints_to_s3_and_a_fresh_job_resumes(
    two_node_cluster, s3_bucket, tiny_model_dir, tmp_path, monkeypatch
):
    """A job on two nodes (engine on one, learner on the other) checkpoints to s3://; as if it had
    died after its step-1 checkpoint, a second job, started fresh, resumes from the URI and gives
    step 2 the same samples and loss. `rlhf eval`'s download of the run's latest checkpoint gets its
    HF export and manifest, without the optimizer states."""
    from rlhf.cli.eval import fetch, resolve_model_dir
    from rlhf.production import storage
    from rlhf.testing import rewind_run, step_record

    server, credentials = s3_bucket
    run = "s3://cluster/runs/cluster"
    args = [
        f"model.path={tiny_model_dir}",
        "steps=2",
        "checkpoint.every=1",
        "data.num_eval=4",
        "rollout.prompts_per_step=2",
        "rollout.sampling.n=2",
        "rollout.sampling.max_new_tokens=8",
        "logging.wandb_mode=disabled",
        "logging.output_dir=s3://cluster/runs",
        f"logging.storage_endpoint={server.endpoint}",
        "logging.run_name=cluster",
        "logging.plot=false",
        # Roles on different nodes: the rollout engine on node_b, the learner on node_a.
        "placement.rollout.resources={node_b: 0.5}",
        "placement.learner.resources={node_a: 0.5}",
    ]
    # Our own ids: the CLI prints the generated one wrapped in ANSI colour codes, easy to misparse.
    tag = f"{os.getpid()}-{int(time.time())}"
    logs = submit(two_node_cluster, f"rlhf-cluster-{tag}", args, credentials)
    assert "eval after training" in logs
    assert "[rlhf] done: held-out reward" in logs and "2 steps in" in logs  # the closing line
    original = tmp_path / "original"
    storage.download(run, original, keep=lambda rel: "/" not in rel)
    rows = [json.loads(line) for line in (original / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    assert all("sync/time_s" in r for r in rows if "reward/mean" in r)
    assert {"checkpoints", "config.yaml", "metrics.jsonl", "samples.jsonl"} <= set(storage.list_names(run))
    files = storage.list_files(f"{run}/checkpoints/step_000002")
    assert {"driver.json", "manifest.json", "policy/hf/config.json", "policy/hf/manifest.json"} <= set(files)
    assert any(
        f.startswith("policy/global_step") or "model_states" in f for f in files
    )  # the learner's shards

    rewind_run(run, 1)  # as if the job had died after its step-1 checkpoint (its pods gone with their disks)
    logs = submit(two_node_cluster, f"rlhf-cluster-resume-{tag}", [*args, f"resume={run}"], credentials)
    assert f"resumed from {run}/checkpoints/step_000001 at step 1" in logs and "2 steps in" in logs
    resumed = tmp_path / "resumed"
    storage.download(run, resumed, keep=lambda rel: "/" not in rel)
    samples_a, metrics_a = step_record(original, 2)
    samples_b, metrics_b = step_record(resumed, 2)
    assert samples_a and samples_b == samples_a
    assert metrics_b["train/loss"] == pytest.approx(metrics_a["train/loss"], rel=1e-5, abs=1e-7)
    step2 = f"{run}/checkpoints/step_000002"
    manifest = json.loads(storage.read_bytes(f"{step2}/manifest.json"))
    assert manifest["run_dir"] == run and manifest["parent"] == f"{run}/checkpoints/step_000001"

    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "cache"))
    local = fetch(run)  # what `rlhf eval s3://.../cluster` evaluates
    assert resolve_model_dir(local) == local / "policy" / "hf"
    assert json.loads((local / "manifest.json").read_text())["step"] == 2
    assert not any(p.name.endswith("optim_states.pt") for p in local.rglob("*"))
