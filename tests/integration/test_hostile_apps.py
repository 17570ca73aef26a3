"""Strangers' code on the local backend, tried as an attacker would: a template of the tests' own
(``tests/hostile_app.py``) runs any shell command it is sent, through the proxy, and tries to make
the suite (root) act on its behalf, to reach other apps, the suite's services and the host, to
outlive its deletion and to take the host's PIDs and memory. Each sandbox check failed with apps
as one shared user on the host's network (before the sandbox)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import ROOT, Database, DeployServer, LoggingServer, Proxy, wait_for
from pyroute2 import IPRoute

from common.processes import session_leaders_with
from services.deploy_kubernetes.backends.local.network import NETNS_DIR
from services.deploy_kubernetes.backends.local.sandboxed import STOP_GRACE_SECONDS
from services.deploy_kubernetes.backends.local.state import suite_label
from services.deploy_kubernetes.backends.local.uids import uids_in_use

HOSTILE = str(ROOT / "tests" / "hostile_app.py")
HOSTILE_COMMAND = [
    "{python}",
    HOSTILE,
    "--port",
    "{port}",
    "--base-url",
    "{base_url}",
]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder anyone may enter (pytest's own temporary folders are root's alone, which the
    apps' users cannot reach)."""
    if os.geteuid() != 0:
        pytest.fail("the hostile-app tests need root (apps switch to users of their own)")
    path = Path(tempfile.mkdtemp(prefix="binder-hostile-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def victims() -> Iterator[tuple[Path, Path]]:
    """A root-only folder (with a file in it) and a root-only file, in the shared /tmp, that an
    app would like the suite to remove or overwrite."""
    folder = Path(tempfile.mkdtemp(prefix="binder-victim-"))
    (folder / "precious").write_text("root's data\n")
    handle, name = tempfile.mkstemp(prefix="binder-victim-")
    os.write(handle, b"root's file\n")
    os.close(handle)
    yield folder, Path(name)
    shutil.rmtree(folder, ignore_errors=True)
    Path(name).unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _no_planted_process_outlives_the_test() -> Iterator[None]:
    yield
    for pid in session_leaders_with("BINDER_TEMPLATE", "hostile"):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def hostile_server(workdir: Path, database: Database, proxy: Proxy, **deploy: Any) -> DeployServer:
    server = DeployServer(workdir, database, proxy, **deploy)
    server.config.write_text(
        server.config.read_text().replace(
            "[proxy]", f'database = "hostile{abs(hash(str(workdir))) % 10**9}"\n[proxy]', 1
        )
    )
    server.start()
    put = httpx.put(
        f"{server.url}/templates/hostile",
        json={"command": HOSTILE_COMMAND},
        headers=server.auth,
        timeout=10,
    )
    assert put.status_code == 200, put.text
    return server


def launch_hostile(server: DeployServer) -> str:
    dep_id = server.launch("hostile")
    info = server.wait_status(dep_id, "deployed", "failed", template="hostile")
    assert info["status"] == "deployed", info
    return dep_id


def run_in_app(
    proxy: Proxy, dep_id: str, script: str, *, timeout: float = 60, to_log: bool = False
) -> dict[str, Any]:
    """Run ``script`` inside the app, through the proxy, as its user would (``to_log``: its
    output goes to the app's own, not into the answer)."""
    answer = httpx.post(
        f"http://127.0.0.1:{proxy.port}/user/{dep_id}/run",
        content=script,
        headers={"X-Timeout": str(timeout), **({"X-Output": "app"} if to_log else {})},
        timeout=timeout + 10,
    )
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def _escape(path: Path) -> str:
    """A deployment "id" that climbs from any folder of the suite up to ``path``."""
    return "../" * 12 + str(path).lstrip("/")


def plant_forged_apps(proxy: Proxy, dep_id: str, victims: tuple[Path, Path]) -> None:
    """Detached processes with the suite's label and forged ids: one whose id leads the suite
    to the victim folder (removed as the app's folder), one whose id leads it to a link in the
    app's own folder that points at the victim file (written as a pid file)."""
    folder, file = victims
    script = f"""
    set -e
    ln -sf {file} "$HOME/forged.json"
    plant() {{
        setsid env -i BINDER_SUITE="$BINDER_SUITE" BINDER_ID="$1" PORT=1 BINDER_TEMPLATE=hostile \\
            sleep 600 </dev/null >/dev/null 2>&1 &
    }}
    plant '{_escape(folder)}'
    plant "{"../" * 12}${{HOME#/}}/forged"
    echo planted
    """
    result = run_in_app(proxy, dep_id, script)
    assert result["code"] == 0, result
    assert "planted" in result["out"], result


def assert_victims_intact(victims: tuple[Path, Path]) -> None:
    folder, file = victims
    assert (folder / "precious").read_text() == "root's data\n", "the suite removed root's folder"
    assert file.read_text() == "root's file\n", "the suite wrote through the app's link"


def test_forged_ids_of_planted_processes_never_reach_paths_at_restart(
    open_dir: Path, database: Database, proxy: Proxy, victims: tuple[Path, Path]
) -> None:
    server = hostile_server(open_dir, database, proxy)
    try:
        dep_id = launch_hostile(server)
        plant_forged_apps(proxy, dep_id, victims)
        server.stop()
        server.start()  # the restarted server looks for apps without pid files
        wait_for(
            lambda: server.status(dep_id, "hostile")["status"] == "deployed",
            what="the hostile app to be adopted again",
        )
        listed = httpx.get(f"{server.url}/applications/", headers=server.auth, timeout=10)
        assert {d["id"] for d in listed.json()} == {dep_id}, listed.json()
        assert_victims_intact(victims)
    finally:
        server.stop()
    _stop_apps(server)
    assert_victims_intact(victims)


def _stop_apps(server: DeployServer) -> None:
    """What `binder-control stop-all` runs once the deploy server is stopped."""
    assert server.proc is not None
    assert server.proc.env is not None
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.deploy_kubernetes",
            "--config",
            str(server.config),
            "--stop-apps",
        ],
        env=server.proc.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_forged_ids_of_planted_processes_never_reach_paths_at_stop_all(
    open_dir: Path, database: Database, proxy: Proxy, victims: tuple[Path, Path]
) -> None:
    server = hostile_server(open_dir, database, proxy)
    try:
        dep_id = launch_hostile(server)
        plant_forged_apps(proxy, dep_id, victims)
    finally:
        server.stop()
    _stop_apps(server)
    assert_victims_intact(victims)


@pytest.fixture
def server(open_dir: Path, database: Database, proxy: Proxy) -> Iterator[DeployServer]:
    deploy = hostile_server(open_dir, database, proxy)
    yield deploy
    deploy.stop()
    deploy.remove_apps()


def put_hostile(server: DeployServer, name: str, **template: Any) -> None:
    body = {"command": HOSTILE_COMMAND, **template}
    put = httpx.put(f"{server.url}/templates/{name}", json=body, headers=server.auth, timeout=10)
    assert put.status_code == 200, put.text


def launch(server: DeployServer, template: str = "hostile") -> str:
    if template == "hostile":
        return launch_hostile(server)
    dep_id = server.launch(template)
    info = server.wait_status(dep_id, "deployed", "failed", template=template)
    assert info["status"] == "deployed", info
    return dep_id


def test_an_app_can_neither_see_nor_read_nor_signal_another(
    server: DeployServer, proxy: Proxy
) -> None:
    victim, attacker = launch(server), launch(server)
    secret = f"victim-{secrets.token_hex(8)}"  # in no file of the checkout, which apps see
    planted = run_in_app(
        proxy,
        victim,
        f"""
        echo {secret} > "$HOME/secret"; echo {secret} > /tmp/secret
        echo {secret} > /dev/shm/secret; echo {secret} > /var/tmp/secret
        setsid sleep 3600.5 </dev/null >/dev/null 2>&1 &
        echo ok
        """,
    )
    assert planted["out"].strip() == "ok", planted
    host_pids = server.app_processes(victim)
    tried = run_in_app(
        proxy,
        attacker,
        f"""
        ps -eo pid,args | grep -c '[s]leep 3600.5'
        grep -rls {secret} /home /tmp /var/tmp /dev/shm /run /root 2>/dev/null | wc -l
        cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c BINDER_ID={victim}
        for pid in {" ".join(map(str, host_pids))}; do kill -9 $pid 2>/dev/null && echo killed; done
        touch /home/app/mine && echo wrote-own-home
        echo done
        """,
    )
    lines = tried["out"].split()
    assert lines == ["0", "0", "0", "wrote-own-home", "done"], tried
    assert proxy.get(f"/user/{victim}/").status_code == 200  # the victim runs on
    assert server.app_processes(victim) == host_pids


def test_a_fork_loop_stops_at_the_pids_limit_and_the_host_still_forks(
    server: DeployServer, proxy: Proxy
) -> None:
    put_hostile(server, "forky", limits={"pids": 64})
    dep_id = launch(server, "forky")
    result = run_in_app(
        proxy,
        dep_id,
        """
        python3 - <<'EOF'
import os, time
made = 0
try:
    for _ in range(5000):
        if os.fork() == 0:
            quiet = os.open("/dev/null", os.O_RDWR)
            os.dup2(quiet, 1)
            os.dup2(quiet, 2)
            time.sleep(600)
            os._exit(0)
        made += 1
except OSError as exc:
    print("stopped", made, exc.errno)
EOF
        """,
    )
    words = result["out"].split()
    assert words[0] == "stopped", result
    assert 30 < int(words[1]) < 64, result  # the app's own processes count too
    assert subprocess.run(["true"], check=False).returncode == 0  # the host still forks
    assert len(server.app_processes(dep_id)) <= 64 + 1  # its shim is the suite's


def test_four_children_over_the_memory_limit_end_the_app_failed(
    server: DeployServer, proxy: Proxy
) -> None:
    put_hostile(server, "greedy", limits={"memory": "192Mi"})
    dep_id = launch(server, "greedy")
    run_in_app(
        proxy,
        dep_id,
        """
        for i in 1 2 3 4; do
            setsid python3 -c 'b = bytearray(100 << 20); import time; time.sleep(600)' \\
                </dev/null >/dev/null 2>&1 &
        done
        echo started
        """,
    )
    info = server.wait_status(dep_id, "failed", timeout=60, template="greedy")
    assert info["reason"].startswith("out of memory (limit 192Mi)"), info
    wait_for(lambda: dep_id not in server.app_pids(), timeout=10, what="the whole app to end")


def _suite_leftovers(server: DeployServer, dep_id: str, uid: int) -> list[str]:
    found = []
    for controller in ("memory", "pids", "cpu", "freezer"):
        for path in Path(f"/sys/fs/cgroup/{controller}").glob(f"binder-*/{dep_id}"):
            found.append(str(path))
    if uid in uids_in_use(range(uid, uid + 1)):
        found.append(f"a process of uid {uid}")
    return found


def test_nothing_of_an_app_survives_its_delete(server: DeployServer, proxy: Proxy) -> None:
    dep_id = launch(server)
    uid = int(
        run_in_app(
            proxy,
            dep_id,
            """
            for d in /tmp /var/tmp /dev/shm "$HOME"; do echo left > "$d/survivor-$BINDER_ID"; done
            setsid env -i sh -c 'trap "" TERM HUP; while :; do sleep 1; done' </dev/null >/dev/null 2>&1 &
            setsid env -i sleep 3600 </dev/null >/dev/null 2>&1 &
            id -u
            """,
        )["out"].strip()
    )
    netns = {p.name for p in NETNS_DIR.iterdir()}
    assert _suite_leftovers(server, dep_id, uid)  # there, before the delete
    started = time.monotonic()
    deleted = httpx.delete(
        f"{server.url}/applications/hostile/{dep_id}", headers=server.auth, timeout=30
    )
    assert deleted.json()["status"] == "deleted"
    assert time.monotonic() - started < STOP_GRACE_SECONDS  # the app's end ends them all
    assert _suite_leftovers(server, dep_id, uid) == []
    # its namespace is gone (the slots made meanwhile for the next launches are new ones)
    assert len(netns - {p.name for p in NETNS_DIR.iterdir()}) == 1
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):  # they were the sandbox's own
        assert not Path(folder, f"survivor-{dep_id}").exists()


