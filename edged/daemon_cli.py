"""`edged run`, `edged check-config` and `edged status`: the daemon's own commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from edged.config import DEFAULT_PATH, ConfigError, load_config

__all__ = ["add_daemon_commands"]


M_ARENA_MAX = -8  # glibc mallopt parameter
MALLOC_ARENAS = 1  # see docs/daemon.md, "Memory"


def _limit_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own heap arena (the loop, inference, paho,
    aiosqlite, the model loads in worker threads), and a thread's arena keeps what it freed:
    the daemon's threads share the main heap, which malloc_trim gives back. A no-op where
    mallopt does not exist, and when MALLOC_ARENA_MAX in the environment already says."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def cmd_run(args: argparse.Namespace) -> int:
    from edged.daemon import run_daemon
    from edged.logs import configure_logging

    _limit_malloc_arenas()  # before any thread starts
    config = load_config(Path(args.config))
    configure_logging(config.log.level, config.log.format)
    return asyncio.run(run_daemon(config, Path(args.config)))


def cmd_check_config(args: argparse.Namespace) -> int:
    """The file on its own, then [gating] against the configured model when it is there
    (`edged run` would refuse at start what does not fit that model)."""
    config = load_config(Path(args.path))
    sources = ", ".join(
        f"{s.name} ({type(s).__name__.removesuffix('SourceConfig').lower()})" for s in config.source
    )
    model = Path(config.device.model)
    if model.is_file():
        from edged.engine import open_bundle
        from edged.gating import check_fits

        bundle = open_bundle(model)
        manifest = bundle.manifest
        try:
            check_fits(config.gating, manifest, bundle.labels)
        except ValueError as exc:
            raise ConfigError(
                f"{args.path}: [gating] does not fit model {manifest.name} {manifest.version} "
                f"({model}): {exc}"
            ) from exc
        checked = f"model {model} ({manifest.name} {manifest.version}, [gating] fits it)"
    else:
        checked = f"model {model} (not there yet: [gating] not checked against it)"
    print(f"{args.path}: valid; {checked}; sources: {sources or 'none'}")
    return 0


def _read_status(path: str, timeout_s: float) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    status: dict[str, Any] = json.loads(b"".join(chunks))
    return status


def _show(status: dict[str, Any]) -> None:
    model, counts, gating = status["model"], status["counts"], status["gating"]
    drift, outbox, uplink = status["drift"], status["outbox"], status["uplink"]
    print(f"device   {status['device_id']}  ({status['state']}, up {status['uptime_s']} s)")
    base = f" (personalised, base {model['base']})" if model.get("base") else ""
    print(f"model    {model['name']} {model['version']}{base}")
    slots = status.get("slots")
    if slots:
        trial = slots.get("trial")
        print(
            f"slots    active {slots['active']['slot']} ({slots['active']['version']}), known good"
            f" {slots['known_good']['slot']}"
            + (f", on trial: {trial['version']}" if trial else "")
            + (
                f", last rollback: {slots['last_rollback']['reason']}"
                if slots.get("last_rollback")
                else ""
            )
        )
    update = status.get("update")
    if update:
        print(
            f"update   {update['checks']} checks, last {update['last_check']}"
            + (f": {update['reason']}" if update.get("reason") else "")
        )
    finetune = status.get("finetune")
    if finetune:
        last = finetune.get("last") or {}
        print(
            f"finetune {'on' if finetune['enabled'] else 'off'}, {finetune['labels']} labels"
            f" ({finetune['new_labels']} new), {finetune['jobs']} jobs"
            + (", worker running" if finetune["running"] else "")
            + (f", last {last['verdict']}: {last.get('reason')}" if last else "")
        )
    print(f"rate     {status['rate_per_s']} samples/s, queue {status['queue_depth']}")
    print("counts   " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("gating   " + ", ".join(f"{k} {v}" for k, v in gating.items()))
    scores = {k: v for k, v in drift.items() if k != "alarms"}
    print("drift    " + ", ".join(f"{k} {v}" for k, v in scores.items()))
    for alarm in drift["alarms"]:
        print(
            f"  alarm  {alarm['kind']} score {alarm['score']} > {alarm['threshold']}"
            f" after {alarm['samples']} samples"
        )
    print(
        "latency  "
        + ", ".join(f"{k} {v:.2f}" for k, v in status["latency_ms"].items() if v is not None)
    )
    if status["bad_input"]:
        print("bad in   " + ", ".join(f"{k} {v}" for k, v in status["bad_input"].items()))
    print(
        f"outbox   depth {outbox['depth']}, {outbox['bytes']} bytes, dropped "
        f"{outbox['dropped']}, refused {outbox.get('refused', 0)}"
        + (f"; replaced a damaged file: {outbox['recovered']}" if outbox.get("recovered") else "")
    )
    if uplink is None:
        print("uplink   disabled")
    else:
        print(
            f"uplink   {uplink['state']}, {uplink['records']} records sent"
            + (f", last error: {uplink['error']}" if uplink["error"] else "")
        )


def cmd_status(args: argparse.Namespace) -> int:
    path = args.socket or str(load_config(Path(args.config)).status.socket)
    try:
        status = _read_status(path, args.timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"edged: error: no daemon answers on {path}; is edged running?", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        _show(status)
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from edged.enrollment import enroll
    from edged.identity import DeviceIdentity

    if args.state_dir is not None:
        state_dir = Path(args.state_dir)
    else:
        state_dir = load_config(Path(args.config)).device.state_dir
    token = args.token
    if token == "-":
        token = sys.stdin.readline().strip()
    identity = DeviceIdentity.load_or_create(state_dir / "device.key")
    enrollment = enroll(args.url, token, identity, state_dir)
    _hand_to_state_owner(state_dir)
    print(
        f"enrolled as {enrollment.device_id} in group {enrollment.group}; broker "
        f"{enrollment.broker_host}:{enrollment.broker_port}; credentials in {state_dir}"
    )
    return 0


def _hand_to_state_owner(state_dir: Path) -> None:
    """`edged enroll` run as root on a packaged device: what it wrote goes to the state
    directory's owner (the daemon's user, set by the package), or the daemon could not read
    its own key and credentials."""
    owner = state_dir.stat()
    if os.geteuid() != 0 or owner.st_uid == 0:
        return
    from edged.enrollment import API_TOKEN_FILE, ENROLLMENT_FILE, PASSWORD_FILE, ROOT_FILE

    written = [Path("device.key"), Path(ENROLLMENT_FILE), Path(PASSWORD_FILE)]
    written += [Path(API_TOKEN_FILE), *reversed(ROOT_FILE.parents[:-1]), ROOT_FILE]
    for name in written:
        path = state_dir / name
        if path.exists() and path.stat().st_uid == 0:
            os.chown(path, owner.st_uid, owner.st_gid)


def add_daemon_commands(sub: Any) -> None:
    p = sub.add_parser("run", help="run the daemon (what the systemd unit starts)")
    p.add_argument("--config", default=str(DEFAULT_PATH), help=f"default {DEFAULT_PATH}")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check-config", help="check a configuration file; explain the first error")
    p.add_argument("path", nargs="?", default=str(DEFAULT_PATH))
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("status", help="the running daemon's state, over its unix socket")
    p.add_argument("--config", default=str(DEFAULT_PATH), help="to find the socket")
    p.add_argument("--socket", help="the status socket (overrides --config)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("enroll", help="enrol this device with a control plane (one-time token)")
    p.add_argument("--url", required=True, help="the control plane, e.g. https://cp.example")
    p.add_argument("--token", required=True, help="the enrollment token ('-': read stdin)")
    p.add_argument("--config", default=str(DEFAULT_PATH), help="to find the state directory")
    p.add_argument("--state-dir", help="where the key and credentials live (overrides --config)")
    p.set_defaults(func=cmd_enroll)
