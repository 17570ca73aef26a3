"""The pages, badges and console calls through Starlette's TestClient, on fakes."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from fakes import FakeBackend, FakeProxy, FakeStore, FakeWindows
from harness import wait_for
from starlette.testclient import TestClient

from common.settings import load_settings
from services.deploy_kubernetes.app import create_app
from services.deploy_kubernetes.models import Deployment, Status, new_id, now
from services.deploy_kubernetes.web.badge import render_badge
from services.deploy_kubernetes.web.console_auth import SIGN_IN_FAILURES, Sessions

KEY = "k" * 32
HEADER = {"X-Binder-Console": "1"}


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def client(tmp_path: Path, store: FakeStore) -> Iterator[TestClient]:
    settings = load_settings(home=tmp_path, environ={"BINDER_API_KEY": KEY})
    app = create_app(
        settings, backend=FakeBackend(), store=store, windows=FakeWindows(), proxy=FakeProxy()
    )
    with TestClient(app) as c:
        wait_for(lambda: c.get("/health").status_code == 200, timeout=5, what="ready")
        yield c


def _sign_in(client: TestClient) -> None:
    response = client.post("/console/session", json={"key": KEY}, headers=HEADER)
    assert response.status_code == 200


def test_badge_is_svg_naming_its_text() -> None:
    root = ET.fromstring(render_badge(label="launch", message="a<b&c"))
    assert root.get("aria-label") == "launch: a<b&c"
    assert [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")][-1] == "a<b&c"


class _Kept:
    """Sessions kept as the deployer keeps them: in the (fake) store."""

    def __init__(self) -> None:
        self.store = FakeStore()

    async def open_session(self, digest: str, seconds: float) -> None:
        await self.store.put_session(digest, now() + timedelta(seconds=seconds))

    async def session_valid(self, digest: str) -> bool:
        return await self.store.session_valid(digest)

    async def end_session(self, digest: str) -> None:
        await self.store.end_session(digest)


def test_sessions_expire_and_end() -> None:
    async def main() -> None:
        kept = _Kept()
        sessions = Sessions(kept, lifetime=60)
        token = await sessions.create()
        assert await sessions.valid(token)
        assert not await sessions.valid(token + "x")
        assert token not in str(kept.store.sessions), "only a hash of the token is kept"
        await sessions.end(token)
        assert not await sessions.valid(token)
        brief = Sessions(kept, lifetime=-1)
        assert not await brief.valid(await brief.create())

    anyio.run(main)


def test_pages_are_html_with_a_strict_policy(client: TestClient) -> None:
    front = client.get("/")
    assert front.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in front.headers["content-security-policy"]
    assert 'href="/launch/example"' in front.text
    assert client.get("/launch/example").status_code == 200
    missing = client.get("/launch/nothing")
    assert missing.status_code == 404
    assert "no template named nothing" in missing.text
    assert client.get("/static/launch.js").status_code == 200


def test_console_without_a_session_shows_and_answers_nothing(client: TestClient) -> None:
    page = client.get("/console")
    assert 'id="login"' in page.text
    assert 'id="dep-table"' not in page.text
    assert client.get("/console/api/deployments").status_code == 403
    assert client.get("/console/api/overview").status_code == 403
    refused = client.post("/console/session", json={"key": "wrong"}, headers=HEADER)
    assert refused.status_code == 403
    assert "set-cookie" not in refused.headers
    # without the header, not even the right key signs in (no cross-site form can send it)
    assert client.post("/console/session", json={"key": KEY}).status_code == 403


def test_sign_in_sets_a_strict_http_only_cookie_and_changes_need_the_header(
    client: TestClient,
) -> None:
    response = client.post("/console/session", json={"key": KEY}, headers=HEADER)
    cookie = response.headers["set-cookie"]
    for part in ("HttpOnly", "SameSite=strict", "Path=/console"):
        assert part.lower() in cookie.lower()
    assert KEY not in cookie
    assert 'id="dep-table"' in client.get("/console").text
    dep_id = client.post("/applications/example").json()["id"]
    assert client.delete(f"/console/api/deployments/example/{dep_id}").status_code == 403
    deleted = client.delete(f"/console/api/deployments/example/{dep_id}", headers=HEADER)
    assert deleted.json()["status"] == "deleted"
    resized = client.put("/console/api/pools/example", json={"size": 2}, headers=HEADER)
    assert resized.json()["size"] == 2
    assert (
        client.put("/console/api/pools/example", json={"size": -1}, headers=HEADER).status_code
        == 422
    )
    assert client.delete("/console/session", headers=HEADER).status_code == 200
    assert client.get("/console/api/overview").status_code == 403


def test_deployments_page_filters_sorts_and_pages_thousands(
    client: TestClient, store: FakeStore
) -> None:
    start = datetime.now(UTC) - timedelta(days=1)
    for i in range(3000):
        dep = Deployment(
            id=new_id(),
            template="example",
            status=Status.FAILED if i % 3 == 0 else Status.DELETED,
            created=start + timedelta(seconds=i),
            cull_timeout_ms=60_000,
            reason=f"reason {i}",
        )
        anyio.run(store.insert, dep)
    _sign_in(client)
    page = client.get("/console/api/deployments", params={"limit": "50"}).json()
    assert page["total"] == 3000
    assert page["counts"] == {"deploying": 0, "deployed": 0, "failed": 1000, "deleted": 2000}
    assert [r["reason"] for r in page["rows"][:2]] == ["reason 2999", "reason 2998"]
    failed = client.get(
        "/console/api/deployments",
        params={"status": "failed", "order": "asc", "offset": "1", "limit": "2"},
    ).json()
    assert failed["total"] == 1000
    assert [r["reason"] for r in failed["rows"]] == ["reason 3", "reason 6"]
    found = client.get("/console/api/deployments", params={"q": "reason 2999"}).json()
    assert [r["reason"] for r in found["rows"]] == ["reason 2999"]
    bad = client.get("/console/api/deployments", params={"sort": "nope"})
    assert bad.status_code == 422


def test_openapi_describes_the_pages_and_console_calls(client: TestClient) -> None:
    paths = set(client.get("/openapi.json").json()["paths"])
    assert {
        "/",
        "/launch/{template}",
        "/badge.svg",
        "/badge/{template}.svg",
        "/console",
        "/console/session",
        "/console/api/deployments",
        "/console/api/logs/stream",
    } <= paths


def test_repeated_wrong_keys_throttle_that_clients_sign_ins_only(
    tmp_path: Path, store: FakeStore
) -> None:
    settings = load_settings(
        home=tmp_path,
        environ={"BINDER_API_KEY": KEY, "BINDER_DEPLOY_TRUSTED_PROXIES": "10.0.0.1"},
    )
    app = create_app(settings, backend=FakeBackend(), store=store, proxy=FakeProxy())
    guesser = {**HEADER, "X-Forwarded-For": "192.0.2.7"}
    with TestClient(app, client=("10.0.0.1", 4000)) as client:
        wait_for(lambda: client.get("/health").status_code == 200, timeout=5, what="ready")
        for n in range(SIGN_IN_FAILURES):
            wrong = client.post("/console/session", json={"key": f"guess{n}"}, headers=guesser)
            assert wrong.status_code == 403
        refused = client.post("/console/session", json={"key": KEY}, headers=guesser)
        assert refused.status_code == 429
        assert refused.json()["type"] == "rateLimited"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert "set-cookie" not in refused.headers
        other = {**HEADER, "X-Forwarded-For": "198.51.100.9"}
        assert client.post("/console/session", json={"key": KEY}, headers=other).status_code == 200
