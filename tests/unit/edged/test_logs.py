"""Structured log lines: exact kv text, JSON, redaction, the journal prefix, rate limiting."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.logs import RateLimitedLog, configure_logging, log_event

TS = r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "


@pytest.fixture(autouse=True)
def restore_root() -> Iterator[None]:
    """Leave the root logger's handlers and level as the test found them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def kv(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """kv logging at debug into a StringIO, outside the journal."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stream = io.StringIO()
    configure_logging("debug", "kv", stream)
    return stream


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_kv_line_exact(kv: io.StringIO) -> None:
    """A kv event is one line: timestamp, level, logger, event, then fields in order."""
    log_event(logging.getLogger("edged.daemon"), "info", "model_loaded", version=1.2, path="/x y")
    [line] = lines(kv)
    assert re.fullmatch(TS + r'level=info logger=edged\.daemon event=model_loaded '
                        r'version=1\.2 path="/x y"', line)  # fmt: skip


def test_kv_quoting_and_escaping(kv: io.StringIO) -> None:
    """Spaces, quotes, '=', backslashes, newlines and empty strings are quoted and escaped."""
    log_event(
        logging.getLogger("t"), logging.WARNING, "odd", a='say "hi"', b="k=v", c="a\\b",
        d="two\nlines", e="", f=None, g=True, h="plain",
    )  # fmt: skip
    [line] = lines(kv)
    assert line.split(" event=odd ")[1] == (
        r'a="say \"hi\"" b="k=v" c="a\\b" d="two\nlines" e="" f=null g=true h=plain'
    )


def test_plain_logging_calls_render_too(kv: io.StringIO) -> None:
    """A %-formatted message is the event, and a plain `extra` renders as keys."""
    logging.getLogger("edged.x").error("lost %d frames", 3, extra={"port": "/dev/ttyS0"})
    [line] = lines(kv)
    assert line.endswith('level=error logger=edged.x event="lost 3 frames" port=/dev/ttyS0')


def test_kv_exception_stays_on_one_line(kv: io.StringIO) -> None:
    """A traceback becomes one quoted exc field with escaped newlines."""
    try:
        raise ValueError("boom")
    except ValueError:
        log_event(logging.getLogger("t"), "error", "failed", exc_info=True, step=2)
    [line] = lines(kv)
    exc = line.split(" step=2 exc=")[1]
    assert exc.startswith('"Traceback') and exc.endswith('ValueError: boom"')
    assert json.loads(exc).count("\n") >= 2


def test_json_lines_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """JSON format writes one parseable object per line, fields and exception as keys."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    log = logging.getLogger("edged.daemon")
    log_event(log, "debug", "hidden")
    log_event(log, "info", "loaded", version="1.2", nested={"a": 1, "token": "t0k"}, level=5)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log_event(log, "error", "crashed", exc_info=True)
    first, second = (json.loads(line) for line in lines(stream))
    assert re.fullmatch(r"\d{4}-.*\.\d{3}Z", first.pop("ts"))
    assert first == {
        "level": "info", "logger": "edged.daemon", "event": "loaded", "version": "1.2",
        "nested": {"a": 1, "token": "***"}, "level_": 5,
    }  # fmt: skip
    assert second["exc"].endswith("ZeroDivisionError: division by zero")


@pytest.mark.parametrize(
    "name",
    ["password", "db_password", "token", "access_token", "secret", "client_secret",
     "private_key", "api_key", "apiKey", "x-api-key", "authorization", "key", "passwd", "token_"],
)  # fmt: skip
def test_secrets_are_redacted(kv: io.StringIO, name: str) -> None:
    """A field whose name ends in a secret word renders as ***."""
    logging.getLogger("t").info("conf", extra={name: "hunter2"})
    assert lines(kv)[0].endswith(f"event=conf {name}=***")


@pytest.mark.parametrize("name", ["key_id", "token_count", "key_path", "public_key", "monkey"])
def test_harmless_names_are_kept(kv: io.StringIO, name: str) -> None:
    """Names that merely contain a secret word are rendered as they are."""
    log_event(logging.getLogger("t"), "info", "conf", **{name: "abc"})
    assert lines(kv)[0].endswith(f"event=conf {name}=abc")


def test_journal_prefix_when_journal_stream_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With JOURNAL_STREAM naming the stream, lines carry <priority> and no timestamp."""
    with (tmp_path / "journal").open("w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging("debug", "auto", stream)
        log = logging.getLogger("edged.j")
        for level in ("debug", "info", "warning", "error", "critical"):
            log_event(log, level, "e")
        stream.seek(0)
        got = stream.read().splitlines()
    assert got == [
        f"<{n}>level={name} logger=edged.j event=e"
        for n, name in ((7, "debug"), (6, "info"), (4, "warning"), (3, "error"), (2, "critical"))
    ]


def test_no_journal_prefix_for_another_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOURNAL_STREAM naming a different inode means not connected: timestamps, no prefix."""
    with (tmp_path / "other").open("w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        configure_logging("info", "kv", stream)
        logging.getLogger("t").info("e")
        stream.seek(0)
        assert re.match(TS + "level=info", stream.read())


def test_configure_twice_keeps_one_handler_and_rejects_bad_input() -> None:
    """Reconfiguring replaces our handler; unknown levels or formats raise ValueError."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "kv", first)
    configure_logging("info", "kv", second)
    logging.getLogger("t").info("once")
    assert first.getvalue() == "" and second.getvalue().count("\n") == 1
    with pytest.raises(ValueError, match="level"):
        configure_logging("loud", "kv", first)
    with pytest.raises(ValueError, match="format"):
        configure_logging("info", "xml", first)  # type: ignore[arg-type]


def test_rate_limited_log(kv: io.StringIO) -> None:
    """First occurrence logs at once; then one line per interval per kind with suppressed=N."""
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("edged.in"), 10.0, clock=lambda: now[0])
    limited.warn("bad_frame", "bad frame", port="a")
    for _ in range(4):
        now[0] += 2
        limited.warn("bad_frame", "bad frame", port="a")
    limited.warn("nan_input", "nan in input")
    now[0] += 2
    limited.warn("bad_frame", "bad frame", port="b")
    now[0] += 10
    limited.warn("bad_frame", "bad frame", port="c")
    assert [line.split(" event=")[1] for line in lines(kv)] == [
        '"bad frame" kind=bad_frame port=a',
        '"nan in input" kind=nan_input',
        '"bad frame" kind=bad_frame port=b suppressed=4',
        '"bad frame" kind=bad_frame port=c suppressed=0',
    ]
    assert limited.counts() == {"bad_frame": 7, "nan_input": 1}
