"""Per-client limits on the real server: one client over its limits gets 429 with Retry-After,
another address still launches, the API key is exempt, and the counts survive a restart."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import httpx
from harness import DeployServer, Proxy


def _client(source: str) -> httpx.Client:
    """A client whose requests come from ``source`` (a loopback address of this host)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10)


def _launch(client: httpx.Client, deploy: DeployServer, **headers: str) -> httpx.Response:
    return client.post(f"{deploy.url}/applications/example", headers=headers)


def _metric(deploy: DeployServer, name: str) -> float:
    for line in httpx.get(f"{deploy.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


def test_one_client_at_its_deployments_limit_gets_429_while_others_launch(
    deploy_factory: Callable[..., DeployServer],
) -> None:
    deploy = deploy_factory(per_client_max_deployments=2).start()
    with _client("127.0.0.5") as one, _client("127.0.0.2") as two:
        first = [_launch(one, deploy) for _ in range(2)]
        assert [r.status_code for r in first] == [200, 200]
        refused = _launch(one, deploy, **{"X-Forwarded-For": "203.0.113.9"})  # not believed
        assert refused.status_code == 429
        assert refused.json()["type"] == "rateLimited"
        assert "per_client_max_deployments" in refused.json()["error"]
        assert int(refused.headers["Retry-After"]) > 0
        assert _launch(two, deploy).status_code == 200  # another address is not affected
        keyed = _launch(one, deploy, Authorization=deploy.api_key)
        assert keyed.status_code == 200  # requests with the key are exempt
        assert _metric(deploy, "binder_client_deployments_max") == 2
        assert _metric(deploy, "binder_clients_with_deployments") == 2
        limited = 'binder_rate_limited_total{limit="per_client_max_deployments"}'
        assert _metric(deploy, limited) == 1

        # a deployment that ends gives its slot back
        gone = first[0].json()["id"]
        deleted = one.delete(f"{deploy.url}/applications/example/{gone}", headers=deploy.auth)
        assert deleted.json()["status"] == "deleted"
        again = _launch(one, deploy)
        assert again.status_code == 200, again.text

        # the count survives a restart: it is seeded from the records
        deploy.stop()
        deploy.start()
        after = _launch(one, deploy)
        assert after.status_code == 429, after.text
        assert "per_client_max_deployments" in after.json()["error"]


def test_launches_per_minute_are_limited_per_client(
    deploy_factory: Callable[..., DeployServer],
) -> None:
    deploy = deploy_factory(per_client_launches_per_minute=3).start()
    with _client("127.0.0.3") as one, _client("127.0.0.2") as two:
        for _ in range(3):
            launched = _launch(one, deploy)
            assert launched.status_code == 200, launched.text
            dep_id = launched.json()["id"]
            one.delete(f"{deploy.url}/applications/example/{dep_id}", headers=deploy.auth)
        refused = _launch(one, deploy)
        assert refused.status_code == 429
        assert refused.json()["type"] == "rateLimited"
        assert "per_client_launches_per_minute" in refused.json()["error"]
        assert 0 < int(refused.headers["Retry-After"]) <= 60
        assert _launch(two, deploy).status_code == 200
        assert _launch(one, deploy, Authorization=deploy.api_key).status_code == 200


def test_concurrent_launches_of_one_client_never_exceed_its_limit(
    deploy_factory: Callable[..., DeployServer],
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    deploy = deploy_factory(per_client_max_deployments=3).start()
    with _client("127.0.0.4") as one, ThreadPoolExecutor(max_workers=12) as pool:
        codes = sorted(pool.map(lambda _: _launch(one, deploy).status_code, range(12)))
    assert codes == [200] * 3 + [429] * 9


def test_users_through_the_suites_proxy_are_counted_each_by_their_own_address(
    deploy_factory: Callable[..., DeployServer], proxy: Proxy
) -> None:
    """The proxy fronts the deploy server for every public user: each is its own client there
    (the proxy's X-Forwarded-For is believed), and what a user writes into that header does
    not make it another."""
    deploy = deploy_factory(per_client_max_deployments=1, front=True).start()
    launch = f"http://127.0.0.1:{proxy.port}/applications/example"
    with _client("127.0.0.2") as one, _client("127.0.0.3") as two:
        assert one.post(launch).status_code == 200
        refused = one.post(launch, headers={"X-Forwarded-For": "203.0.113.9"})
        assert refused.status_code == 429, refused.text
        assert "per_client_max_deployments" in refused.json()["error"]
        assert two.post(launch).status_code == 200  # not the proxy's one address for all
    assert _metric(deploy, "binder_clients_with_deployments") == 2


def test_another_user_on_loopback_is_not_taken_for_the_suites_proxy(
    deploy_factory: Callable[..., DeployServer],
) -> None:
    """A program of another user of the host, from 127.0.0.1 as the proxy connects, with an
    X-Forwarded-For of its choosing: it is counted by its own address, the header ignored."""
    deploy = deploy_factory(per_client_max_deployments=1).start()
    program = (  # the standard library only: the system's interpreter, which any user can run
        "import http.client, sys, urllib.parse\n"
        "url = urllib.parse.urlsplit(sys.argv[1])\n"
        "for n in range(2):\n"
        "    c = http.client.HTTPConnection(url.hostname, url.port, timeout=30)\n"
        "    c.request('POST', url.path, headers={'X-Forwarded-For': f'203.0.113.{n}'})\n"
        "    print(c.getresponse().status)\n"
    )
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",  # not the suite's, whose folder may be closed to others
            "-c",
            program,
            f"{deploy.url}/applications/example",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split() == ["200", "429"], done.stdout + done.stderr
