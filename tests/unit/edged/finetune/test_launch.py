"""The worker's launcher lowers a real process's priorities and caps before it becomes the
worker."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

psutil = pytest.importorskip("psutil", reason="the finetune extra (psutil) is not installed")

CHILD = """
import json, os, resource, psutil
from edged.finetune.launch import lower_priority
lower_priority(19, 512, 2)
print(json.dumps({
    "nice": os.nice(0),
    "ionice": int(psutil.Process().ionice().ioclass),
    "as": resource.getrlimit(resource.RLIMIT_AS)[0],
    "omp": os.environ["OMP_NUM_THREADS"],
}))
"""


def test_lower_priority_sets_nice_idle_io_address_space_and_threads() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["nice"] == 19
    assert seen["ionice"] == int(psutil.IOPRIO_CLASS_IDLE)
    assert seen["as"] == 512 << 20
    assert seen["omp"] == "2"


def test_the_command_line_names_the_launcher_and_its_caps(tmp_path) -> None:
    from edged.finetune.launch import worker_command

    command = worker_command(tmp_path, nice=19, memory_mb=1024, threads=3)
    assert command[:3] == [sys.executable, "-m", "edged.finetune.launch"]
    assert command[3:] == ["--nice", "19", "--memory-mb", "1024", "--threads", "3", str(tmp_path)]
