"""``binder-control logs``: the newest lines of the aggregator (newest last, as ``tail`` shows
them), or those and then new ones as they come. A service that never logged and an id prefix
that names no deployment, or several, are errors."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import httpx
from rich.console import Console

from common.errors import BinderError
from common.owned_http import ForeignServerError, hooks
from common.settings import Settings
from control.logs_client import LogsClient
from control.services import ORDER

FULL_ID = re.compile(r"^[0-9a-f]{32}$")


def show_logs(
    *,
    settings: Settings,
    secrets: dict[str, str],
    filters: dict[str, str | None],
    follow: bool,
    limit: int,
    as_json: bool,
    console: Console,
) -> None:
    token = secrets.get("BINDER_LOGGING_TOKEN", "")
    if not token:
        raise BinderError(
            f"no logging token in {settings.home / 'secrets.env'}: start the suite with start-all"
        )
    client = LogsClient(settings.logging.url, token=token)
    if filters.get("app"):
        filters = {**filters, "app": resolve_app(settings, secrets, str(filters["app"]))}
    if filters.get("service") and not client.newest(limit=1, service=filters["service"]):
        raise BinderError(
            f"no lines from a service named {filters['service']!r} "
            f"(the suite's services: {', '.join(ORDER)}; apps log as 'app')"
        )
    if follow:
        _print(client.follow(history=limit, **filters), as_json=as_json, console=console)
    else:
        _print(
            client.newest(limit=limit, **filters) if limit else [], as_json=as_json, console=console
        )


CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""Characters a terminal acts on instead of showing (escape sequences, carriage returns,
bidirectional overrides): what an app prints must not move the cursor, rewrite earlier lines,
change the title or reorder the text of the operator's terminal."""


def neutral(text: str) -> str:
    """``text`` with every terminal control character shown as an escape (``\\x1b``), and
    the lines after its first indented, so that no line of it passes for a record of its own."""
    shown = CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), str(text))
    return shown.replace("\n", "\n    ")


def _print(records: Iterable[dict[str, Any]], *, as_json: bool, console: Console) -> None:
    for record in records:
        if as_json:
            print(json.dumps(record), flush=True)  # JSON escapes every control character
            continue
        dep = f" [{neutral(record['id'])[:8]}]" if record.get("id") else ""
        console.print(
            f"{neutral(record['time'])} {neutral(record['service']):<18} "
            f"{neutral(record['level']):<8}{dep} {neutral(record['message'])}",
            markup=False,
            highlight=False,
        )


def resolve_app(settings: Settings, secrets: dict[str, str], prefix: str) -> str:
    """The one deployment id starting with ``prefix`` (a full id is taken as it is)."""
    if FULL_ID.match(prefix):
        return prefix
    if not re.fullmatch(r"[0-9a-f]{1,31}", prefix):
        raise BinderError(f"--app {prefix!r}: a deployment id is 32 hex digits (or a prefix)")
    d = settings.deploy
    host = "127.0.0.1" if d.host in ("0.0.0.0", "") else d.host
    url = f"http://{host}:{d.port}/applications/"
    try:
        with httpx.Client(timeout=10, event_hooks=hooks("the API key")) as client:
            response = client.get(url, headers={"Authorization": secrets.get("BINDER_API_KEY", "")})
    except ForeignServerError as exc:
        raise BinderError(f"--app {prefix}: {exc}") from exc
    except httpx.HTTPError as exc:
        raise BinderError(f"--app {prefix}: the deploy API at {url} is unreachable") from exc
    if response.status_code != 200:
        raise BinderError(f"--app {prefix}: the deploy API answered {response.status_code}")
    ids = sorted({d["id"] for d in response.json() if d["id"].startswith(prefix)})
    if not ids:
        raise BinderError(f"--app {prefix}: no deployment id starts with it")
    if len(ids) > 1:
        raise BinderError(f"--app {prefix}: several deployments match: {', '.join(ids[:5])}")
    return str(ids[0])
