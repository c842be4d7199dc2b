"""Structured logging, one event per line, that journald keeps well.

    log_event(log, "info", "model_loaded", version="1.2", path="/var/lib/x y")
    kv:   level=info logger=edged.daemon event=model_loaded version=1.2 path="/var/lib/x y"
    json: {"level": "info", "logger": "edged.daemon", "event": "model_loaded", ...}

Fields travel in `extra` (log_event does it); plain `logger.info(..., extra={...})` renders
too. Connected to the journal (JOURNAL_STREAM names the stream's device:inode) lines start
with the syslog priority `<N>` and carry no timestamp; elsewhere they start `ts=...Z`.
Values with spaces, quotes, '=', '\\' or control characters are JSON-quoted, so newlines
(tracebacks included) never split an event. "auto" is kv.

Redaction: a field is rendered `***` when the last word of its name (words are runs of
letters and digits, camelCase split) is password, passwd, pwd, passphrase, secret, token,
key, apikey, authorization, cookie, credential(s); `public_key` is exempt. So `api_key`,
`private_key`, `access_token`, `db_password` are hidden; `key_id`, `token_count`, `key_path`
are not. Dict values are redacted by the same rule, key by key.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

__all__ = ["JSONFormatter", "KVFormatter", "RateLimitedLog", "configure_logging", "log_event"]

_FIELDS = "edged_fields"
_STANDARD = {*logging.makeLogRecord({}).__dict__, "message", "asctime", _FIELDS}
_SECRET_WORDS = {"password", "passwd", "pwd", "passphrase", "secret", "token", "key", "apikey"}
_SECRET_WORDS |= {"authorization", "cookie", "credential", "credentials"}
_BARE = re.compile(r"[^\s\"'=\\\x00-\x1f\x7f]+")


def _is_secret(name: str) -> bool:
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    return bool(words) and words[-1] in _SECRET_WORDS and words[-2:] != ["public", "key"]


def _clean(name: str, value: Any) -> Any:
    if _is_secret(name):
        return "***"
    if isinstance(value, Mapping):
        return {str(k): _clean(str(k), v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN is not JSON
    return value


class _Formatter(logging.Formatter):
    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def items(self, record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
        """The `<N>` prefix (or ""), and the event's keys in order."""
        out: dict[str, Any] = {}
        if not self.journal:
            ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            out["ts"] = ts.replace("+00:00", "Z")
        out |= {"level": record.levelname.lower(), "logger": record.name}
        out["event"] = record.getMessage()
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        for key, value in (extra | getattr(record, _FIELDS, {})).items():
            out[f"{key}_" if key in out else key] = _clean(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return (f"<{_priority(record.levelno)}>" if self.journal else ""), out


def _priority(levelno: int) -> int:
    return next(p for floor, p in ((50, 2), (40, 3), (30, 4), (20, 6), (0, 7)) if levelno >= floor)


class KVFormatter(_Formatter):
    """`key=value` pairs, logfmt style."""

    def format(self, record: logging.LogRecord) -> str:
        prefix, items = self.items(record)
        return prefix + " ".join(f"{_key(k)}={_value(v)}" for k, v in items.items())


class JSONFormatter(_Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        prefix, items = self.items(record)
        return prefix + json.dumps(items, ensure_ascii=False, default=str)


def _key(name: str) -> str:
    return re.sub(r"[^\w.\-]", "_", name) or "_"


def _value(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    text = json.dumps(value, default=str) if isinstance(value, Mapping | list) else str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text, ensure_ascii=False)


def _is_journal(stream: TextIO) -> bool:
    try:
        dev, ino = (int(part) for part in os.environ["JOURNAL_STREAM"].split(":"))
        st = os.fstat(stream.fileno())
    except (KeyError, ValueError, OSError):  # io.UnsupportedOperation is both
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def configure_logging(
    level: str, fmt: Literal["auto", "kv", "json"] = "auto", stream: TextIO | None = None
) -> logging.Handler:
    """Install one handler on the root logger (replacing one installed here before)."""
    stream = sys.stderr if stream is None else stream
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in ("auto", "kv", "json"):
        raise ValueError(f"unknown log format {fmt!r}: use auto, kv or json")
    formatter = JSONFormatter if fmt == "json" else KVFormatter
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(journal=_is_journal(stream)))
    handler.set_name("edged")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "edged"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    return handler


def log_event(
    logger: logging.Logger, level: int | str, event: str, /, *, exc_info: Any = None, **fields: Any
) -> None:
    """Log `event` with `fields` rendered as keys; level is a number or a name ("info")."""
    levelno = level if isinstance(level, int) else logging.getLevelNamesMapping()[level.upper()]
    if logger.isEnabledFor(levelno):
        logger.log(levelno, event, exc_info=exc_info, extra={_FIELDS: fields}, stacklevel=2)


class RateLimitedLog:
    """Warnings by kind: the first at once, then at most one line per kind per `interval_s`,
    carrying `suppressed=N` (occurrences since the previous line). A suppressed occurrence is
    only reported when a later one comes in; kinds should be a small fixed set."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        level: int = logging.WARNING,
    ) -> None:
        self._logger, self._interval, self._clock, self._level = logger, interval_s, clock, level
        self._counts: dict[str, int] = {}
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (time logged, count then)
        self._lock = threading.Lock()

    def warn(self, kind: str, message: str, **fields: Any) -> None:
        """Count one occurrence of `kind`; log it unless this kind logged recently."""
        with self._lock:
            count = self._counts[kind] = self._counts.get(kind, 0) + 1
            last = self._last.get(kind)
            now = self._clock()
            if last is not None and now - last[0] < self._interval:
                return
            self._last[kind] = (now, count)
        if last is not None:
            fields["suppressed"] = count - last[1] - 1
        log_event(self._logger, self._level, message, kind=kind, **fields)

    def counts(self) -> dict[str, int]:
        """Occurrences so far per kind, logged or not."""
        with self._lock:
            return dict(self._counts)
