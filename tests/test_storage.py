"""Storage URIs against a real S3-protocol server (moto's, in its own process): the operations the
checkpoint code needs, the same on a path, a file:// URI and s3://."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("moto")

from s3_server import CREDENTIALS, S3Server  # beside the tests (pytest puts tests/ on sys.path)

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
