"""The daemon's TOML configuration: typed, bounded, unknown keys refused in one sentence."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from edged.config import (
    Config,
    ConfigError,
    FinetuneConfig,
    MqttSourceConfig,
    ReplaySourceConfig,
    load_config,
    parse_config,
)
from edged.gating import GatingConfig

EXAMPLE = Path(__file__).resolve().parents[3] / "packaging" / "edged.toml"
# "# key = value   # comment" inside a plain [section]; the [[source]] and alternative
# lines (threshold, per_class) are examples, not defaults
DEFAULT_LINE = re.compile(r"^# (?P<key>\w+) = (?P<value>\S.*?)(?:\s+#.*)?$")
NOT_DEFAULTS = {"threshold", "per_class", "username", "password_file", "device_id"}
NOT_DEFAULTS |= {"ca_file", "cert_file", "key_file", "bytes_per_s", "bytes_per_day"}


def test_defaults_need_no_file_content() -> None:
    """An empty file is a valid configuration with the documented defaults."""
    config = parse_config("")
    assert config == Config()
    assert config.device.state_dir == Path("/var/lib/edged")
    assert config.pipeline.queue_size == 64
    assert config.gating.quantile == 0.05


def test_the_shipped_example_states_the_true_defaults() -> None:
    """packaging/edged.toml parses to the defaults but for the one line the packaged units
    need, and uncommenting its default lines changes nothing else."""
    text = EXAMPLE.read_text()
    packaged = Config(finetune=FinetuneConfig(launcher="systemd"))
    assert parse_config(text, "example") == packaged
    lines, section = [], ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line
            lines.append(line)
            continue
        if line.startswith("# ["):  # an optional, commented-out table: examples
            section = ""
            continue
        match = DEFAULT_LINE.match(line)
        if match and section and match["key"] not in NOT_DEFAULTS:
            lines.append(f"{match['key']} = {match['value']}")
        elif line.startswith("launcher = "):
            lines.append(line)
    uncommented = "\n".join(lines)
    assert uncommented.count(" = ") >= 35  # every default line took part
    explicit = msgspec.structs.replace(packaged, gating=GatingConfig(reference_quantile=0.05))
    assert parse_config(uncommented, "uncommented example") == explicit


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[engine]\nthreads = 0\n", "engine.threads: expected `int` >= 1"),
        ("[engine]\nthreads = 'two'\n", "engine.threads: expected `int`, got `str`"),
        (
            "[engine]\nruntime = 'onnx'\n",
            "engine.runtime: invalid enum value 'onnx' "
            "(one of 'ai-edge-litert', 'auto', 'tflite-runtime')",
        ),
        ("[log]\nformat = 'xml'\n", "log.format: invalid enum value 'xml' (one of 'auto',"),
        (
            "[[source]]\nkind = 'usb'\nname = 'a'\n",
            "source[0].kind: invalid value 'usb' (one of 'mqtt', 'spool', 'replay')",
        ),
        (
            "[local_mqtt]\n[[source]]\nkind = 'replay'\nname = 'a'\npath = 'x'\n"
            "[[source]]\nkind = 'mqtt'\nname = 'b'\ntopic = 't'\nqos = 2\n",
            "source[1].qos: invalid enum value 2 (one of 0, 1)",
        ),
        ("[pipeline]\nqueue = 3\n", "pipeline: unknown key `queue`"),
        ("typo = 1\n", "unknown key `typo`"),
        ("[uplink]\nport = 70000\n", "uplink.port: expected `int` <= 65535"),
        ("[drift]\nwindow = 0\n", "drift: window must"),
        ("[gating]\naudit_rate = 2\n", "gating: audit_rate must be between 0 and 1"),
        ("[gating.budget]\nsamples_per_hour = -1\n", "gating.budget: samples_per_hour"),
        ("plugins = ['not a spec']\n", "plugins[0]: expected `str` matching"),
        ("[[source]]\nkind = 'replay'\npath = 'x.npz'\n", "missing required key `name`"),
        ("[[source]]\nkind = 'replay'\nname = 'Bad Name'\npath = 'x'\n", "source[0].name"),
        (
            "[[source]]\nkind='replay'\nname='a'\npath='x'\n[[source]]\nkind='spool'\n"
            "name='a'\npath='y'\n",
            "two sources are named 'a'",
        ),
        ("[[source]]\nkind = 'mqtt'\nname = 'cam'\ntopic = 't'\n", "needs a [local_mqtt]"),
        ("[device\n", "is not valid TOML"),
    ],
)
def test_the_first_problem_in_one_sentence(text: str, message: str) -> None:
    """Each mistake is refused with one line naming the key and the rule."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "edged.toml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("edged.toml")
    assert "\n" not in str(caught.value)


def test_sources_are_told_apart_by_kind() -> None:
    """[[source]] tables become typed source configs, paths as Paths."""
    config = parse_config(
        "[local_mqtt]\n"
        "[[source]]\nkind = 'replay'\nname = 'demo'\npath = '/data/x.npz'\nrate_hz = 20.0\n"
        "[[source]]\nkind = 'mqtt'\nname = 'cam'\ntopic = 'cams/+/frame'\nformat = 'raw'\n"
    )
    replay, mqtt = config.source
    assert isinstance(replay, ReplaySourceConfig)
    assert replay.path == Path("/data/x.npz") and replay.rate_hz == 20.0
    assert isinstance(mqtt, MqttSourceConfig)
    assert mqtt.format == "raw" and mqtt.qos == 1


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    """A missing or non-UTF-8 file is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match=r"cannot read .*missing\.toml"):
        load_config(tmp_path / "missing.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(binary)