def test_an_app_reaches_no_service_of_the_suite_and_no_other_app(
    server: DeployServer, proxy: Proxy, database: Database, tmp_path: Path
) -> None:
    logging = LoggingServer(tmp_path, database).start()
    try:
        other, dep_id = launch(server), launch(server)
        routes = proxy.routes()
        own = httpx.URL(routes[f"/user/{dep_id}"]["target"])
        neighbour = httpx.URL(routes[f"/user/{other}"]["target"])
        # the app's one route: to the host's gateway address, no default route
        table = run_in_app(proxy, dep_id, "cat /proc/net/route")["out"].splitlines()[1:]
        routed = {socket.inet_ntoa(struct.pack("<I", int(row.split()[1], 16))) for row in table}
        assert len(routed) == 1, table
        assert "0.0.0.0" not in routed, table
        gateway = routed.pop()
        beside = str(ipaddress.IPv4Address(own.host) - 1)  # the host's end of a /30, were it one
        ports = {
            "db": database.port,
            "proxy-api": proxy.api_port,
            "proxy": proxy.port,
            "deploy": server.port,
            "logging": logging.port,
        }
        targets = {
            f"{name}@{host}": (host, port)
            for name, port in ports.items()
            for host in ("127.0.0.1", gateway, beside)
        }
        targets["neighbour"] = (neighbour.host, neighbour.port or 80)
        script = (
            "python3 - <<'EOF'\nimport json, socket\nout = {}\n"
            f"for name, (host, port) in {json.dumps(targets)}.items():\n"
            "    try:\n"
            "        socket.create_connection((host, port), timeout=1).close()\n"
            "        out[name] = 'connected'\n"
            "    except OSError as exc:\n"
            "        out[name] = type(exc).__name__\n"
            "print(json.dumps(out))\nEOF\n"
        )
        reached = json.loads(run_in_app(proxy, dep_id, script)["out"])
        assert "connected" not in reached.values(), reached
        assert set(reached) == set(targets)
        # from the host, both answer at their own addresses
        assert (
            httpx.get(f"http://{neighbour.host}:{neighbour.port}/user/{other}/").status_code == 200
        )
    finally:
        logging.stop()


RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100


def _address_changes(watch: socket.socket, links: set[int]) -> list[tuple[str, int]]:
    """The address messages read from ``watch`` (new or removed) of links not in ``links``."""
    changes = []
    with contextlib.suppress(BlockingIOError):
        while data := watch.recv(65536):
            while len(data) >= 24:
                length, kind = struct.unpack_from("=LH", data)
                index = struct.unpack_from("=I", data, 20)[0]  # ifaddrmsg's, after the header
                if index not in links:
                    changes.append(("added" if kind == 20 else "removed", index))
                data = data[(length + 3) & ~3 :]
    return changes


def test_launches_and_deletes_change_no_address_of_the_host(
    server: DeployServer, proxy: Proxy
) -> None:
    """Programs of the host that watch its addresses take every change for a new network;
    Chromium fails what it has in flight (``ERR_NETWORK_CHANGED``). A sandbox brings the host a
    link, never an address: made, launched, deleted."""
    links = {index for index, _ in socket.if_nameindex()}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as watch:  # NETLINK_ROUTE
        watch.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        watch.setblocking(False)
        parked = {p.name for p in NETNS_DIR.iterdir()}
        kept, deleted = launch(server), launch(server)
        wait_for(lambda: {p.name for p in NETNS_DIR.iterdir()} - parked, timeout=30)  # slots made
        target = httpx.URL(proxy.routes()[f"/user/{deleted}"]["target"])
        with IPRoute() as host:  # the host's link to the app
            link = host.route("get", dst=target.host)[0].get_attr("RTA_OIF")
        answer = httpx.delete(
            f"{server.url}/applications/hostile/{deleted}", headers=server.auth, timeout=30
        )
        assert answer.json()["status"] == "deleted"
        wait_for(lambda: link not in {index for index, _ in socket.if_nameindex()}, timeout=30)
        assert _address_changes(watch, links) == []
    assert httpx.get(f"http://127.0.0.1:{proxy.port}/user/{kept}/", timeout=10).status_code == 200


