"""How the updater gets bytes: one small interface, an HTTP implementation, and its errors.

    FetchError        a transport problem (retried, then reported as "cannot reach")
    ├── NotFound      the server has no such file (the end of the root walk, or a bad path)
    ├── TooLarge      more bytes than the signed length or the cap allow (endless data)
    └── NoSpace       the disk cannot take the download plus the reserve

`fetch(path, max_bytes)` returns small files (metadata) whole; `download(path, dest,
max_bytes)` appends to `dest`, resuming with an HTTP Range request from what it already holds,
within a bandwidth budget. Both stop reading at the cap, so a server that sends forever costs
at most the cap.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import httpx
import tenacity

from edged.errors import EdgedError
from edged.ota.slots import fault_point

__all__ = [
    "FetchError",
    "Fetcher",
    "HttpFetcher",
    "NoSpace",
    "NotFound",
    "TooLarge",
    "ensure_space",
]


class FetchError(EdgedError):
    """The repository could not be reached, timed out or answered with an error."""


class NotFound(FetchError):
    """The repository has no file at that path."""


class TooLarge(FetchError):
    """The server sent more than the cap allows."""


class NoSpace(FetchError):
    """Not enough free disk for the download and the configured reserve."""


class Fetcher(Protocol):
    def fetch(self, path: str, max_bytes: int) -> bytes: ...

    def download(self, path: str, dest: Path, max_bytes: int) -> None: ...


def ensure_space(directory: Path, needed: int, reserve: int) -> None:
    """Refuse before starting when `needed` bytes would eat into the reserve."""
    free = shutil.disk_usage(directory).free
    if free - needed < reserve:
        raise NoSpace(
            f"{directory} has {free >> 20} MiB free; the download needs {needed >> 20} MiB"
            f" plus a {reserve >> 20} MiB reserve"
        )


class _Throttle:
    """Sleeps so that the average rate stays under `bytes_per_s` (None: no limit)."""

    def __init__(self, bytes_per_s: float | None) -> None:
        self.rate, self.start, self.sent = bytes_per_s, time.monotonic(), 0

    def __call__(self, count: int) -> None:
        if self.rate is None:
            return
        self.sent += count
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


def _transient(error: BaseException) -> bool:
    return isinstance(error, FetchError) and not isinstance(error, NotFound | TooLarge | NoSpace)


class HttpFetcher:
    """HTTP(S) from the control plane's repository, authenticated with the device token."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        attempts: int = 3,
        bytes_per_s: float | None = None,
        verify: bool | str = True,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            verify=verify,
        )
        self.bytes_per_s = bytes_per_s
        self._retry = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(attempts),
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=10),
            retry=tenacity.retry_if_exception(_transient),
            reraise=True,
        )

    def close(self) -> None:
        self.client.close()

    def fetch(self, path: str, max_bytes: int) -> bytes:
        return self._retry(self._fetch_once, path, max_bytes)

    def download(self, path: str, dest: Path, max_bytes: int) -> None:
        self._retry(self._download_once, path, dest, max_bytes)

    def _fetch_once(self, path: str, max_bytes: int) -> bytes:
        chunks: list[bytes] = []
        self._get(path, max_bytes, 0, lambda _offset: chunks.append)
        return b"".join(chunks)

    def _download_once(self, path: str, dest: Path, max_bytes: int) -> None:
        have = dest.stat().st_size if dest.exists() else 0
        if have > max_bytes:
            dest.unlink()
            have = 0
        with contextlib.ExitStack() as files:

            def open_at(offset: int) -> Callable[[bytes], object]:
                out = files.enter_context(dest.open("ab" if offset else "wb"))

                def write(chunk: bytes) -> None:
                    out.write(chunk)
                    out.flush()
                    fault_point("download")  # test hook: freeze mid-transfer

                return write

            self._get(path, max_bytes, have, open_at)

    def _get(
        self,
        path: str,
        cap: int,
        have: int,
        open_at: Callable[[int], Callable[[bytes], object]],
    ) -> None:
        """GET `path` from byte `have` on; `open_at(offset)` gives the writer for the body."""
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with self.client.stream("GET", path, headers=headers) as response:
                status = response.status_code
                if status == 416 and have:
                    return  # nothing left to send: the file is whole (the hash check decides)
                if status == 404:
                    raise NotFound(f"{path} is not on the server")
                if status not in (200, 206):
                    raise FetchError(f"{path}: the server answered HTTP {status}")
                if status == 200:
                    have = 0  # the server ignored the range: start again
                write, throttle = open_at(have), _Throttle(self.bytes_per_s)
                for chunk in response.iter_bytes():  # as received: a break keeps what came
                    have += len(chunk)
                    if have > cap:
                        raise TooLarge(f"{path} is longer than the {cap} bytes allowed")
                    write(chunk)
                    throttle(len(chunk))
        except httpx.TimeoutException as exc:
            raise FetchError(f"{path}: the server stalled (timeout)") from exc
        except httpx.HTTPError as exc:
            raise FetchError(f"{path}: {exc}") from exc
