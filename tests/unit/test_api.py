"""The deploy API through Starlette's TestClient, on fakes of the store, backend and proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import FakeBackend, FakeProxy, FakeStore
from harness import wait_for
from starlette.testclient import TestClient

from common.settings import load_settings
from services.deploy_kubernetes.app import create_app

KEY = "k" * 32


@pytest.fixture
def parts() -> tuple[FakeStore, FakeBackend, FakeProxy]:
    return FakeStore(), FakeBackend(), FakeProxy()


@pytest.fixture
def client(tmp_path: Path, parts: tuple[FakeStore, FakeBackend, FakeProxy]) -> Iterator[TestClient]:
    store, backend, proxy = parts
    settings = load_settings(
        home=tmp_path,
        environ={
            "BINDER_API_KEY": KEY,
            "BINDER_PROXY_PUBLIC_HOST": "hub.example:8000",
            "BINDER_DEPLOY_MAX_DEPLOYMENTS": "3",
        },
    )
    app = create_app(settings, backend=backend, store=store, proxy=proxy, keeper_interval=0.05)
    with TestClient(app) as c:
        wait_for(lambda: c.get("/health").status_code == 200, timeout=5, what="ready")
        yield c


def _deployed(client: TestClient, dep_id: str) -> dict[str, object]:
    def check() -> dict[str, object] | None:
        data = client.get(f"/applications/example/{dep_id}").json()
        return data if data["status"] != "deploying" else None

    result: dict[str, object] = wait_for(check, timeout=5, what="the launch to end")
    return result


def test_launch_answers_id_then_location_without_scheme(client: TestClient, parts: tuple) -> None:
    response = client.post("/applications/example")
    assert response.status_code == 200
    dep_id = response.json()["id"]
    info = _deployed(client, dep_id)
    assert info["status"] == "deployed"
    assert info["location"] == f"hub.example:8000/user/{dep_id}"
    assert info["url"] == f"http://hub.example:8000/user/{dep_id}/"
    _, backend, proxy = parts
    assert ("launch", dep_id) in backend.calls
    assert proxy.table[f"/user/{dep_id}"][0] == f"http://fake/{dep_id}"


def test_failed_launch_has_reason_and_is_cleaned_up(client: TestClient, parts: tuple) -> None:
    _, backend, proxy = parts
    backend.fail_with = "image pull failed: no such image"
    dep_id = client.post("/applications/", json={"template-name": "example"}).json()["id"]
    info = _deployed(client, dep_id)
    assert info == {**info, "status": "failed", "reason": "image pull failed: no such image"}
    assert ("stop", dep_id) in backend.calls
    assert f"/user/{dep_id}" not in proxy.table


def test_delete_writes_status_before_stopping(client: TestClient, parts: tuple) -> None:
    store, backend, _ = parts
    dep_id = client.post("/applications/example").json()["id"]
    _deployed(client, dep_id)
    response = client.delete(f"/applications/example/{dep_id}", headers={"Authorization": KEY})
    assert response.json()["status"] == "deleted"
    assert store.deps[dep_id].status.value == "deleted"
    assert store.deps[dep_id].ended_at is not None
    assert dep_id not in backend.running


def test_capacity_counts_active_deployments(client: TestClient) -> None:
    for _ in range(3):
        assert client.post("/applications/example").status_code == 200
    response = client.post("/applications/example")
    assert response.status_code == 429
    assert response.json()["type"] == "capacity"
    assert response.headers["retry-after"] == "30"


def test_database_outage_is_503_bad_database(client: TestClient, parts: tuple) -> None:
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
    assert client.get("/templates/mine").json()["limits"] == {"memory": "512Mi", "cpu": "500m"}
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


def test_backend_or_proxy_outage_refuses_launches_with_503(
    client: TestClient, parts: tuple
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
