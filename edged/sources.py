"""Where samples come from. A source is anything with a `name` and `async run(submit)`: it turns
its input into `Sample`s and awaits `submit`, which blocks while the pipeline's queue is full
(backpressure). Each sample is settled exactly once: `None` when it was processed (its result is
out and any kept copy is durable), or the kind of problem when it was refused. Only then does a
source forget it: the spool deletes the file, MQTT acknowledges the message, replay moves its
bookmark. The firmware bridge (its own process: systemd/edged-firmware-bridge.service) will
publish its sensors' samples on the local broker, where an `mqtt` source takes them like any
other; a source inside the daemon needs only this interface.

    Source (protocol)
    ├── ReplaySource   a dataset file, paced, resuming at its bookmark after a restart
    ├── SpoolSource    files dropped into a directory
    └── MqttSource     a topic on the local broker (edged.local_bus)
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cbor2
import numpy as np
import numpy.typing as npt

from edged.config import ReplaySourceConfig, SpoolSourceConfig
from edged_formats.bundle import load_npy
from edged_formats.errors import FormatError

__all__ = [
    "BadPayload",
    "Bookmarks",
    "ReplaySource",
    "Sample",
    "SettleAll",
    "Source",
    "SpoolSource",
    "Submit",
    "decode_payload",
]

log = logging.getLogger(__name__)
Settle = Callable[[str | None], None]


@dataclass(slots=True, eq=False)
class Sample:
    """One input for the model: `data` has the model's sample shape (no batch axis)."""

    source: str
    ref: str
    data: npt.NDArray[Any]
    settle: Settle | None = None
    received: float = field(default_factory=time.monotonic)


Submit = Callable[[Sample], Awaitable[None]]


class Source(Protocol):
    name: str

    async def run(self, submit: Submit) -> None:
        """Feed samples until exhausted or cancelled."""


class Bookmarks(Protocol):
    """Small durable numbers (the outbox's meta table)."""

    def remember(self, key: str, value: float) -> None: ...

    async def recall(self, key: str, default: float) -> float: ...


