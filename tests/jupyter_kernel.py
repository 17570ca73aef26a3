"""A headless client of a JupyterLab server for the tests: a kernel started over its REST API, a
cell run over the kernel's websocket, with the launch's token in the ``Authorization`` header.
What a browser tab does, without the browser (a tab that goes away: ``detach``)."""

from __future__ import annotations

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import websockets


def _message(kind: str, content: dict[str, Any], session: str) -> dict[str, Any]:
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": kind,
        "username": "test",
        "session": session,
        "date": "",
        "version": "5.3",
    }
    return {
        "header": header,
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": "shell",
    }


async def _run(base: str, token: str, code: str, detach: bool) -> str:
    base = base.rstrip("/") + "/"
    auth = {"Authorization": f"token {token}"}
    async with httpx.AsyncClient(headers=auth, timeout=30) as http:
        started = await http.post(base + "api/kernels", json={"name": "python3"})
        started.raise_for_status()
        kernel = started.json()["id"]
    session = uuid.uuid4().hex
    url = base.replace("http", "ws", 1) + f"api/kernels/{kernel}/channels?session_id={session}"
    out: list[str] = []
    async with websockets.connect(url, additional_headers=auth, max_size=None) as ws:
        request = _message(
            "execute_request",
            {"code": code, "silent": False, "store_history": True, "user_expressions": {}},
            session,
        )
        await ws.send(json.dumps(request))
        while True:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if reply.get("parent_header", {}).get("msg_id") != request["header"]["msg_id"]:
                continue
            kind, content = reply["msg_type"], reply["content"]
            if kind == "status" and content["execution_state"] == "busy" and detach:
                return ""  # the cell runs on; nobody listens
            if kind == "stream":
                out.append(content["text"])
            elif kind == "execute_result":
                out.append(content["data"].get("text/plain", "") + "\n")
            elif kind == "error":
                out.append("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(out)


def run_cell(base: str, token: str, code: str, *, detach: bool = False) -> str:
    """Run ``code`` in a new kernel of the JupyterLab server at ``base`` (its ``/user/<id>/``
    through the proxy); its output, or nothing at once with ``detach`` (the cell goes on). Runs
    in a thread of its own: a test driving a browser has an event loop in its own."""
    with ThreadPoolExecutor(1) as worker:
        return worker.submit(asyncio.run, _run(base, token, code, detach)).result(120)
