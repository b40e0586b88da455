"""Run directories and checkpoints on storage URIs, against a real S3-protocol server (moto's, in
its own process): the storage operations, the atomic publish (a checkpoint is read only once its
`latest.json` is written), and storage faults as one line naming the URI."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest.importorskip("moto")

from s3_server import CREDENTIALS, S3Server  # beside the tests (pytest puts tests/ on sys.path)

from rlhf.production import checkpoint as ckpt
from rlhf.production import storage

BUCKET = "rlhf-test"


@pytest.fixture(scope="module")
def s3():
    saved = dict(os.environ)
    server = S3Server()
    os.environ.update(CREDENTIALS)
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    server.create_bucket(BUCKET)
    yield server
    server.close()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.05)


def roots(tmp_path: Path, name: str) -> list[str]:
    return [str(tmp_path / name), (tmp_path / f"{name}-file").as_uri(), f"s3://{BUCKET}/{name}"]


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["path", "file-uri", "s3"])
def test_operations(kind, s3, tmp_path):
    root = roots(tmp_path, f"ops{kind}")[kind]
    assert storage.is_remote(root) == (kind == 2)
    storage.write_json(storage.join(root, "a", "x.json"), {"n": 1})
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"n": 1}
    assert storage.exists(storage.join(root, "a")) and not storage.exists(storage.join(root, "b"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "a", "missing.json"))

    src = tmp_path / f"src{kind}"
    (src / "sub").mkdir(parents=True)
    (src / "one.bin").write_bytes(b"1" * 3000)
    (src / "sub" / "two.txt").write_text("two")
    storage.upload_dir(src, storage.join(root, "up"))
    assert storage.list_files(storage.join(root, "up")) == ["one.bin", "sub/two.txt"]
    assert storage.list_names(root) == ["a", "up"]
    got = storage.download(storage.join(root, "up"), tmp_path / f"down{kind}", keep=lambda r: "/" in r)
    assert got == ["sub/two.txt"] and (tmp_path / f"down{kind}" / "sub" / "two.txt").read_text() == "two"
    with storage.local_copy(storage.join(root, "up")) as local:
        assert (local / "one.bin").read_bytes() == b"1" * 3000

    storage.delete(storage.join(root, "up"))
    assert storage.list_names(root) == ["a"] and storage.list_files(storage.join(root, "up")) == []
    storage.delete(storage.join(root, "nothing-there"))  # not an error


def fake_models(payload: bytes):
    """What a learner rank does: write its files locally, upload them to the checkpoint's URI."""

    def save_models(target) -> None:
        with storage.staged(storage.join(target, "policy"), "test") as local:
            (local / "weights.bin").write_bytes(payload)

    return save_models


def test_checkpoints_on_s3_publish_latest_last_and_prune(s3):
    run = f"s3://{BUCKET}/publish"
    assert ckpt.latest_checkpoint(run) is None
    for step in (1, 2, 3):
        path = ckpt.save_checkpoint(run, step, fake_models(b"w%d" % step), {"data": {"p": step}}, keep_last=2)
        assert path == f"{run}/checkpoints/step_{step:06d}"
    assert ckpt.latest_checkpoint(run) == f"{run}/checkpoints/step_000003"
    assert ckpt.load_driver_state(f"{run}/checkpoints/step_000003") == {"step": 3, "data": {"p": 3}}
    assert storage.list_names(f"{run}/checkpoints") == ["latest.json", "step_000002", "step_000003"]
    with storage.local_copy(f"{run}/checkpoints/step_000003/policy") as local:
        assert (local / "weights.bin").read_bytes() == b"w3"


def test_a_server_down_before_latest_json_leaves_the_previous_checkpoint_the_one_resume_reads(
    s3, fast_retries
):
    run = f"s3://{BUCKET}/crash"
    ckpt.save_checkpoint(run, 1, fake_models(b"one"), {"data": {}}, keep_last=3)
    uploaded = fake_models(b"two")

    def shards_then_outage(target) -> None:
        uploaded(target)  # every shard of step 2 is on the server ...
        outage.__enter__()  # ... then it goes down before driver.json and latest.json

    outage = s3.outage()
    started = time.monotonic()
    try:
        with pytest.raises(storage.StorageError) as err:
            ckpt.save_checkpoint(run, 2, shards_then_outage, {"data": {}}, keep_last=3)
    finally:
        outage.__exit__(None, None, None)
    line = str(err.value)
    assert "\n" not in line and line.startswith(
        f"storage: write {run}/checkpoints/step_000002/driver.json failed"
    )
    assert time.monotonic() - started < 20  # a few attempts with back-off, not a hang

    # The server is back: step 2's shards are there, but it was never published.
    assert storage.list_files(f"{run}/checkpoints/step_000002") == ["policy/weights.bin"]
    assert storage.read_json(f"{run}/checkpoints/latest.json")["dir"] == "step_000001"
    assert ckpt.latest_checkpoint(run) == f"{run}/checkpoints/step_000001"
    # Even with latest.json gone, a step without driver.json is never taken.
    storage.delete(f"{run}/checkpoints/latest.json")
    assert ckpt.latest_checkpoint(run) == f"{run}/checkpoints/step_000001"
    # The next save of step 2 starts clean and is published.
    ckpt.save_checkpoint(run, 2, fake_models(b"two"), {"data": {}}, keep_last=3)
    assert ckpt.latest_checkpoint(run) == f"{run}/checkpoints/step_000002"


