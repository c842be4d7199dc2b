"""Roles, group scopes and the audit log, against a real control plane on both backends."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.support.control_plane import ControlPlaneProcess, run_sql


def _audit(cp: ControlPlaneProcess, **params: str) -> list[dict]:
    with cp.api(cp.admin_token) as api:
        response = api.get("/v1/audit", params=params)
        assert response.status_code == 200, response.text
        return list(response.json()["items"])


def test_viewer_reads_but_cannot_mutate(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """A viewer lists devices; every mutation it tries is 403 and lands in the audit log."""
    device = cp.enroll(tmp_path, group)
    viewer = cp.new_token("viewer")
    with cp.api(viewer) as api:
        assert api.get("/v1/devices", params={"group": group}).status_code == 200
        attempts = [
            api.post(f"/v1/devices/{device.device_id}/quarantine"),
            api.patch(f"/v1/devices/{device.device_id}", json={"tags": ["x"]}),
            api.post("/v1/tokens", json={"name": "me", "role": "admin"}),
            api.post(f"/v1/devices/{device.device_id}/decommission"),
        ]
    assert [r.status_code for r in attempts] == [403, 403, 403, 403]
    assert attempts[0].json()["detail"] == "role 'viewer' may not do this; it needs 'operator'"
    denied = _audit(cp, outcome="denied")
    routes = {e["action"] for e in denied if e["role"] == "viewer"}
    assert f"POST /v1/devices/{device.device_id}/quarantine" in routes
    with cp.api(cp.admin_token) as api:
        assert api.get(f"/v1/devices/{device.device_id}").json()["status"] == "active"


def test_operator_out_of_scope_gets_403_and_an_audit_entry(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """A group-scoped operator acts in its group; outside it every call is 403 and audited."""
    mine = cp.enroll(tmp_path / "mine", group)
    other_group = f"{group}-other"
    theirs = cp.enroll(tmp_path / "theirs", other_group)
    operator = cp.new_token("operator", groups=[group])
    with cp.api(operator) as api:
        listed = api.get("/v1/devices").json()["items"]
        assert [d["id"] for d in listed] == [mine.device_id]
        out = api.post(f"/v1/devices/{theirs.device_id}/quarantine")
        read = api.get(f"/v1/devices/{theirs.device_id}")
        move = api.patch(f"/v1/devices/{mine.device_id}", json={"group": other_group})
        token = api.post("/v1/enrollment-tokens", json={"group": other_group})
        ok = api.patch(f"/v1/devices/{mine.device_id}", json={"tags": ["kept"]})
    assert [r.status_code for r in (out, read, move, token)] == [403, 403, 403, 403]
    assert out.json()["detail"].endswith(f"does not reach group '{other_group}'")
    assert ok.status_code == 200 and ok.json()["tags"] == ["kept"]
    entries = _audit(cp, target=theirs.device_id)
    denial = next(e for e in entries if e["action"] == "device.quarantine")
    assert denial["outcome"] == "denied" and denial["role"] == "operator"
    assert denial["source"] == "127.0.0.1"
    updated = _audit(cp, target=mine.device_id, action="device.update")
    assert updated[0]["outcome"] == "ok" and updated[0]["detail"]["tags"] == ["kept"]


def test_a_scoped_token_reads_only_its_groups_data(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """Every read of device data checks the scope: a viewer scoped to one group gets 200 for
    its device and group and 403 (audited) for another's, on telemetry, health, drift,
    events, samples, labels and personalisation; rejections are filtered to its devices."""
    mine = cp.enroll(tmp_path / "mine", group)
    other = f"{group}-other"
    theirs = cp.enroll(tmp_path / "theirs", other)
    viewer = cp.create_token("viewer", groups=[group])

    def reads(device: str, in_group: str) -> list[str]:
        return [
            f"/v1/devices/{device}/telemetry",
            f"/v1/groups/{in_group}/telemetry",
            f"/v1/devices/{device}/health",
            f"/v1/devices/{device}/drift",
            f"/v1/groups/{in_group}/drift",
            f"/v1/events?device_id={device}",
            f"/v1/events?group={in_group}",
            f"/v1/samples?device_id={device}",
            f"/v1/devices/{device}/labels",
            f"/v1/devices/{device}/personalisation",
        ]

    with cp.api(viewer["token"]) as api:
        own = {url: api.get(url).status_code for url in reads(mine.device_id, group)}
        foreign = {url: api.get(url).status_code for url in reads(theirs.device_id, other)}
        rejections = api.get("/v1/ingest/rejections", params={"device_id": theirs.device_id})
    assert set(own.values()) <= {200, 404}, own  # 404: no health report yet
    assert set(foreign.values()) == {403}, foreign
    assert rejections.status_code == 200 and rejections.json()["items"] == []
    denied = [
        e
        for e in _audit(cp, outcome="denied", limit="1000")
        if e["actor"].endswith(f"({viewer['id']})")
    ]
    assert len(denied) >= len(foreign)


def test_every_mutation_is_audited_with_who_what_when_where(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """Token creation, enrollment, tagging and quarantine each leave one entry."""
    name = f"ops-{uuid.uuid4().hex[:6]}"
    with cp.api(cp.admin_token) as api:
        made = api.post("/v1/tokens", json={"name": name, "role": "operator"}).json()
    device = cp.enroll(tmp_path, group)
    with cp.api(made["token"]) as api:
        assert api.post(f"/v1/devices/{device.device_id}/quarantine").status_code == 200
        assert api.post(f"/v1/devices/{device.device_id}/release").status_code == 200
    created = _audit(cp, action="token.create", target=made["id"])
    assert len(created) == 1 and created[0]["detail"]["name"] == name
    enrolled = _audit(cp, action="device.enroll", target=device.device_id)
    assert enrolled[0]["actor"] == f"device {device.device_id}"
    actions = [e["action"] for e in _audit(cp, target=device.device_id)]
    assert actions[:2] == ["device.release", "device.quarantine"]  # newest first
    entry = _audit(cp, action="device.quarantine", target=device.device_id)[0]
    assert entry["actor"] == f"{name} ({made['id']})" and entry["at"] > 0


def test_tokens_missing_revoked_or_not_admin(cp: ControlPlaneProcess) -> None:
    """No token is 401; a revoked one is 401 at once; only admins read the audit log."""
    made = cp.create_token("operator")
    operator = made["token"]
    with cp.api(operator) as api:
        assert api.get("/v1/devices").status_code == 200
        assert api.get("/v1/audit").status_code == 403
    with cp.api(cp.admin_token) as api:
        tokens = api.get("/v1/tokens", params={"limit": 1000}).json()["items"]
        assert made["id"] in {t["id"] for t in tokens}
        for t in tokens:
            assert "token" not in t and "token_hash" not in t
        assert api.delete(f"/v1/tokens/{made['id']}").status_code == 204
    with cp.api(operator) as api:  # it was just used, so this replica had it cached
        assert api.get("/v1/devices").status_code == 401
    with cp.api("edcp_not-a-real-token") as api:
        assert api.get("/v1/devices").status_code == 401
    with cp.api() as api:
        missing = api.get("/v1/devices")
    assert missing.status_code == 401
    assert missing.headers["content-type"] == "application/problem+json"


def test_an_admin_token_is_never_group_scoped(
    cp: ControlPlaneProcess, database_url: str, group: str
) -> None:
    """Admin actions are fleet-wide (tokens, the audit log): a scoped admin could mint itself
    an unscoped token. Making one is refused; one already in the database (made before this
    rule) is refused by every admin route, audited, and keeps only what its groups reach."""
    from control_plane.auth import SCOPED_ADMIN, hash_secret

    with cp.api(cp.admin_token) as api:
        made = api.post("/v1/tokens", json={"name": "ga", "role": "admin", "groups": [group]})
    assert made.status_code == 422, made.text
    assert SCOPED_ADMIN in made.text
    cli = cp.run_cli("create-token", "--name", "ga", "--role", "admin", "--group", group)
    assert cli.returncode == 2 and SCOPED_ADMIN in cli.stderr, cli.stderr
    secret, token_id = f"edcp_{uuid.uuid4().hex}", uuid.uuid4().hex
    run_sql(
        database_url,
        [
            "INSERT INTO operator_tokens (id, name, token_hash, role, groups, created_at) "
            f"VALUES ('{token_id}', 'old-scoped-admin', '{hash_secret(secret)}', 'admin', "
            f"'[\"{group}\"]', 0)"
        ],
    )
    with cp.api(secret) as api:
        attempts = [
            api.post("/v1/tokens", json={"name": "escape", "role": "admin"}),
            api.get("/v1/tokens"),
            api.get("/v1/audit"),
        ]
        listed = api.get("/v1/devices", params={"group": group})
        other = api.get("/v1/devices", params={"group": f"{group}-other"})
    assert [r.status_code for r in attempts] == [403, 403, 403], [r.text for r in attempts]
    assert "admin actions are fleet-wide" in attempts[0].json()["detail"]
    assert listed.status_code == 200 and other.status_code == 403
    denied = [e for e in _audit(cp, outcome="denied") if e["actor"].endswith(f"({token_id})")]
    assert {e["action"] for e in denied} >= {"POST /v1/tokens", "GET /v1/audit"}
    with cp.api(cp.admin_token) as api:
        names = {t["name"] for t in api.get("/v1/tokens", params={"limit": 1000}).json()["items"]}
    assert "escape" not in names


def test_refused_mutations_are_audited_with_the_caller_as_far_as_known(
    cp: ControlPlaneProcess, group: str
) -> None:
    """Not only 403s: a mutating call refused for any reason lands in the audit log, with
    the operator when its token checked out, else as anonymous; reads are not audited."""
    made = cp.create_token("operator", groups=[group])
    missing = f"dev-{uuid.uuid4().hex[:16]}"
    with cp.api(made["token"]) as api:
        not_found = api.post(f"/v1/devices/{missing}/quarantine")
        invalid = api.patch(f"/v1/devices/{missing}", json={"tags": "not-a-list"})
        read = api.get(f"/v1/devices/{missing}")
    with cp.api() as api:
        anonymous = api.post("/v1/tokens", json={"name": "x", "role": "viewer"})
        enroll = api.post("/v1/enroll", json={"token": "edenr_" + "x" * 40})
    assert [r.status_code for r in (not_found, invalid, read, anonymous, enroll)] == [
        404,
        422,
        404,
        401,
        422,
    ]
    newest_first = _audit(cp, outcome="refused", limit="1000")
    refused = {e["target"]: e for e in reversed(newest_first)}  # the newest per target
    mine = refused[f"/v1/devices/{missing}/quarantine"]
    assert mine["actor"] == f"{made['name']} ({made['id']})" and mine["role"] == "operator"
    assert mine["action"] == "POST /v1/devices/{device_id}/quarantine"
    assert mine["detail"]["status"] == 404 and missing in mine["detail"]["reason"]
    assert refused[f"/v1/devices/{missing}"]["detail"]["status"] == 422  # the PATCH, not the GET
    assert refused["/v1/tokens"]["actor"] == "anonymous"
    assert refused["/v1/tokens"]["detail"]["status"] == 401
    assert refused["/v1/enroll"]["detail"]["status"] == 422
    assert all(e["action"].split()[0] != "GET" for e in refused.values())


def test_device_list_paginates_and_filters(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """Pages follow next_cursor to the end without repeats; tag and status filters apply."""
    ids = {cp.enroll(tmp_path / str(i), group, tags=[f"n{i % 2}"]).device_id for i in range(5)}
    seen: list[str] = []
    cursor = None
    with cp.api(cp.admin_token) as api:
        while True:
            params = {"group": group, "limit": 2, **({"cursor": cursor} if cursor else {})}
            page = api.get("/v1/devices", params=params).json()
            seen += [d["id"] for d in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        tagged = api.get("/v1/devices", params={"group": group, "tag": "n1"}).json()["items"]
        quarantined = api.get("/v1/devices", params={"group": group, "status": "quarantined"})
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    assert len(tagged) == 2 and all("n1" in d["tags"] for d in tagged)
    assert quarantined.json()["items"] == []


def test_the_database_refuses_to_rewrite_the_audit_log(
    cp: ControlPlaneProcess, database_url: str
) -> None:
    """UPDATE and DELETE on audit_log fail in the database itself, whoever connects."""
    import pytest
    from sqlalchemy.exc import DBAPIError

    assert _audit(cp)  # there are entries to protect
    for statement in ("UPDATE audit_log SET outcome = 'ok'", "DELETE FROM audit_log"):
        with pytest.raises(DBAPIError, match="the audit log is append-only"):
            run_sql(database_url, [statement])
    assert _audit(cp)