def test_apps_on_loopback_and_on_every_address_both_answer_through_the_proxy(
    server: DeployServer, proxy: Proxy
) -> None:
    put_hostile(server, "everywhere", command=[*HOSTILE_COMMAND, "--host", "0.0.0.0"])
    for template in ("hostile", "everywhere"):
        dep_id = launch(server, template)
        page = proxy.get(f"/user/{dep_id}/")
        assert (page.status_code, page.text) == (200, "hostile app\n"), template


def test_processes_that_ignore_sigterm_do_not_slow_stop_all(
    server: DeployServer, proxy: Proxy
) -> None:
    ids = [launch(server) for _ in range(3)]
    for dep_id in ids:  # 12 in all
        run_in_app(
            proxy,
            dep_id,
            """
            for i in 1 2 3 4; do
                setsid sh -c 'trap "" TERM; while :; do sleep 1; done' </dev/null >/dev/null 2>&1 &
            done
            echo planted
            """,
        )
    server.stop()
    started = time.monotonic()
    _stop_apps(server)
    took = time.monotonic() - started
    assert server.app_pids() == {}
    assert took < STOP_GRACE_SECONDS, f"stop-all took {took:.1f} s"
    for dep_id in ids:  # and they are gone too
        assert session_leaders_with("BINDER_ID", dep_id) == {}
    label = suite_label(server.home / "run" / "local")
    assert not list(Path("/sys/fs/cgroup/freezer").glob(f"binder-{label}"))  # nothing left