class BadPayload(ValueError):
    """An input that cannot become samples; `kind` names the problem for the counters."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def decode_payload(
    data: bytes, fmt: str, sample_shape: tuple[int, ...], dtype: str, what: str
) -> npt.NDArray[Any]:
    """Bytes as a batch of samples [n, *sample_shape]. Formats: `npy` (one sample or a batch),
    `raw` (exactly one sample of the model's input dtype), `cbor` ({"data": bytes, "dtype",
    "shape"}), `image` (PNG, JPEG, BMP, PNM through Pillow, as uint8 grey or RGB by the
    model's channel count; not resized)."""
    if fmt == "image":
        array = _from_image(data, sample_shape, what)
    elif fmt == "npy":
        try:
            array = load_npy(data, what)
        except FormatError as exc:
            raise BadPayload("unreadable", str(exc)) from exc
    elif fmt == "raw":
        item = np.dtype(dtype)
        if len(data) != item.itemsize * int(np.prod(sample_shape)):
            raise BadPayload(
                "wrong_size",
                f"{what} holds {len(data)} bytes; one {dtype} sample of shape "
                f"{list(sample_shape)} is {item.itemsize * int(np.prod(sample_shape))}",
            )
        array = np.frombuffer(data, item).reshape(sample_shape)
    else:
        array = _from_cbor(data, what)
    if array.shape == sample_shape:
        return array[None]
    if array.shape[1:] == sample_shape:
        return array
    raise BadPayload(
        "wrong_shape",
        f"{what} has shape {list(array.shape)}; the model takes {list(sample_shape)} "
        "or a batch of them",
    )


def _from_image(data: bytes, sample_shape: tuple[int, ...], what: str) -> npt.NDArray[Any]:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise BadPayload(
            "unreadable", f"{what} is an image and Pillow is not installed (edged[images])"
        ) from exc
    channels = sample_shape[-1] if len(sample_shape) == 3 else 1
    try:
        with Image.open(io.BytesIO(data)) as image:
            # the header's size first: a small file can decode to gigabytes
            width, height = image.size
            if len(sample_shape) not in (2, 3) or (height, width) != sample_shape[:2]:
                raise BadPayload(
                    "wrong_shape",
                    f"{what} is a {width}x{height} image; the model takes {list(sample_shape)}",
                )
            image.load()
            pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    except BadPayload:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadPayload("unreadable", f"{what} is not a readable image ({exc})") from exc
    return pixels.reshape(*pixels.shape[:2], channels) if len(sample_shape) == 3 else pixels


def _from_cbor(data: bytes, what: str) -> npt.NDArray[Any]:
    try:
        body = cbor2.loads(data)
        raw, dtype, shape = body["data"], np.dtype(body["dtype"]), tuple(body["shape"])
        if not isinstance(raw, bytes) or dtype.kind not in "iuf":
            raise TypeError("data must be bytes of a numeric dtype")
        return np.frombuffer(raw, dtype).reshape(shape)
    except Exception as exc:  # cbor2 raises many kinds on garbage; all mean "unreadable"
        raise BadPayload("unreadable", f"{what} is not a CBOR sample ({exc})") from exc


class ReplaySource:
    """Streams `path` one sample at a time, at `rate_hz` if set."""

    def __init__(
        self,
        config: ReplaySourceConfig,
        bookmarks: Bookmarks,
        *,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self._bookmarks = bookmarks
        self._key = f"replay.{config.name}"
        self._settled: set[int] = set()
        self._watermark = 0
        self._on_done = on_done

    def _load(self) -> npt.NDArray[Any]:
        path, name = self.config.path, self.config.array
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                return np.asarray(data)
            with data:
                if name not in data.files:
                    raise BadPayload("unreadable", f"replay file {path} has no array {name!r}")
                return np.asarray(data[name])
        except (ValueError, OSError, EOFError) as exc:
            raise BadPayload("unreadable", f"replay file {path} is not readable: {exc}") from exc

    def _settle(self, index: int) -> Settle:
        def settle(_problem: str | None) -> None:
            self._settled.add(index)
            while self._watermark in self._settled:
                self._settled.discard(self._watermark)
                self._watermark += 1
            self._bookmarks.remember(self._key, self._watermark)

        return settle

    async def run(self, submit: Submit) -> None:
        samples = await asyncio.to_thread(self._load)
        start = int(await self._bookmarks.recall(self._key, 0))
        period = 1.0 / self.config.rate_hz if self.config.rate_hz else 0.0
        while True:
            self._watermark = start if start < len(samples) else len(samples)
            begun = time.monotonic()
            for index in range(self._watermark, len(samples)):
                await submit(Sample(self.name, str(index), samples[index], self._settle(index)))
                if period:
                    due = begun + (index - start + 1) * period
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not self.config.loop:
                break
            start = 0
            self._settled.clear()
            self._bookmarks.remember(self._key, 0)
        log.info("replay source %s reached the end of %s", self.name, self.config.path)
        if self._on_done is not None:
            self._on_done()


IGNORED_SUFFIXES = (".tmp", ".part")
FORMAT_OF_SUFFIX = {".npy": "npy"} | dict.fromkeys(
    (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm"), "image"
)


class SpoolSource:
    """Polls a directory for .npy and image files. A file leaves the directory only once every
    sample in it is settled: deleted when all were processed, moved to `rejected/` otherwise."""

    def __init__(
        self,
        config: SpoolSourceConfig,
        sample_shape: tuple[int, ...],
        dtype: str,
        reject: Callable[[str, str, str], None],
    ) -> None:
        self.name = config.name
        self.config = config
        self._shape, self._dtype = sample_shape, dtype
        self._reject = reject  # (source, kind, message) for counters and rate-limited logs
        self._in_flight: set[str] = set()
        self.rejected_dir = config.path / "rejected"

    async def run(self, submit: Submit) -> None:
        self.config.path.mkdir(parents=True, exist_ok=True)
        self.rejected_dir.mkdir(exist_ok=True)
        while True:
            for path in await asyncio.to_thread(self._ready_files):
                await self._feed(path, submit)
            await asyncio.sleep(self.config.poll_s)

    def _ready_files(self) -> list[Path]:
        ready = []
        with os.scandir(self.config.path) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
                    continue
                if name in self._in_flight or not entry.is_file(follow_symlinks=False):
                    continue
                ready.append((entry.stat().st_mtime_ns, name))
        return [self.config.path / name for _, name in sorted(ready)]

    async def _feed(self, path: Path, submit: Submit) -> None:
        try:
            batch = await asyncio.to_thread(self._read, path)
        except BadPayload as exc:
            self._reject(self.name, exc.kind, str(exc))
            await asyncio.to_thread(self._set_aside, path)
            return
        except FileNotFoundError:
            return  # taken away by its writer; nothing of ours is lost
        self._in_flight.add(path.name)
        outcome = SettleAll(len(batch), lambda bad: self._finish(path, bad))
        for index, sample in enumerate(batch):
            ref = path.name if len(batch) == 1 else f"{path.name}[{index}]"
            await submit(Sample(self.name, ref, sample, outcome.settle))

    def _read(self, path: Path) -> npt.NDArray[Any]:
        size = path.stat().st_size
        if size > self.config.max_bytes:
            raise BadPayload(
                "too_large", f"{path.name} is {size} bytes, over the {self.config.max_bytes} bound"
            )
        fmt = FORMAT_OF_SUFFIX.get(path.suffix.lower())
        if fmt is None:
            raise BadPayload("unreadable", f"{path.name} is neither .npy nor an image file")
        return decode_payload(path.read_bytes(), fmt, self._shape, self._dtype, path.name)

    def _finish(self, path: Path, any_refused: bool) -> None:
        self._in_flight.discard(path.name)
        try:
            if any_refused:
                self._set_aside(path)
            else:
                path.unlink()
        except OSError as exc:
            log.warning("spool %s: cannot remove %s (%s)", self.name, path.name, exc.strerror)

    def _set_aside(self, path: Path) -> None:
        """Keep a refused file for inspection, and only the newest `keep_rejected` of them."""
        if self.config.keep_rejected == 0:
            path.unlink(missing_ok=True)
            return
        path.replace(self.rejected_dir / path.name)
        kept = sorted(self.rejected_dir.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        for old in kept[: max(0, len(kept) - self.config.keep_rejected)]:
            old.unlink(missing_ok=True)


class SettleAll:
    """Settles one input (a file, a message) once all of the samples in it are settled."""

    def __init__(self, count: int, finish: Callable[[bool], None]) -> None:
        self._left, self._refused, self._finish = count, False, finish

    def settle(self, problem: str | None) -> None:
        self._left -= 1
        self._refused |= problem is not None
        if self._left == 0:
            self._finish(self._refused)
