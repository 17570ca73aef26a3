"""Client of the log aggregator's query API (with its bearer token), used by ``binder-control logs``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from common.errors import BinderError
from common.owned_http import hooks


class LogsClient:
    def __init__(self, base_url: str, *, token: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {token}"}
        self.hooks = hooks("the logging token")
        """The token goes only to an aggregator of the suite's user."""

    def _params(self, **filters: str | int | None) -> dict[str, str]:
        return {k: str(v) for k, v in filters.items() if v not in (None, "")}

    def _get(self, client: httpx.Client, params: dict[str, str]) -> dict[str, Any]:
        try:
            response = client.get(f"{self.base_url}/logs", params=params, headers=self.headers)
        except httpx.HTTPError as exc:  # a ForeignServerError says whose the port is
            raise BinderError(f"log aggregator unreachable at {self.base_url}: {exc}") from exc
        if response.status_code != 200:
            raise BinderError(f"log aggregator answered {response.status_code}: {_error(response)}")
        page: dict[str, Any] = response.json()
        return page

    def newest(self, *, limit: int = 100, **filters: str | None) -> list[dict[str, Any]]:
        """The newest ``limit`` records matching ``filters``, oldest first (as ``tail`` shows)."""
        params = self._params(limit=min(max(limit, 1), 1000), order="newest", **filters)
        out: list[dict[str, Any]] = []
        with httpx.Client(timeout=self.timeout, event_hooks=self.hooks) as client:
            while len(out) < limit:
                page = self._get(client, params)
                out += page["records"][: limit - len(out)]
                if not page.get("next"):
                    break
                params["cursor"] = page["next"]
        return out[::-1]

    def follow(self, *, history: int = 10, **filters: str | None) -> Iterator[dict[str, Any]]:
        """The newest ``history`` records, then records as they arrive (server-sent events),
        until interrupted. The stream is opened first, so no record falls between the two."""
        live = {k: v for k, v in filters.items() if k != "since"}
        try:
            with (
                httpx.Client(
                    timeout=httpx.Timeout(self.timeout, read=None), event_hooks=self.hooks
                ) as client,
                client.stream(
                    "GET",
                    f"{self.base_url}/logs/stream",
                    params=self._params(**live),
                    headers=self.headers,
                ) as response,
            ):
                if response.status_code != 200:
                    response.read()
                    raise BinderError(
                        f"log aggregator answered {response.status_code}: {_error(response)}"
                    )
                lines = response.iter_lines()
                next(lines, None)  # the stream's first comment: subscribed from here on
                shown = set()
                for record in self.newest(limit=history, **filters) if history else []:
                    shown.add(record.get("rid"))
                    yield record
                for line in lines:
                    if line.startswith("data: "):
                        record = json.loads(line[6:])
                        if record.get("rid") not in shown:
                            yield record
        except httpx.HTTPError as exc:  # a ForeignServerError says whose the port is
            raise BinderError(f"log aggregator unreachable at {self.base_url}: {exc}") from exc


def _error(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error"))
    except ValueError:
        return response.text[:200]