def test_a_flood_of_output_leaves_a_bounded_log_and_a_bounded_ingest(
    server: DeployServer, proxy: Proxy, database: Database, open_dir: Path
) -> None:
    logging = LoggingServer(open_dir, database).start()  # it follows the suite's home
    try:
        dep_id = launch(server)
        started = time.monotonic()
        flood = run_in_app(  # 100 MB of lines into the app's own output
            proxy,
            dep_id,
            "yes 'flood flood flood flood flood flood flood flood flood flood flood' "
            "| head -c 100000000",
            to_log=True,
        )
        assert flood["code"] == 0, flood
        log = server.home / "logs" / "apps" / f"{dep_id}.log"
        rotated = log.with_name(log.name + ".1")
        assert log.stat().st_size + rotated.stat().st_size <= 8 * 2**20
        assert "[binder: log over its bound" in log.read_text(errors="replace")
        assert proxy.get(f"/user/{dep_id}/").status_code == 200  # the app runs on

        def dropped() -> list[dict[str, Any]]:
            return [r for r in logging.all(app=dep_id) if "output dropped" in r["message"]]

        wait_for(dropped, timeout=60, what="the aggregator to say it dropped lines")
        seconds = time.monotonic() - started
        stored = [r for r in logging.all(app=dep_id) if r["message"].startswith("flood")]
        assert len(stored) <= 1000 * (seconds + 1), (len(stored), seconds)
    finally:
        logging.stop()
