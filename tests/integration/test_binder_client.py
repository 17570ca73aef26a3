"""Binder's original client (npm binder-client 1.0.3), unchanged, against this server."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
from harness import ROOT, DeployServer, Proxy

NODE_MODULES = ROOT / ".node" / "node_modules"
BINDER = NODE_MODULES / ".bin" / "binder"

JS = """
const client = require('binder-client');
const opts = {host: '127.0.0.1', port: process.argv[1], 'api-key': process.argv[2]};
const call = (fn, extra) => new Promise((ok, fail) =>
  fn(Object.assign({}, opts, extra), (err, body) => err ? fail(err) : ok(body)));
(async () => {
  const launched = await call(client.deploy.deploy, {'template-name': 'example', 'cull-timeout': 600000});
  let status;
  for (let i = 0; i < 200; i++) {
    status = await call(client.deploy.status, {'template-name': 'example', id: launched.id});
    if (status.status !== 'deploying') break;
    await new Promise(r => setTimeout(r, 50));
  }
  const all = await call(client.deploy.statusAll, {'template-name': 'example'});
  let missing;
  try { await call(client.deploy.status, {'template-name': 'example', id: '0'.repeat(32)}); }
  catch (e) { missing = e.message; }
  console.log(JSON.stringify({launched, status, all, missing}));
})().catch(e => { console.error(e.message); process.exit(1); });
"""


def _node(script: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        ["node", "-e", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={"NODE_PATH": str(NODE_MODULES), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_js_api_deploys_polls_and_lists(deploy: DeployServer, proxy: Proxy, tmp_path: Path) -> None:
    out = json.loads(_node(JS, str(deploy.port), deploy.api_key, cwd=tmp_path))
    dep_id = out["launched"]["id"]
    assert out["status"]["status"] == "deployed"
    assert out["status"]["location"] == f"127.0.0.1:{proxy.port}/user/{dep_id}"
    assert [d["id"] for d in out["all"]] == [dep_id]
    assert "no deployment" in out["missing"]
    assert proxy.get(f"/user/{dep_id}/").status_code == 200


def test_cli_deploy_and_status(deploy: DeployServer, tmp_path: Path) -> None:
    common = ["-h", "127.0.0.1", "-p", str(deploy.port), "-a", deploy.api_key]
    launched = subprocess.run(
        [str(BINDER), "deploy", "deploy", "example", "600000", *common],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert launched.returncode == 0, launched.stderr
    match = re.search(r"[0-9a-f]{32}", launched.stdout)
    assert match, launched.stdout
    deploy.wait_status(match.group(0), "deployed")
    status = subprocess.run(
        [str(BINDER), "deploy", "status", "example", match.group(0), *common],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert status.returncode == 0, status.stderr
    assert "deployed" in status.stdout
    preload = subprocess.run(
        [str(BINDER), "deploy", "preload", "example", *common],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert preload.returncode == 0, preload.stderr
    assert "completed" in preload.stdout


def _binder(*args: str, cwd: Path) -> str:
    """What the ``binder`` CLI printed (it says errors on stderr and exits 0)."""
    done = subprocess.run([str(BINDER), *args], capture_output=True, text=True, timeout=60, cwd=cwd)
    return done.stdout + done.stderr


def test_cli_names_an_unknown_template_with_its_own_error(
    deploy: DeployServer, tmp_path: Path
) -> None:
    common = ["-h", "127.0.0.1", "-p", str(deploy.port), "-a", deploy.api_key]
    for args in (["deploy", "nope", "600000"], ["preload", "nope"]):
        said = _binder("deploy", *args, *common, cwd=tmp_path)
        assert "unidentifiable" not in said, said
        assert "Error: no template named nope" in said, said  # the server's message, kept
        assert "Possible fix" in said, said  # the client's own advice for the error it knows
    # any other client gets the contract's name, with the same status and message
    answer = httpx.post(f"{deploy.url}/applications/", json={"template-name": "nope"})
    assert answer.status_code == 404
    assert answer.json() == {"type": "noTemplate", "error": "no template named nope"}
