"""`edged-control-plane`: serve the API (and ingest), apply migrations, issue a token.

    edged-control-plane migrate [--config FILE]
    edged-control-plane create-token --name NAME --role admin|operator|viewer [--group G ...]
    edged-control-plane serve [--config FILE] [--host H] [--port P]
    edged-control-plane keys init --offline-dir DIR [--key-dir KEYDIR] [--root-keys N]
                                  [--root-threshold T] [--targets online|offline]
    edged-control-plane root sign --offline-dir DIR [--rotate ROLE ...] [--key-dir KEYDIR]
    edged-control-plane root publish FILE --url URL --token TOKEN
    edged-control-plane root install FILE [--config FILE]
    edged-control-plane targets sign --offline-dir DIR --url URL --token TOKEN

`keys`, `root sign` and `targets sign` run where the offline keys are (they never reach the
server); `root publish` uploads what they signed, `root install` writes it straight to the
database of the server it runs on (docs/control-plane.md, "Signed repository").

Configuration comes from `--config FILE` (TOML) or `EDGED_CP_*` environment variables
(control_plane.settings). Errors are one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from control_plane.auth import Role
from control_plane.db.engine import Database
from control_plane.errors import ControlPlaneError
from control_plane.settings import Settings, load_settings

log = logging.getLogger("control_plane")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged-control-plane", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("migrate", "apply database migrations"),
        ("serve", "serve the REST API and ingest"),
        ("create-token", "issue an operator API token"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, help="TOML settings file (else EDGED_CP_* env)")
    serve = sub.choices["serve"]
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    token = sub.choices["create-token"]
    token.add_argument("--name", required=True)
    token.add_argument("--role", required=True, choices=[r.name for r in Role])
    token.add_argument(
        "--group",
        action="append",
        dest="groups",
        help="reach only this device group (repeatable; default: every group)",
    )
    token.add_argument("--expires-in-s", type=float)
    _signing_parsers(sub)
    return parser


def _signing_parsers(sub: Any) -> None:
    def config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, help="TOML settings file (else EDGED_CP_* env)")
        return p

    def expiry(p: argparse.ArgumentParser) -> None:
        p.add_argument("--expires-days", type=int, default=365, help="root lifetime (days)")

    keys = sub.add_parser("keys", help="make the repository's signing keys").add_subparsers(
        dest="action", required=True
    )
    init = config(keys.add_parser("init", help="new keys for every role and 1.root.json"))
    init.add_argument("--offline-dir", type=Path, required=True)
    init.add_argument("--key-dir", type=Path, help="the server's key_dir (default: settings)")
    init.add_argument("--root-keys", type=int, default=1)
    init.add_argument("--root-threshold", type=int, default=1)
    init.add_argument("--targets", choices=["online", "offline"], default="online")
    expiry(init)
    root = sub.add_parser("root", help="sign, publish or install root metadata")
    actions = root.add_subparsers(dest="action", required=True)
    sign = config(actions.add_parser("sign", help="sign root N+1, rotating roles' keys"))
    sign.add_argument("--offline-dir", type=Path, required=True)
    sign.add_argument("--rotate", action="append", default=[], metavar="ROLE")
    sign.add_argument("--key-dir", type=Path, help="where new online keys are written")
    sign.add_argument("--root-keys", type=int)
    sign.add_argument("--root-threshold", type=int)
    expiry(sign)
    publish = config(actions.add_parser("publish", help="upload root metadata to the API"))
    publish.add_argument("file", type=Path)
    publish.add_argument("--url", required=True)
    publish.add_argument("--token", required=True, help="an admin API token")
    install = config(actions.add_parser("install", help="install root metadata in the database"))
    install.add_argument("file", type=Path)
    targets = sub.add_parser("targets", help="sign pending targets with offline keys")
    tsign = config(
        targets.add_subparsers(dest="action", required=True).add_parser(
            "sign", help="fetch the pending targets, sign them offline, post the signatures"
        )
    )
    tsign.add_argument("--offline-dir", type=Path, required=True)
    tsign.add_argument("--url", required=True)
    tsign.add_argument("--token", required=True, help="an admin API token")


async def _migrate(settings: Settings) -> None:
    db = Database(settings.database_url)
    try:
        revision = await db.migrate()
    finally:
        await db.close()
    print(f"database {db.safe_url} at migration {revision}")


async def _create_token(settings: Settings, args: argparse.Namespace) -> None:
    from control_plane.bootstrap import create_token

    db = Database(settings.database_url)
    try:
        await db.check_schema()
        token_id, secret = await create_token(
            db, args.name, Role[args.role], args.groups, args.expires_in_s
        )
    finally:
        await db.close()
    print(f"token {token_id} ({args.role}) for {args.name}:", file=sys.stderr)
    print(secret)


async def _root_install(settings: Settings, path: Path) -> None:
    import time

    from control_plane.db.models import AuditEntry
    from control_plane.repository import RepositoryStore, Transaction

    data = _read(path)
    db = Database(settings.database_url)

    async def work(tx: Transaction) -> int:
        root = await tx.install_root(data, time.time())
        tx.session.add(
            AuditEntry(
                at=time.time(),
                actor="edged-control-plane root install",
                role=None,
                action="repository.root",
                target=f"root v{root.version}",
                outcome="ok",
                source="local",
                detail={"file": str(path)},
            )
        )
        return root.version

    try:
        await db.check_schema()
        version = await RepositoryStore(settings, db).run(work)
    finally:
        await db.close()
    print(f"root v{version} installed; the repository is re-signed under it")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ControlPlaneError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _api_detail(response: Any) -> str:
    try:
        return str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def _signing(args: argparse.Namespace, settings: Settings) -> None:
    """`keys init`, `root sign`, `root publish` and `targets sign` (no database)."""
    import httpx

    from control_plane import signing_keys

    days = getattr(args, "expires_days", 365) * 86_400
    if args.command == "keys":
        path = signing_keys.init_keys(
            args.offline_dir,
            args.key_dir or settings.signing_key_dir,
            root_keys=args.root_keys,
            root_threshold=args.root_threshold,
            targets_offline=args.targets == "offline",
            expires_s=days,
        )
        print(path)
    elif args.command == "root" and args.action == "sign":
        print(
            signing_keys.sign_next_root(
                args.offline_dir,
                rotate=args.rotate,
                key_dir=args.key_dir,
                root_keys=args.root_keys,
                root_threshold=args.root_threshold,
                expires_s=days,
            )
        )
    elif args.command == "root":
        data = _read(args.file)
        try:
            response = httpx.post(
                args.url.rstrip("/") + "/v1/repository/root",
                content=data,
                headers={
                    "Authorization": f"Bearer {args.token}",
                    "Content-Type": "application/json",
                },
                timeout=60,
            )
        except httpx.HTTPError as exc:
            raise ControlPlaneError(f"cannot reach {args.url}: {exc}") from exc
        if response.status_code != 200:
            raise ControlPlaneError(f"the control plane refused the root: {_api_detail(response)}")
        print(f"root v{response.json()['root']['version']} published")
    else:
        print(signing_keys.sign_pending_targets(args.offline_dir, args.url, args.token))


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its shutdown, which would kill the process before
        the supervised broker and the admin session are closed: stop on it, and return."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, self.handle_exit, signum, None)
            try:
                yield
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)

    return Server


async def _serve(settings: Settings) -> None:
    import uvicorn

    server_class = _server_class()

    from control_plane.app import create_app
    from control_plane.bootstrap import open_broker

    # Ingest checks batches in a thread of its own; hand the GIL back to the event loop every
    # millisecond (not Python's 5) so API requests are not held behind a batch.
    sys.setswitchinterval(0.001)
    async with AsyncExitStack() as stack:
        broker = await open_broker(settings, stack)
        if broker.local is not None:
            log.info("supervising a local mosquitto on %s:%d", broker.local.host, broker.local.port)
        app = create_app(
            settings,
            broker_admin=broker.admin,
            device_broker=broker.device,
            ingest=broker.ingest,
            notify=broker.login,
        )
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="info",
            access_log=False,
            http="httptools",
            lifespan="on",
        )
        server = server_class(config)
        await server.serve()
        if not server.started:
            raise ControlPlaneError("the API did not start; see the log above")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    overrides: dict[str, Any] = {}
    if args.command == "serve":
        if args.host is not None:
            overrides["host"] = args.host
        if args.port is not None:
            overrides["port"] = args.port
    try:
        settings = load_settings(args.config, **overrides)
        if args.command == "migrate":
            asyncio.run(_migrate(settings))
        elif args.command == "create-token":
            asyncio.run(_create_token(settings, args))
        elif args.command == "root" and args.action == "install":
            asyncio.run(_root_install(settings, args.file))
        elif args.command in ("keys", "root", "targets"):
            _signing(args, settings)
        else:
            import uvloop  # the event loop in C: less CPU per request and per ingested message

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(_serve(settings))
    except ControlPlaneError as exc:
        print(f"edged-control-plane: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
