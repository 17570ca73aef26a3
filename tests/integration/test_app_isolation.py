"""On the local backend an app runs in a sandbox of its own (a uid of the range, a private home, its
own namespaces): it finds every door of the suite closed, and still answers through the proxy.
Unsandboxed (trusted templates), it runs as the apps' user, never as root unless told."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from harness import Database, DeployServer, Proxy, wait_for

APP_USER = "binder-app"

PROBE = """
import json, os, runpy, sys, urllib.error, urllib.request
port, base, pid, home, api = sys.argv[1:6]
tried = {}
targets = ["api-key", "proxy-token", "secrets.env", "db/storage.wt", "logs/apps", "run/local", ""]
for name in targets:
    path = os.path.join(home, name)
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, "rb").read(1)
        tried[path] = "read"
    except OSError as exc:
        tried[path] = type(exc).__name__
for path in ["/proc/" + pid + "/environ", os.path.join(home, "planted")]:
    try:
        open(path, "rb" if "proc" in path else "wb").close()
        tried[path] = "opened"
    except OSError as exc:
        tried[path] = type(exc).__name__
try:
    tried["proxy-api"] = urllib.request.urlopen(api + "/api/routes", timeout=5).status
except urllib.error.HTTPError as exc:
    tried["proxy-api"] = exc.code
except urllib.error.URLError as exc:
    tried["proxy-api"] = type(exc.reason).__name__
home_mode = oct(os.stat(os.environ["HOME"]).st_mode & 0o7777)
facts = {"uid": os.getuid(), "groups": os.getgroups(), "cwd": os.getcwd(),
         "home": os.environ["HOME"], "home_owner": os.stat(os.environ["HOME"]).st_uid,
         "home_mode": home_mode}
