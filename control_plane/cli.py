"""`edged-control-plane`: serve the API (and ingest), apply migrations, issue a token.

    edged-control-plane migrate [--config FILE]
    edged-control-plane create-token --name NAME --role admin|operator|viewer [--group G ...]
    edged-control-plane serve [--config FILE] [--host H] [--port P]

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
    return parser


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
            settings, broker_admin=broker.admin, device_broker=broker.device, ingest=broker.ingest
        )
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="info",
            access_log=False,
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
        else:
            asyncio.run(_serve(settings))
    except ControlPlaneError as exc:
        print(f"edged-control-plane: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
