"""The deploy API through Starlette's TestClient, on fakes of the store, backend and proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fakes import FakeBackend, FakeProxy, FakeStore
from harness import wait_for
from served import Parts, ended_launch, fake_parts, served
from starlette.testclient import TestClient

from common.errors import BadDatabaseError
from services.deploy_kubernetes.backends.base import Observed, State
from services.deploy_kubernetes.store.base import Event

KEY = "k" * 32


@pytest.fixture
def parts() -> Parts:
    return fake_parts()


@pytest.fixture
def client(tmp_path: Path, parts: Parts) -> Iterator[TestClient]:
    environ = {
        "BINDER_API_KEY": KEY,
        "BINDER_PROXY_PUBLIC_HOST": "hub.example:8000",
        "BINDER_DEPLOY_MAX_DEPLOYMENTS": "3",
    }
    with served(parts, home=tmp_path, environ=environ) as c:
        yield c


def _deployed(client: TestClient, dep_id: str) -> dict[str, object]:
    return ended_launch(client, dep_id)


def test_launch_answers_id_then_location_without_scheme(client: TestClient, parts: Parts) -> None:
    response = client.post("/applications/example")
    assert response.status_code == 200
    dep_id = response.json()["id"]
    info = _deployed(client, dep_id)
    assert info["status"] == "deployed"
    assert info["location"] == f"hub.example:8000/user/{dep_id}"
    assert info["url"] == f"http://hub.example:8000/user/{dep_id}/"
    _, backend, proxy = parts
    assert ("launch", dep_id) in backend.calls
    assert proxy.table[f"/user/{dep_id}"].target == f"http://fake/{dep_id}"


def test_failed_launch_has_reason_and_is_cleaned_up(client: TestClient, parts: Parts) -> None:
    _, backend, proxy = parts
    backend.fail_with = "image pull failed: no such image"
    dep_id = client.post("/applications/", json={"template-name": "example"}).json()["id"]
    info = _deployed(client, dep_id)
    assert info == {**info, "status": "failed", "reason": "image pull failed: no such image"}
    assert ("stop", dep_id) in backend.calls
    assert f"/user/{dep_id}" not in proxy.table


def test_an_app_that_exits_before_its_record_lands_fails_with_its_own_reason(
    client: TestClient, parts: Parts
) -> None:
    # the backend tells of the exit while the launch's insert is still on its way: the app is
    # the launch's, not one without a record, and its exit code must reach the reason
    store, backend, _ = parts
    store.insert_delay = 0.2
    backend.exit_with = "process exited with code 3"
    dep_id = client.post("/applications/example").json()["id"]
    info = _deployed(client, dep_id)
    assert info == {**info, "status": "failed", "reason": "process exited with code 3"}
    assert backend.calls.count(("stop", dep_id)) == 1  # once, after the failure was written


def test_delete_writes_status_before_stopping(client: TestClient, parts: Parts) -> None:
    store, backend, _ = parts
    dep_id = client.post("/applications/example").json()["id"]
    _deployed(client, dep_id)
    response = client.delete(f"/applications/example/{dep_id}", headers={"Authorization": KEY})
    assert response.json()["status"] == "deleted"
    assert store.deps[dep_id].status.value == "deleted"
    assert store.deps[dep_id].ended_at is not None
    assert dep_id not in backend.running


def test_an_ended_deployment_answers_without_its_dead_location_and_url(
    client: TestClient, parts: Parts
) -> None:
    _, backend, _ = parts
    gone, dying = (client.post("/applications/example").json()["id"] for _ in range(2))
    for dep_id in (gone, dying):
        assert {"location", "url"} <= set(_deployed(client, dep_id))
    deleted = client.delete(f"/applications/example/{gone}", headers={"Authorization": KEY})
    assert deleted.json()["status"] == "deleted"
    assert backend.notify is not None
    died = Observed(id=dying, state=State.EXITED, reason="process exited with code 1")
    client.portal.call(backend.notify, died)  # type: ignore[union-attr]
    listed = client.get("/applications/example", headers={"Authorization": KEY}).json()
    for answer in (deleted.json(), *listed, client.get(f"/applications/example/{gone}").json()):
        assert answer["status"] in ("deleted", "failed")
        assert "location" not in answer
        assert "url" not in answer


def test_capacity_counts_active_deployments(client: TestClient) -> None:
    for _ in range(3):
        assert client.post("/applications/example").status_code == 200
    response = client.post("/applications/example")
    assert response.status_code == 429
    assert response.json()["type"] == "capacity"
    assert response.headers["retry-after"] == "30"


def test_database_outage_is_503_bad_database(client: TestClient, parts: Parts) -> None:
    store, _, _ = parts
    store.down = True
    response = client.post("/applications/example")
    assert response.status_code == 503
    assert response.json()["type"] == "badDatabase"
    wait_for(lambda: client.get("/health").status_code == 503, timeout=5, what="health to drop")
    store.down = False
    wait_for(lambda: client.get("/health").status_code == 200, timeout=5, what="health to recover")


def test_list_filters_by_status_and_rejects_unknown_status(client: TestClient) -> None:
    ids = [client.post("/applications/example").json()["id"] for _ in range(2)]
    for dep_id in ids:
        _deployed(client, dep_id)
    client.delete(f"/applications/example/{ids[0]}", headers={"Authorization": KEY})
    auth = {"Authorization": f"Bearer {KEY}"}
    deployed = client.get("/applications/example?status=deployed", headers=auth).json()
    assert [d["id"] for d in deployed] == [ids[1]]
    bad = client.get("/applications/?status=running", headers=auth)
    assert bad.status_code == 422
    assert "status" in bad.json()["error"]


def test_templates_round_trip_and_seeded_example(client: TestClient) -> None:
    names = [t["name"] for t in client.get("/templates").json()]
    assert "example" in names
    body = {
        "command": ["run", "{port}"],
        "limits": {"memory": "512Mi", "cpu": "500m"},
        "pool-size": 0,
    }
    put = client.put("/templates/mine", json=body, headers={"Authorization": KEY})
    assert put.status_code == 200
    limits = {"memory": "512Mi", "cpu": "500m", "pids": 1024}  # pids: its default
    assert client.get("/templates/mine").json()["limits"] == limits
    body["limits"] = {"pids": 64}
    assert client.put("/templates/mine", json=body, headers={"Authorization": KEY}).is_success
    assert client.get("/templates/mine").json()["limits"] == {"pids": 64}
    body["limits"] = {"pids": 0}
    assert (
        client.put("/templates/mine", json=body, headers={"Authorization": KEY}).status_code == 422
    )
    assert client.delete("/templates/mine", headers={"Authorization": KEY}).status_code == 200
    assert client.get("/templates/mine").status_code == 404


def test_unknown_route_and_method_are_typed_errors(client: TestClient) -> None:
    missing = client.get("/nowhere")
    assert missing.status_code == 404
    assert missing.json()["type"] == "notFound"
    wrong = client.patch("/templates")
    assert wrong.status_code == 405
    assert wrong.json()["type"] == "methodNotAllowed"


def test_metrics_count_launches(client: TestClient) -> None:
    dep_id = client.post("/applications/example").json()["id"]
    _deployed(client, dep_id)
    text = client.get("/metrics").text
    assert 'binder_launches_total{template="example"} 1.0' in text
    assert "binder_launch_latency_seconds_bucket" in text


def test_metrics_count_accepted_launches_only(client: TestClient, parts: Parts) -> None:
    store, _, _ = parts
    store.down = True
    assert client.post("/applications/example").status_code == 503  # its record not written
    store.down = False
    assert client.post("/applications/nothing").status_code == 404
    assert all(client.post("/applications/example").status_code == 200 for _ in range(3))
    assert client.post("/applications/example").status_code == 429  # capacity
    text = client.get("/metrics").text
    assert 'binder_launches_total{template="example"} 3.0' in text
    assert 'template="nothing"' not in text
    assert "Launches accepted" in text


def test_backend_or_proxy_outage_refuses_launches_with_503(
    client: TestClient, parts: Parts
) -> None:
    _, backend, proxy = parts
    backend.down = True
    wait_for(lambda: client.get("/health").status_code == 503, timeout=5, what="health to drop")
    response = client.post("/applications/example")
    assert (response.status_code, response.json()["type"]) == (503, "badBackend")
    backend.down = False
    wait_for(lambda: client.get("/health").status_code == 200, timeout=5, what="recovery")
    proxy.down = True
    wait_for(
        lambda: client.post("/applications/example").status_code == 503,
        timeout=5,
        what="launches refused while the proxy is down",
    )
    assert client.post("/applications/example").json()["type"] == "badProxy"
    proxy.down = False
    wait_for(lambda: client.get("/health").status_code == 200, timeout=5, what="recovery")
    assert client.post("/applications/example").status_code == 200


def test_sink_counts_dropped_records_for_metrics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from services.logging.sink import AggregatorSink

    sink = AggregatorSink("http://127.0.0.1:9", token="t", capacity=3)  # nothing listens there
    try:
        for n in range(5):
            sink.push({"service": "s", "message": f"m{n}"})
        registry = CollectorRegistry()
        registry.register(sink.collector())
        # nothing was delivered: what is not pending was dropped, and counted
        assert sink.dropped >= 1
        assert sink.dropped + sink.pending() == 5
        assert (
            f"binder_log_records_dropped_total {sink.dropped}.0"
            in generate_latest(registry).decode()
        )
    finally:
        sink.close(timeout=0.1)


def test_unknown_template_is_named_for_the_original_binder_client_where_it_knows_a_name(
    client: TestClient,
) -> None:
    body = {"template-name": "nope"}
    ours = client.post("/applications/", json=body, headers={"Accept": "application/json"})
    assert ours.status_code == 404
    assert ours.json() == {"type": "noTemplate", "error": "no template named nope"}
    # as node's `request` library sends it: Accept: application/json, no User-Agent
    user_agent = client.headers.pop("user-agent")
    try:
        original = {"Accept": "application/json"}
        theirs = client.post("/applications/", json=body, headers=original)
        assert theirs.status_code == 404
        assert theirs.json() == {"type": "registryError", "error": "no template named nope"}
        auth = {**original, "Authorization": KEY}
        assert client.post("/preload/nope", headers=auth).json()["type"] == "registryError"
        # statusAll: the client knows no name for it, so it gets the contract's
        assert client.get("/applications/nope", headers=auth).json()["type"] == "noTemplate"
    finally:
        client.headers["user-agent"] = user_agent


def test_the_list_pages_ended_deployments_with_a_link_to_the_older_ones(
    client: TestClient,
) -> None:
    key = {"Authorization": KEY}
    ids = []
    for n in range(5):  # one at a time: the server's capacity here is 3
        ids.append(client.post("/applications/example").json()["id"])
        _deployed(client, ids[-1])
        if n < 4:
            assert client.delete(f"/applications/example/{ids[-1]}", headers=key).status_code == 200
    first = client.get("/applications/example?limit=3", headers=key)
    assert first.status_code == 200
    rows = first.json()
    assert [r["id"] for r in rows if r["status"] == "deployed"] == [ids[4]], "active ones first"
    assert {r["id"] for r in rows} == {ids[4], ids[3], ids[2]}, "then the newest ended ones"
    link = first.headers["link"]
    assert link.endswith('>; rel="next"')
    older = client.get(link[1 : link.index(">")], headers=key)
    assert {r["id"] for r in older.json()} == {ids[1], ids[0]}
    assert "link" not in older.headers, "the last page names no next"
    assert client.get("/applications/example?limit=0", headers=key).status_code == 422
    assert client.get("/applications/example?cursor=x", headers=key).status_code == 422


class _OpensLate(FakeStore):
    """A database that answers pings but fails the first opening of the records."""

    def __init__(self) -> None:
        super().__init__()
        self.opens = 0
        self.followers = 0

    async def open(self) -> None:
        self.opens += 1
        if self.opens == 1:
            raise BadDatabaseError("database unreachable: not yet")
        await super().open()

    async def events(self) -> AsyncIterator[Event]:
        self.followers += 1
        async for event in super().events():
            yield event


def test_a_start_retried_after_the_database_failed_follows_the_changes_once(
    tmp_path: Path,
) -> None:
    """Each follower applies every change: two would apply each twice."""
    store = _OpensLate()
    parts = (store, FakeBackend(), FakeProxy())
    environ = {"BINDER_API_KEY": KEY}
    with served(parts, home=tmp_path, environ=environ, ready_within=10):
        assert store.opens == 2
        assert store.followers == 1
