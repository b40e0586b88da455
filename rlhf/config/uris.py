"""Run-directory locations as a config names them: a local path, `file://`, or an object-store URI
(`s3://`, `gs://`). Pure string handling, so validation can tell them apart without the storage
layer (rlhf/production/storage.py reads and writes them)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse


def is_remote(uri: str | os.PathLike) -> bool:
    """True for an object-store URI (s3://, gs://, ...); False for a local path or file://."""
    scheme = urlparse(str(uri)).scheme
    return len(scheme) > 1 and scheme != "file"


def local_path(uri: str | os.PathLike) -> Path:
    """The local path of a plain path or a file:// URI."""
    text = str(uri)
    return Path(urlparse(text).path) if text.startswith("file://") else Path(text).expanduser()
