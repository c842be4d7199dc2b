"""A child process that hands records to an outbox as fast as it can and prints the sequence
of every durable put as soon as it returns: the kill -9 tests' victim.

    python -m tests.support.outbox_writer DB_PATH [CONCURRENCY]
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from edged.outbox import Outbox, OutboxConfig


async def produce(outbox: Outbox, worker: int, out: int) -> None:
    n = 0
    while True:
        n += 1
        kind = ("sample", "event", "telemetry")[n % 3]
        seq = await outbox.put(kind, {"w": worker, "n": n, "pad": "x" * (n % 200)})
        if seq is not None:
            os.write(out, f"{seq}\n".encode())


async def main() -> None:
    path = Path(sys.argv[1])
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    config = OutboxConfig(path, quota_bytes=256 << 20, min_free_bytes=0)
    async with Outbox(config) as outbox:
        os.write(1, b"ready\n")
        await asyncio.gather(*(produce(outbox, w, 1) for w in range(concurrency)))


if __name__ == "__main__":
    asyncio.run(main())
