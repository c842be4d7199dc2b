"""Readers for the files under deploy/ as the tools that use them read them: the compose file
(YAML with ${VAR} interpolation), the Containerfile (instructions, JSON-form commands), nginx's
configuration (directives and blocks), Mosquitto's (`key value` lines) and the lock file."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
CONTAINERFILE = DEPLOY / "control-plane.Containerfile"
DOCKERIGNORE = DEPLOY / "control-plane.Containerfile.dockerignore"
LOCK = DEPLOY / "requirements-cloud.txt"
MOSQUITTO_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
ENV_EXAMPLE = DEPLOY / "env.example"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $$ is a literal $
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


def env_example() -> dict[str, str]:
    """deploy/env.example's KEY=VALUE lines."""
    values = {}
    for raw in ENV_EXAMPLE.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def variables_used(text: str) -> set[str]:
    """The compose variables a text interpolates."""
    return {m[1] or m[4] for m in _VARIABLE.finditer(text) if m[0] != "$$"}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation, applied to every string of the parsed file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name = match[1] or match[4]
        operator, argument = match[2], match[3]
        present = name in env and (env[name] != "" or operator in (None, "-", "?"))
        if operator in (":?", "?") and not present:
            raise KeyError(f"compose needs {name}: {argument}")
        if present:
            return env[name]
        return argument if operator in (":-", "-") else ""

    return _VARIABLE.sub(one, value)


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as `docker compose config` would see it with `env` (default: the
    example .env): YAML anchors and merge keys resolved, variables interpolated."""
    raw = yaml.safe_load(COMPOSE.read_text())
    return interpolate(raw, env_example() if env is None else env)


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of compose's two forms."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def argv(value: Any) -> list[str]:
    """A compose `command:`/`entrypoint:` as the argument vector it runs."""
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


@dataclass(frozen=True, slots=True)
class Mount:
    source: str
    target: str
    read_only: bool

    @property
    def is_bind(self) -> bool:
        return self.source.startswith((".", "/"))


def mounts(service: dict[str, Any]) -> list[Mount]:
    """A service's volumes in short syntax (SOURCE:TARGET[:ro])."""
    found = []
    for entry in service.get("volumes", []):
        parts = entry.split(":")
        found.append(Mount(parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return found


def mount_of(service: dict[str, Any], path: str) -> Mount | None:
    """The mount a path inside the container lies on (the deepest one), if any."""
    best = None
    for mount in mounts(service):
        target = mount.target.rstrip("/")
        if (path == target or path.startswith(target + "/")) and (
            best is None or len(target) > len(best.target)
        ):
            best = mount
    return best


# -- the Containerfile ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int  # index of the FROM it belongs to

    def json(self) -> list[str]:
        """The JSON (exec) form of ENTRYPOINT, CMD or a HEALTHCHECK's CMD."""
        text = self.arguments
        if self.keyword == "HEALTHCHECK":
            text = text[text.index("CMD") + 3 :]
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
        return value

    def options(self) -> dict[str, str]:
        """`--flag=value` options at the start (COPY --from, HEALTHCHECK --interval)."""
        return dict(re.findall(r"--([a-z-]+)=(\S+)", self.arguments.split(" CMD ")[0]))

    def words(self) -> list[str]:
        """The arguments less the leading --options."""
        return [w for w in shlex.split(self.arguments) if not w.startswith("--")]


def containerfile() -> list[Instruction]:
    """The instructions, continuation lines joined, comments and the parser directive gone."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    instructions: list[Instruction] = []
    stage = -1
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, re.sub(r"\s+", " ", arguments.strip()), stage))
    return instructions


def image_env(instructions: list[Instruction], stage: int) -> dict[str, str]:
    """The ENV a stage sets (KEY=VALUE form)."""
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV" and ins.stage == stage:
            for word in shlex.split(ins.arguments):
                key, _, value = word.partition("=")
                env[key] = value
    return env


# -- nginx --------------------------------------------------------------------------------------


@dataclass
class Block:
    """One nginx directive: its name, its arguments and, for a block, what it holds."""

    name: str
    args: list[str]
    children: list[Block] = field(default_factory=list)
    is_block: bool = False

    def all(self, name: str) -> list[Block]:
        """Every directive of that name anywhere below."""
        found = [c for c in self.children if c.name == name]
        for child in self.children:
            found += child.all(name)
        return found

    def blocks(self, name: str) -> list[Block]:
        """Every `name { ... }` block anywhere below (not `name ...;` directives)."""
        return [b for b in self.all(name) if b.is_block]

    def first(self, name: str) -> Block:
        (found, *_) = [c for c in self.children if c.name == name]
        return found

    def values(self, name: str) -> list[list[str]]:
        return [c.args for c in self.children if c.name == name]


def nginx() -> Block:
    """nginx.conf parsed into its directive tree (enough of the grammar for this file)."""
    tokens = re.findall(r'"[^"]*"|\'[^\']*\'|[{};]|[^\s{};]+', _strip_comments(NGINX_CONF))
    root = Block("main", [])
    stack: list[Block] = [root]
    words: list[str] = []
    for token in tokens:
        if token in (";", "{"):
            block = Block(words[0], [w.strip("\"'") for w in words[1:]], is_block=token == "{")
            stack[-1].children.append(block)
            if token == "{":
                stack.append(block)
            words = []
        elif token == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(token)
    assert len(stack) == 1 and not words, "unbalanced braces in nginx.conf"
    return root


def _strip_comments(path: Path) -> str:
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in path.read_text().splitlines())


# -- Mosquitto ----------------------------------------------------------------------------------


def mosquitto_conf() -> list[tuple[str, str]]:
    """(option, value) for each line, in order."""
    pairs = []
    for raw in MOSQUITTO_CONF.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            pairs.append((key, value.strip()))
    return pairs


def mosquitto_option(name: str) -> str:
    (value,) = [v for k, v in mosquitto_conf() if k == name]
    return value


# -- the lock -----------------------------------------------------------------------------------


def lock() -> dict[str, tuple[str, list[str]]]:
    """Normalised distribution name -> (pinned version, sha256 hashes)."""
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    pins: dict[str, tuple[str, list[str]]] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        assert match, f"not a hashed pin: {line!r}"
        pins[normalise(match[1])] = (match[2], re.findall(r"sha256:([0-9a-f]{64})", match[3]))
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
