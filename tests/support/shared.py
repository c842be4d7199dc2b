"""Work done once per test session, whichever pytest-xdist worker asks first."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def session_build(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """`<session tmp>/<name>`, held under a file lock while the body runs: the first worker
    builds into it, the others wait and find it built. Callers check what is there."""
    from filelock import FileLock

    session_dir = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's basetemp is <session>/popen-gwN
        session_dir = session_dir.parent
    path = session_dir / name
    with FileLock(f"{path}.lock"):
        path.mkdir(exist_ok=True)
        yield path
