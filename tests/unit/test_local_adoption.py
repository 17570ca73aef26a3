"""What the local backend adopts from ``/proc`` after a restart: never what an app names.

Every app has the suite's label in its environment, so an app can start a detached process with
the label and an environment of its choosing. Adopting it must not let it pick the folder the
server (root) removes or the file it writes.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import anyio
import pytest

from services.deploy_kubernetes.backends.local import LocalBackend


@pytest.mark.parametrize(
    "planted",
    [
        {"BINDER_ID": "../../victim", "PORT": "8000"},
        {"BINDER_ID": "0" * 32 + "\n", "PORT": "8000"},
        {"BINDER_ID": "0" * 32, "PORT": "8000", "BINDER_TEMPLATE": "../../victim"},
        {"BINDER_ID": "0" * 32, "PORT": "99999"},
    ],
)
def test_a_planted_process_cannot_name_what_the_server_removes_or_writes(
    tmp_path: Path, planted: dict[str, str]
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    backend = LocalBackend(
        state_dir=tmp_path / "a" / "state",
        log_dir=tmp_path / "a" / "log",
        workdirs=tmp_path / "a" / "work",
    )
    for folder in ("state", "log", "work"):
        (tmp_path / "a" / folder).mkdir(parents=True)
    env = {"PATH": os.environ["PATH"], "BINDER_SUITE": backend.suite, **planted}
    app = subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)

    async def adopt_and_stop_everything() -> list[str]:
        observed = await backend.list()
        for obs in observed:  # what a reconcile does with apps no record knows
            await backend.stop(obs.id, obs.ref)
        return [obs.id for obs in observed]

    try:
        adopted = anyio.run(adopt_and_stop_everything)
    finally:
        os.killpg(app.pid, signal.SIGKILL)
        app.wait()
    assert adopted == []
    assert (victim / "precious").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "victim"]  # no pid file outside
    with pytest.raises(ValueError, match="not a deployment id"):
        anyio.run(backend.stop, "../../victim", {})
