"""A launch's own secret, its deep link, its output and the page of its end, through the API and
the pages (Starlette's TestClient on the fakes)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger
from served import Parts, ended_launch, fake_parts, served
from starlette.testclient import TestClient

KEY = "k" * 32
PUBLIC = "https://binder.example.org"
NOTEBOOK = {
    "command": ["lab", "--port={port}", "--base-url={base_url}"],
    "env": {"APP_SECRET": "{token}"},
    "ready-path": "api",
    "activity-path": "api/status",
}


@pytest.fixture
def parts() -> Parts:
    return fake_parts()


@pytest.fixture
def client(tmp_path: Path, parts: Parts) -> Iterator[TestClient]:
    environ = {
        "BINDER_API_KEY": KEY,
        "BINDER_PROXY_PUBLIC_HOST": "binder.example.org",
        "BINDER_PROXY_PUBLIC_URL": PUBLIC,
    }
    with served(parts, home=tmp_path, environ=environ) as c:
        put = c.put("/templates/nb", json=NOTEBOOK, headers={"Authorization": KEY})
        assert put.status_code == 200, put.text
        yield c


def _final(client: TestClient, dep_id: str, template: str = "nb") -> dict[str, object]:
    return ended_launch(client, dep_id, template)


def test_the_token_is_in_the_url_for_the_launching_client_only(
    client: TestClient, parts: Parts
) -> None:
    store, _, _ = parts
    logged: list[str] = []
    sink = logger.add(logged.append, level="DEBUG")
    try:
        dep_id = client.post("/applications/nb", json={"urlpath": "lab/tree/a b.ipynb"}).json()[
            "id"
        ]
        info = _final(client, dep_id)
    finally:
        logger.remove(sink)
    token = store.deps[dep_id].token
    assert token
    assert len(token) >= 32
    assert info["url"] == f"{PUBLIC}/user/{dep_id}/lab/tree/a%20b.ipynb?token={token}"
    assert info["location"] == f"binder.example.org/user/{dep_id}"
    with client.stream("GET", f"/applications/nb/{dep_id}/events") as events:
        kind, first = next(_blocks(events.iter_lines()))
    assert kind == "status"
    assert first["url"] == info["url"]  # type: ignore[index]
    # key holders' lists and the console show where it is, never the secret to get in
    listed = client.get("/applications/nb", headers={"Authorization": KEY}).json()
    assert listed[0]["url"] == f"{PUBLIC}/user/{dep_id}/lab/tree/a%20b.ipynb"
    deleted = client.delete(f"/applications/nb/{dep_id}", headers={"Authorization": KEY})
    assert token not in deleted.text
    assert not [line for line in logged if token in line]
    # a template without {token} gets none
    plain = client.post("/applications/example").json()["id"]
    assert "token" not in str(_final(client, plain, "example")["url"])
    assert store.deps[plain].token is None


def test_each_launch_has_its_own_token_and_the_backend_gets_it(
    client: TestClient, parts: Parts
) -> None:
    store, backend, _ = parts
    one, two = (client.post("/applications/nb").json()["id"] for _ in range(2))
    _final(client, one)
    _final(client, two)
    assert store.deps[one].token != store.deps[two].token
    assert backend.specs[one].token == store.deps[one].token
    assert backend.specs[one].ready_path == f"/user/{one}/api"


@pytest.mark.parametrize(
    "urlpath",
    [
        "/etc/passwd",
        "https://evil.example/",
        "javascript:alert(1)",
        "lab/../../x",
        "lab/%2e%2e/x",
        "lab\\tree",
        "lab/tree/a\nb",
        "lab/\x7f",
        7,
        "x" * 1025,
    ],
)
def test_a_bad_urlpath_is_refused_naming_the_field(client: TestClient, urlpath: object) -> None:
    for url, body in (
        ("/applications/nb", {"urlpath": urlpath}),
        ("/applications/", {"template-name": "nb", "urlpath": urlpath}),
    ):
        response = client.post(url, json=body)
        assert response.status_code == 422, response.text
        assert response.json()["type"] == "malformedRequest"
        assert response.json()["error"].startswith("urlpath:")
    if isinstance(urlpath, str):
        page = client.get("/launch/nb", params={"urlpath": urlpath})
        assert page.status_code == 422
        assert "urlpath:" in page.text


def test_a_failure_reason_ends_with_the_apps_last_lines_without_its_token(
    client: TestClient, parts: Parts
) -> None:
    store, backend, _ = parts
    backend.fail_with = "process exited with code 126"
    backend.output_of = lambda spec: [
        "starting",
        f"token {spec.token}",
        "/bin/app: Permission denied",
    ]
    dep_id = client.post("/applications/nb").json()["id"]
    info = _final(client, dep_id)
    token = store.deps[dep_id].token
    assert token
    assert info["status"] == "failed"
    assert info["reason"] == (
        "process exited with code 126; last output lines: starting | token [token] | "
        "/bin/app: Permission denied"
    )


def test_the_events_stream_carries_the_apps_output_while_it_starts(
    client: TestClient, parts: Parts
) -> None:
    _, backend, _ = parts
    backend.fail_with = "timed out waiting for the app to answer"
    backend.output_of = lambda spec: ["starting", "/bin/app: Permission denied"]
    backend.hold = threading.Event()
    dep_id = client.post("/applications/nb").json()["id"]
    with client.stream("GET", f"/applications/nb/{dep_id}/events?output=1") as events:
        seen: list[tuple[str, object]] = []
        for block in _blocks(events.iter_lines()):
            seen.append(block)
            if block[0] == "output":
                backend.hold.set()
            if block[0] == "status" and block[1]["status"] == "failed":  # type: ignore[index]
                break
    kinds = [kind for kind, _ in seen]
    assert kinds[0] == "status"
    assert ("output", {"lines": ["starting", "/bin/app: Permission denied"]}) in seen
    assert kinds[-1] == "status"
    plain = client.get(f"/applications/nb/{dep_id}/events").text
    assert "event: output" not in plain


def _blocks(lines: Iterator[str]) -> Iterator[tuple[str, object]]:
    kind = ""
    for line in lines:
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield kind, json.loads(line.removeprefix("data: "))


def test_badges_and_links_use_the_public_url_never_the_host_header(client: TestClient) -> None:
    page = client.get("/", headers={"Host": "evil.example"}).text
    assert f"{PUBLIC}/launch/nb" in page
    assert f"{PUBLIC}/badge/nb.svg" in page
    assert "evil.example" not in page


def test_the_ended_page_says_what_ended_a_session_and_offers_it_again(
    client: TestClient, parts: Parts
) -> None:
    dep_id = client.post("/applications/nb", json={"urlpath": "lab/tree/a.ipynb"}).json()["id"]
    _final(client, dep_id)
    client.delete(f"/applications/nb/{dep_id}", headers={"Authorization": KEY})
    for path in (
        f"/ended/{dep_id}",
        f"/user/{dep_id}/lab/tree/a.ipynb",  # the proxy's default target, no route left
        f"/ended/404?url=/user/{dep_id}/api/kernels",  # its error target
    ):
        page = client.get(path, headers={"Host": "evil.example"})
        assert page.status_code == 404
        assert "This session has ended" in page.text
        assert "It was deleted at " in page.text
        assert f'href="{PUBLIC}/launch/nb?urlpath=lab%2Ftree%2Fa.ipynb"' in page.text
        assert "evil.example" not in page.text
    answer = client.get(f"/ended/{dep_id}", headers={"Accept": "application/json"})
    assert answer.status_code == 404
    body = answer.json()
    assert body["type"] == "ended"
    assert body["ended-because"] == "deleted"
    assert body["status"] == "deleted"
    assert body["launch"] == f"{PUBLIC}/launch/nb?urlpath=lab%2Ftree%2Fa.ipynb"
    unknown = client.get("/ended/" + "0" * 32)
    assert unknown.status_code == 404
    assert "No such session" in unknown.text
    assert client.get("/ended/nonsense").status_code == 404
    assert client.get("/user/..%2f..%2fetc").status_code == 404


def test_the_ended_page_of_a_failed_session_says_why_escaped(
    client: TestClient, parts: Parts
) -> None:
    _, backend, _ = parts
    backend.fail_with = "process exited with code 3: <script>alert(1)</script>"
    dep_id = client.post("/applications/nb").json()["id"]
    _final(client, dep_id)
    page = client.get(f"/ended/{dep_id}").text
    assert "It failed at " in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert" not in page
