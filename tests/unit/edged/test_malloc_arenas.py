"""`edged run` caps glibc's malloc arenas (edged.daemon_cli): threads share the main heap
instead of one arena each. Observed in a child process through glibc's own malloc_stats()."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="malloc arenas and malloc_stats() are glibc's"
)

CHILD = """
import ctypes, sys, threading
from edged.daemon_cli import _limit_malloc_arenas
if sys.argv[1] == "limited":
    _limit_malloc_arenas()
started, release = threading.Barrier(7), threading.Event()
def work():
    bytearray(4096)  # a thread's first allocation picks its arena
    started.wait()
    release.wait()
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
started.wait()
ctypes.CDLL(None).malloc_stats()  # "Arena N:" per arena, on stderr
release.set()
"""


def _arenas(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin"}  # and no MALLOC_ARENA_MAX of the caller's
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env, check=True
    )
    return done.stderr.count("Arena ")


def test_the_daemons_threads_share_one_arena() -> None:
    assert _arenas("limited") == 1
    assert _arenas("unlimited") > 2  # the check can fail: six threads, six more arenas