print("PROBE " + json.dumps({"tried": tried, "facts": facts}), flush=True)
sys.argv = ["example_app", "--port", port, "--base-url", base]
runpy.run_module("services.example_app", run_name="__main__")
"""


def _app_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.fail("the isolation tests need root (apps switch to another user)")
    try:
        return pwd.getpwnam(APP_USER)
    except KeyError:
        pytest.fail(f"there is no user {APP_USER}: run `scripts/setup` as root (it creates it)")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder anyone may enter, so that only the suite's own modes guard its home."""
    path = Path(tempfile.mkdtemp(prefix="binder-isolation-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _plant_secrets(home: Path) -> None:
    """The files a suite keeps in its home, made readable by everyone: only the home's own mode
    (which the server keeps owner-only) may stand in the way."""
    (home / "db").mkdir(parents=True)
    for name, text in {
        "api-key": "k" * 32,
        "proxy-token": "t" * 32,
        "secrets.env": "BINDER_API_KEY=" + "k" * 32,
        "db/storage.wt": "records",
    }.items():
        (home / name).write_text(text)
        (home / name).chmod(0o644)
    home.chmod(0o755)


def _probe(deploy: DeployServer, dep_id: str) -> dict[str, Any]:
    log = deploy.home / "logs" / "apps" / f"{dep_id}.log"

    def line() -> str | None:
        for text in log.read_text().splitlines() if log.exists() else []:
            if text.startswith("PROBE "):
                return text.removeprefix("PROBE ")
        return None

    found: str = wait_for(line, timeout=30, what="the probe's report in the app's log")
    result: dict[str, Any] = json.loads(found)
    return result


def test_app_finds_every_door_of_the_suite_closed(
    open_dir: Path, database: Database, proxy: Proxy
) -> None:
    _app_user()
    deploy = DeployServer(open_dir, database, proxy)
    _plant_secrets(deploy.home)
    deploy.start()
    try:
        assert stat.S_IMODE(deploy.home.stat().st_mode) == 0o700
        assert deploy.proc is not None
        command = ["{python}", "-c", PROBE, "{port}", "{base_url}", str(deploy.proc.pid)]
        command += [str(deploy.home), f"http://127.0.0.1:{proxy.api_port}"]
        put = httpx.put(
            f"{deploy.url}/templates/probe",
            json={"command": command},
            headers=deploy.auth,
            timeout=10,
        )
        assert put.status_code == 200, put.text
        dep_id = deploy.launch("probe")
        info = deploy.wait_status(dep_id, "deployed", "failed", template="probe")
        assert info["status"] == "deployed", info
        report = _probe(deploy, dep_id)
        tried, facts = report["tried"], report["facts"]
        # the proxy's API is the app's own loopback: nothing listens there
        assert tried.pop("proxy-api") == "ConnectionRefusedError"
        assert tried, report
        # the suite's home is not in the app's view (a private /tmp), the server not in its pids
        assert all(r in ("PermissionError", "FileNotFoundError") for r in tried.values()), tried
        assert facts["uid"] in range(200000, 300000), facts
        assert set(facts["groups"]) <= {facts["uid"]}, facts  # none of the server's groups
        assert facts["home"] == facts["cwd"] == "/home/app"
        assert (facts["home_owner"], facts["home_mode"]) == (facts["uid"], "0o700")
        # a normal app still answers through the proxy
        page = proxy.get(f"/user/{dep_id}/")
        assert page.status_code == 200, page.text
        deleted = httpx.delete(
            f"{deploy.url}/applications/probe/{dep_id}", headers=deploy.auth, timeout=30
        )
        assert deleted.json()["status"] == "deleted"
        assert dep_id not in deploy.app_pids()
    finally:
        deploy.stop()
        deploy.remove_apps()


def test_apps_are_never_run_as_root_unless_the_operator_says_so(
    tmp_path: Path, database: Database, proxy: Proxy
) -> None:
    _app_user()
    unsandboxed = {"sandbox": False, "user": "root"}
    deploy = DeployServer(tmp_path, database, proxy, sections={"deploy.local": unsandboxed})
    deploy.start(wait=False)
    assert deploy.proc is not None
    assert deploy.proc.proc is not None
    assert deploy.proc.proc.wait(30) == 1
    output = deploy.proc.output()
    assert "apps would run as root" in output, output
    assert "allow_root = true" in output
    assert "Traceback" not in output
    (tmp_path / "allowed").mkdir()
    allowed = DeployServer(
        tmp_path / "allowed",
        database,
        proxy,
        sections={"deploy.local": {**unsandboxed, "allow_root": True}},
    )
    allowed.start()  # said explicitly: it starts
    allowed.stop()


WHO_AM_I = """
import json, os, resource
try:
    os.setuid(0)
    root = "taken back"
except PermissionError:
    root = "refused"
print("WHO " + json.dumps({
    "ids": [os.getresuid(), os.getresgid()], "groups": os.getgroups(),
    "as": resource.getrlimit(resource.RLIMIT_AS), "pid": os.getpid(), "root": root,
}), flush=True)
"""


def test_app_runs_as_its_user_within_its_memory_limit_in_one_exec(open_dir: Path) -> None:
    """binder-sandbox's direct form (built by scripts/setup), which unsandboxed apps start
    through, gives it the apps' user alone, no other group, no way back to root and its memory limit, and execs it in
    place: the app is the very process the backend spawned and recorded (no process between)."""
    from services.deploy_kubernetes.backends.base import LaunchSpec
    from services.deploy_kubernetes.backends.local.backend import LocalBackend
    from services.deploy_kubernetes.backends.local.users import AppUser
    from services.deploy_kubernetes.models import Template, new_id

    user = _app_user()
    backend = LocalBackend(
        state_dir=open_dir / "state",
        log_dir=open_dir / "logs",
        user=AppUser(user.pw_name, user.pw_uid, user.pw_gid),
        workdirs=open_dir / "apps",
    )
    template = Template(
        name="who", command=("{python}", "-c", WHO_AM_I), limits={"memory": "300Mi"}
    )
    spec = LaunchSpec(id=new_id(), template=template)
    log = open_dir / "logs" / f"{spec.id}.log"

    async def launched() -> int:
        async def ignore(_: object) -> None:
            return None

        await backend.open(ignore)
        try:
            return int((await backend.launch(spec)).ref["pid"])
        finally:
            await backend.close()

    spawned = anyio.run(launched)

    def reported() -> str | None:
        lines = log.read_text().splitlines() if log.exists() else []
        return next((line.removeprefix("WHO ") for line in lines if line.startswith("WHO ")), None)

    who = json.loads(wait_for(reported, timeout=30, what="the app's report in its log"))
    assert who["ids"] == [[user.pw_uid] * 3, [user.pw_gid] * 3], who
    assert set(who["groups"]) <= {user.pw_gid}, who  # none of the server's groups
    assert who["as"] == [300 * 2**20] * 2, who
    assert who["root"] == "refused", who
    assert who["pid"] == spawned, who
