"""Enrolling the device with the control plane, and what enrollment leaves on disk.

`enroll(url, token, identity)` proves possession of the device key (edged_formats.enrollment)
and redeems a one-time enrollment token at `POST /v1/enroll`. The answer is kept in the state
directory: `enrollment.json` (control plane URL, device id, group, broker address; no
secrets), `uplink.password` and `api.token` (mode 0600, written atomically). When
`enrollment.json` exists and `[uplink] username` is not set, the daemon takes its uplink
address and credentials from these files, so a device needs no hand-edited configuration.

When the answer carries the update repository's root metadata (`root`, newer control planes),
it is checked (its own signatures) and written to `<state_dir>/ota/metadata/root.json`
(atomically, 0644): the trusted root the OTA trust walk starts from (docs/ota.md). A root
already there, pinned by the image, is kept; the walk moves it forward.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from edged.atomic import atomic_write
from edged.errors import EnrollmentError
from edged.identity import DeviceIdentity
from edged_formats import __version__
from edged_formats.enrollment import prove_possession
from edged_formats.errors import TrustError
from edged_formats.tuf import TrustedSet

__all__ = ["Enrollment", "enroll", "load_enrollment"]

ENROLLMENT_FILE = "enrollment.json"
PASSWORD_FILE = "uplink.password"
API_TOKEN_FILE = "api.token"
ROOT_FILE = Path("ota") / "metadata" / "root.json"
SECRET_MODE = 0o600


@dataclass(frozen=True, slots=True)
class Enrollment:
    url: str
    device_id: str
    group: str
    tags: tuple[str, ...]
    broker_host: str
    broker_port: int
    broker_tls: bool
    username: str

    def password_file(self, state_dir: Path) -> Path:
        return state_dir / PASSWORD_FILE

    def api_token(self, state_dir: Path) -> str:
        """The device's API token for the control plane, as `edged enroll` stored it."""
        return (state_dir / API_TOKEN_FILE).read_text(encoding="utf-8").strip()


def _problem(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else f"HTTP {response.status_code}"


def enroll(
    url: str,
    token: str,
    identity: DeviceIdentity,
    state_dir: Path,
    *,
    timeout: float = 30.0,
    transport: httpx.BaseTransport | None = None,
) -> Enrollment:
    """Redeem `token` at the control plane at `url` and store the result in `state_dir`."""
    body = {
        "token": token,
        "public_key": identity.public_key_hex,
        "proof": prove_possession(identity.signing_key, token).hex(),
        "software_version": __version__,
    }
    try:
        with httpx.Client(base_url=url, timeout=timeout, transport=transport) as client:
            response = client.post("/v1/enroll", json=body)
    except httpx.HTTPError as exc:
        raise EnrollmentError(f"cannot reach the control plane at {url}: {exc}") from exc
    if response.status_code != 201:
        raise EnrollmentError(f"the control plane refused enrollment: {_problem(response)}")
    try:
        answer: dict[str, Any] = response.json()
        broker = answer["broker"]
        enrollment = Enrollment(
            url=url,
            device_id=answer["device_id"],
            group=answer["group"],
            tags=tuple(answer["tags"]),
            broker_host=broker["host"],
            broker_port=int(broker["port"]),
            broker_tls=bool(broker["tls"]),
            username=broker["username"],
        )
        password, api_token = str(broker["password"]), str(answer["api_token"])
        root = _root(answer.get("root"))
    except (ValueError, KeyError, TypeError) as exc:
        raise EnrollmentError(f"the control plane's answer is not an enrollment: {exc!r}") from exc
    if enrollment.device_id != identity.default_device_id():
        raise EnrollmentError(
            f"the control plane named the device '{enrollment.device_id}', not the id of its "
            f"key '{identity.default_device_id()}'"
        )
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(state_dir / PASSWORD_FILE, password.encode(), mode=SECRET_MODE)
    atomic_write(state_dir / API_TOKEN_FILE, api_token.encode(), mode=SECRET_MODE)
    record = {**asdict(enrollment), "tags": list(enrollment.tags)}
    atomic_write(state_dir / ENROLLMENT_FILE, json.dumps(record, indent=2).encode(), mode=0o644)
    root_file = state_dir / ROOT_FILE
    if root is not None and not root_file.exists():
        root_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(root_file, root, mode=0o644)
    return enrollment


def _root(value: Any) -> bytes | None:
    """The root metadata of the answer, checked against its own keys (None: not sent)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("root must be the root metadata as JSON text")
    data = value.encode("utf-8")
    try:
        TrustedSet(data, time.time())
    except TrustError as exc:
        raise EnrollmentError(
            f"the control plane sent root metadata that is not valid: {exc}"
        ) from exc
    return data


def load_enrollment(state_dir: Path) -> Enrollment | None:
    """What `enroll` stored in `state_dir`, or None when the device was never enrolled."""
    path = state_dir / ENROLLMENT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Enrollment(**{**data, "tags": tuple(data["tags"])})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise EnrollmentError(f"{path} is not an enrollment record: {exc}") from exc