def test_a_failed_checkpoint_is_skipped_with_one_warning_and_the_final_one_stops_the_run(s3, fast_retries):
    from rlhf.actor_group import RunStopped

    run = f"s3://{BUCKET}/skip"
    ckpt.save_checkpoint(run, 1, fake_models(b"one"), {"data": {}}, keep_last=3)
    warnings: list[str] = []
    with s3.outage():
        skipped = ckpt.save_or_skip(
            run, 2, fake_models(b"2"), {"data": {}}, 3, final=False, warn=warnings.append
        )
        with pytest.raises(RunStopped) as stopped:
            ckpt.save_or_skip(run, 3, fake_models(b"3"), {"data": {}}, 3, final=True, warn=warnings.append)
    assert skipped is None and len(warnings) == 1
    assert warnings[0].startswith(
        f"warning: checkpoint step_000002 not written: storage: delete {run}/checkpoints/"
    )
    assert "the next checkpoint tries again" in warnings[0]
    assert "\n" not in str(stopped.value) and "this was the final checkpoint" in str(stopped.value)
    assert ckpt.latest_checkpoint(run) == f"{run}/checkpoints/step_000001"
    # Anything else than a storage failure is not swallowed.
    with pytest.raises(ZeroDivisionError):
        ckpt.save_or_skip(run, 4, lambda target: 1 / 0, {"data": {}}, 3, final=False)


def test_a_storage_failure_on_a_learner_rank_is_found_behind_rays_wrapping():
    """A learner rank's failed upload reaches the driver as GroupCallError(RayTaskError(StorageError));
    the checkpoint code finds the StorageError's own line, not the remote traceback."""
    import pickle

    from ray.exceptions import RayTaskError

    from rlhf.actor_group import GroupCallError

    raised = storage.StorageError("upload", "s3://b/run/x.pt", "Could not connect\nsecond line")
    on_driver = pickle.loads(pickle.dumps(raised))  # what Ray ships back
    wrapped = RayTaskError(
        "save", "Traceback (most recent call last):\n  ...", on_driver
    ).as_instanceof_cause()
    found = storage.storage_failure(GroupCallError("policy", 1, "save", wrapped))
    assert str(found) == "storage: upload s3://b/run/x.pt failed: Could not connect"
    assert storage.storage_failure(GroupCallError("policy", 1, "save", ValueError("x"))) is None


def test_a_missing_bucket_is_one_line_naming_the_uri_without_retries(s3, fast_retries):
    run = "s3://no-such-bucket/run"
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as err:
        ckpt.save_checkpoint(run, 1, fake_models(b"x"), {"data": {}}, keep_last=1)
    line = str(err.value)
    assert "\n" not in line and f"{run}/checkpoints/step_000001/policy/weights.bin" in line
    assert "NO_SUCH_BUCKET" in line and time.monotonic() - started < 5


def test_no_permission_and_unknown_credentials_are_one_line_without_retries(monkeypatch):
    """A server that enforces IAM (moto's, with authentication on after the set-up calls): a user
    without any policy gets ACCESS_DENIED, an access key the server does not know
    INVALID_ACCESS_KEY_ID; both are one line naming the URI, not retried."""
    import boto3

    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "3")  # the bucket, the user, its key
    server = S3Server()
    try:
        direct = dict(
            endpoint_url=f"http://127.0.0.1:{server.server_port}",
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        boto3.client("s3", **direct).create_bucket(Bucket="locked")
        iam = boto3.client("iam", **direct)
        iam.create_user(UserName="no-policy")
        key = iam.create_access_key(UserName="no-policy")["AccessKey"]
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for key_id, secret, code in (
            (key["AccessKeyId"], key["SecretAccessKey"], "ACCESS_DENIED"),
            ("AKIAUNKNOWN0000000000", "nope", "INVALID_ACCESS_KEY_ID"),
        ):
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            storage._filesystems.clear()  # a new client for the new credentials
            started = time.monotonic()
            with pytest.raises(storage.StorageError) as err:
                storage.write_json("s3://locked/runs/r/config.json", {"a": 1})
            line = str(err.value)
            assert "\n" not in line and line.startswith(
                "storage: write s3://locked/runs/r/config.json failed: "
            )
            assert code in line and time.monotonic() - started < storage.BACKOFF_S
    finally:
        server.close()
        storage._filesystems.clear()


def test_train_on_a_missing_bucket_stops_before_anything_starts(s3, capsys):
    from rlhf.cli.main import EXIT_STORAGE, main

    code = main(
        [
            "train",
            "configs/quickstart.yaml",
            "logging.output_dir=s3://no-such-bucket/runs",
            "logging.run_name=r",
            "logging.wandb_mode=disabled",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_STORAGE and err[-1].startswith(
        "error: storage: write s3://no-such-bucket/runs/r/config.yaml"
    )


def test_lineage_reads_manifests_from_s3(s3, capsys):
    from rlhf.cli.main import main
    from rlhf.production import lineage

    root = f"s3://{BUCKET}/lineage/checkpoints"

    def manifest(step: int, parent: str | None) -> dict:
        return {
            "step": step,
            "config_hash": "c" * 64,
            "config": "",
            "code": {"package_version": "1.0"},
            "data": {"source": "builtin:arithmetic", "state": {"position": 2 * step}},
            "base_model": {"path": "tiny", "resolved": "/models/tiny", "content_hash": "b" * 64},
            "parent": parent,
        }

    lineage.write_manifest(f"{root}/step_000001", manifest(1, None))
    lineage.write_manifest(f"{root}/step_000002", manifest(2, f"{root}/step_000001"))
    assert main(["lineage", f"{root}/step_000002"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{root}/step_000002: step 2") and out[1].startswith(
        f"{root}/step_000001: step 1"
    )
    assert out[2] == f"base model: tiny (/models/tiny, {'b' * 12})"
    assert main(["lineage", f"{root}/step_000009"]) == 2
